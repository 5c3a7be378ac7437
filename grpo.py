"""grpo.py: group-relative policy optimisation with verifiable rewards, in one file (GRPO, Dr.GRPO, DAPO, GSPO, GMPO,
RLOO, REINFORCE++: each one flag away).

One step, as in the algorithm box of DeepSeekMath (Shao et al. 2024, arXiv:2402.03300):

    prompts --generate G completions each--> rewards r_i --group_advantages--> A_i
    for mu inner epochs, for each mini-batch:            (one optimizer step per mini-batch)
        loss = policy_loss(log pi, log pi_old, A) [+ kl_coef * kl_penalty(log pi, log pi_ref)]

Launch:
    python sft.py && python grpo.py                     # 1 CPU: from sft.py's export, bundled arithmetic task
    python grpo.py --model-path smollm2-135m            # from the instruct model itself
    python grpo.py --estimator dr_grpo --agg seq-mean-token-sum-norm --no-dynamic-sampling  # Dr.GRPO
    python grpo.py --clip-high 0.28 --overlong-buffer 32 --mask-truncated --max-resample 3   # DAPO
    python grpo.py --variant gspo --clip-low 3e-4 --clip-high 4e-4 --agg seq-mean-token-mean  # GSPO
    python grpo.py --reward-fn my_rewards.py:score --reward-url http://host:8000/score      # your own rewards
    python grpo.py --model-path Qwen/Qwen2.5-0.5B-Instruct --dataset my.jsonl --vllm    # 1 GPU (bf16 picked automatically)
    torchrun --nproc_per_node=8 grpo.py --model-path Qwen/Qwen2.5-1.5B-Instruct --dataset my.jsonl   # N GPUs, FSDP2

Where this departs from TRL's GRPOTrainer / the papers:
  * The loss of each micro-batch is divided by the token (or sequence) count of the whole global mini-batch, counted
    before the micro-batch loop, so gradient accumulation and the number of processes do not change the gradient.
  * Old-policy logps are recomputed with the training model (no grad) when a rollout batch is used for more than one
    optimizer step; with a single step (mu=1, one mini-batch) they equal the current logps, so the detached current
    logps are used and the extra forward is skipped (ratio = 1 exactly, as in TRL and verl).
  * KL is off by default (as in DAPO and Dr.GRPO); the reference model is loaded only when --kl-coef > 0.
  * DAPO's dynamic sampling is on by default: groups whose G rewards are all equal carry no gradient, and on a task the
    SFT model half solves a third to a half of them are. With few prompts per step, Adam turns the noise of a small
    batch into steps as large as signal ones: 8 prompts x G=8 at lr 2e-5 lowered held-out accuracy, 16 x 8 at 1e-5
    raised it (README).
  * Rollouts use Hugging Face `generate` on the training model itself. Under FSDP2 every rank runs it with
    `synced_gpus=True`, so all ranks make the same number of forward calls (each one all-gathers the sharded layers)
    until every rank has finished; no unsharded copy is made. --vllm is an optional, untested-without-GPU path.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from common.data import detect_format, load_records, to_messages
from common.logprob import sequence_logprobs
from common.metrics import RunLogger, cli, exact_match
from common.models import (
    barrier,
    checkpoint_dirs,
    load_checkpoint,
    load_model,
    load_tokenizer,
    pick_dtype,
    replace_dir,
    resolve_model_path,
    save_checkpoint,
)
from common.rewards import VERIFY_STATS, answer_correct, load_reward_fn, remote_reward, safe_rewards
from common.vision import checkpoint_vlm, export_vlm, is_vlm, load_vlm, param_groups, vlm_generate

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
VARIANTS = ("ppo", "gspo", "gmpo")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class Args:
    model_path: str = "runs/sft/model"
    """policy to train: a local HF folder, an alias (smollm2-135m), a .gguf file or a hub id. The default is the model
    `python sft.py` exports: RL sharpens a policy that already solves some problems, it cannot teach the format from zero"""
    dataset: str = "data/arith/train.jsonl"
    """prompts: messages records (the final assistant turn is dropped) or message+answer records; `answer` is the
    reference. Messages may hold image parts when --model-path is a VLM (e.g. easy-vqa:train)"""
    eval_dataset: str | None = "data/arith/test.jsonl"
    """held-out prompts answered greedily before and after training (answer accuracy)"""
    output_dir: str = "runs/grpo"
    """checkpoints, metrics.jsonl, rollouts.jsonl and the exported Hugging Face folder (`<output-dir>/model`)"""
    config: str | None = None
    """a .yaml or .json file of field: value defaults; command-line flags override them"""
    dry_run: bool = False
    """validate arguments, read the data and the model config, print the plan and exit"""
    seed: int = 0
    """seed for prompt order and sampling"""
    max_steps: int = 16
    """rollout steps (each: generate, score, then mu x mini_batches optimizer steps)"""
    prompts_per_step: int = 16
    """prompts per rollout step, over all processes (each gets --group-size completions)"""
    group_size: int = 8
    """G: completions sampled per prompt"""
    max_new_tokens: int = 64
    """completion budget; longer completions are truncated (see --mask-truncated, --overlong-buffer)"""
    temperature: float = 1.0
    """sampling temperature of rollouts (and of the logps the loss uses)"""
    top_p: float = 1.0
    """nucleus sampling threshold of rollouts"""
    fire_temperature: float | None = None
    """FIRE sampling: the first completion token is sampled at this (high) temperature, the rest at --temperature"""
    lr: float = 1e-5
    """learning rate (AdamW, constant after warmup)"""
    lr_projector: float | None = None
    """VLM only: projector lr (default --lr); 0 freezes it"""
    lr_vision: float | None = None
    """VLM only: vision-encoder lr (default --lr); 0 freezes it"""
    warmup_steps: int = 0
    """linear warmup over this many optimizer steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (0 disables)"""
    mu: int = 1
    """inner epochs over each rollout batch (PPO's reuse; >1 makes the ratio and clipping matter)"""
    mini_batches: int = 1
    """optimizer steps per inner epoch: the rollout batch is split into this many mini-batches"""
    micro_batch_size: int = 16
    """completions per forward/backward per process (gradient accumulation inside a mini-batch)"""
    estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = "grpo"
    """advantage estimator (see group_advantages)"""
    variant: Literal["ppo", "gspo", "gmpo"] = "ppo"
    """policy-loss variant (see policy_loss)"""
    clip_low: float = 0.2
    """ratio clip below 1 (ppo, gspo: 1 - clip_low; gmpo: log-ratio >= -clip_low)"""
    clip_high: float = 0.2
    """ratio clip above 1; DAPO's clip-higher uses 0.28"""
    dual_clip: float | None = None
    """dual-clip constant c > 1 for negative advantages (ppo only)"""
    agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """loss aggregation over tokens and sequences (see aggregate)"""
    kl_coef: float = 0.0
    """weight of the KL penalty to the reference (initial) model; 0 loads no reference model"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """per-token KL estimator (see kl_penalty)"""
    dynamic_sampling: bool = True
    """DAPO: drop groups whose rewards are all equal (zero advantage) and sample more prompts to fill the batch"""
    max_resample: int = 1
    """dynamic sampling: extra generation rounds per step at most; still-missing groups are filled with dropped ones"""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment: completions within this many tokens of --max-new-tokens lose up to --overlong-penalty"""
    overlong_penalty: float = 1.0
    """the largest soft overlong penalty (reached at --max-new-tokens)"""
    mask_truncated: bool = False
    """DAPO: completions cut at --max-new-tokens (no EOS) get no loss"""
    rewards: tuple[str, ...] = ("math", "format")
    """built-in reward functions summed into the reward: math (math-verify), format, exact, vqa (VQA v2 score of short
    answers; use `--rewards vqa` for image questions). Held-out accuracy checks answers as math when math is among
    them, else by exact match"""
    reward_weights: tuple[float, ...] | None = None
    """one weight per reward function (built-ins, then --reward-fn, then --reward-url); default all 1"""
    reward_fn: tuple[str, ...] = ()
    """extra reward functions, `module:function` or `path/file.py:function`, called as fn(completions, prompts=, answers=)"""
    reward_url: str | None = None
    """HTTP reward: POST {"prompts", "completions", "answers"} JSON, expects {"rewards": [...]}"""
    reward_timeout: float = 30.0
    """seconds per HTTP reward attempt"""
    reward_retries: int = 3
    """retries of a failed HTTP reward request"""
    dtype: str = "auto"
    """compute dtype: auto (bf16 where the hardware has it), float32 or bfloat16; master weights stay float32"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    logprob_impl: Literal["fused", "naive"] = "fused"
    """fused: chunked kernel that never builds the logits; naive: log_softmax over full logits"""
    eval_samples: int = 200
    """held-out prompts answered by greedy generation before and after training (0 disables)"""
    eval_every: int = 0
    """also measure held-out accuracy every N steps (0: only before and after)"""
    save_rollouts: bool = False
    """append prompt, completion, rewards and advantage of every sample to <output-dir>/rollouts.jsonl"""
    save_every: int = 0
    """save a resumable checkpoint every N steps (0: only on preemption and at the end)"""
    keep_checkpoints: int = 2
    """how many recent checkpoints to keep"""
    resume: bool = False
    """continue from the newest complete checkpoint in <output-dir>/checkpoints"""
    export: bool = True
    """write a Hugging Face folder (safetensors, config, tokenizer) to <output-dir>/model at the end"""
    vllm: bool = False
    """generate rollouts with a colocated vLLM engine (GPU only; UNTESTED: no GPU was available when written)"""
    track: bool = False
    """log to Weights & Biases (offline mode when no account is configured)"""
    wandb_project: str = "cleanpost"
    """wandb project name"""
    run_name: str | None = None
    """wandb run name"""


# =============================================================================================== the algorithm
def group_advantages(rewards, response_mask, group_size, estimator, eps=1e-6):
    """Advantages [B, T] (zero outside response_mask) from one scalar reward per completion.

    rewards [B] float, the G = group_size completions of a prompt in consecutive rows; response_mask [B, T] bool.
      grpo:         (r - mean_group) / (std_group + eps), std with Bessel's correction (GRPO, Shao et al. 2024,
                    arXiv:2402.03300, as TRL and verl compute it).
      dr_grpo:      r - mean_group; no std division, which favours too easy/hard questions (Dr.GRPO, Liu et al. 2025,
                    arXiv:2503.20783).
      rloo:         r - mean of the other G-1 rewards of the group (RLOO, Ahmadian et al. 2024, arXiv:2402.14740).
      reinforce_pp: the reward on every response token, whitened by the mean and std over all response tokens of the
                    batch (REINFORCE++, Hu 2025, arXiv:2501.03262; its per-token KL reward is --kl-coef's loss term here).
    A group whose rewards are all equal gets zero advantage under grpo, dr_grpo and rloo."""
    rewards = rewards.float()
    mask = response_mask.bool()
    if estimator in ("grpo", "dr_grpo", "rloo"):
        grouped = rewards.view(-1, group_size)  # [n_prompts, G]
        mean = grouped.mean(1, keepdim=True)
        if estimator == "grpo":
            std = grouped.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
            per_seq = (grouped - mean) / (std + eps)
        elif estimator == "dr_grpo":
            per_seq = grouped - mean
        else:
            if group_size < 2:
                raise ValueError("rloo needs group_size >= 2")
            per_seq = grouped - (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
        return per_seq.reshape(-1, 1) * mask  # [B, T]
    if estimator == "reinforce_pp":
        token_rewards = rewards[:, None].expand_as(mask)[mask]  # [n_response_tokens]
        mean = token_rewards.mean()
        std = token_rewards.std() if token_rewards.numel() > 1 else torch.zeros_like(mean)
        return ((rewards[:, None] - mean) / (std + eps)) * mask
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def aggregate(token_values, response_mask, agg, *, n_tokens=None, n_seqs=None, norm_len=None):
    """Scalar loss from per-token values [B, T] (zero outside the mask).

      token-mean:              sum of all tokens / n_tokens (DAPO: long and short sequences weigh per token)
      seq-mean-token-mean:     mean over sequences of each sequence's token mean (the original GRPO)
      seq-mean-token-sum:      mean over sequences of each sequence's token sum
      seq-mean-token-sum-norm: sum of all tokens / (n_seqs * norm_len), a constant divisor (Dr.GRPO)
    n_tokens / n_seqs default to this batch's counts; pass the global mini-batch counts under gradient accumulation or
    data parallelism so that the micro-batch losses add up to the mini-batch loss. norm_len defaults to T."""
    mask = response_mask.to(token_values.dtype)
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    n_seqs = mask.shape[0] if n_seqs is None else n_seqs
    if agg == "token-mean":
        return (token_values * mask).sum() / max(float(n_tokens), 1.0)
    if agg == "seq-mean-token-mean":
        return ((token_values * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / max(float(n_seqs), 1.0)
    if agg == "seq-mean-token-sum":
        return (token_values * mask).sum() / max(float(n_seqs), 1.0)
    if agg == "seq-mean-token-sum-norm":
        norm_len = mask.shape[1] if norm_len is None else norm_len
        return (token_values * mask).sum() / (max(float(n_seqs), 1.0) * norm_len)
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def policy_loss(
    logps,
    old_logps,
    advantages,
    response_mask,
    *,
    variant,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    agg="token-mean",
    n_tokens=None,
    n_seqs=None,
    norm_len=None,
):
    """(scalar loss, stats) of the clipped surrogate. logps, old_logps, advantages [B, T] float, response_mask [B, T].

      ppo:  per token, -min(rho A, clip(rho, 1-clip_low, 1+clip_high) A), rho = pi/pi_old (PPO, Schulman et al. 2017,
            arXiv:1707.06347); clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476). With
            dual_clip = c > 1, tokens with A < 0 lose at most -c A (dual-clip PPO, Ye et al. 2020, arXiv:1912.09729).
      gspo: one ratio per sequence, s = exp(mean_t log rho_t) (the geometric mean of token ratios), clipped like ppo:
            -min(s A, clip(s, 1-clip_low, 1+clip_high) A) (GSPO, Zheng et al. 2025, arXiv:2507.18071).
      gmpo: the geometric mean of the clipped token ratios, clipping log rho_t to [-clip_low, clip_high] in the
            pessimistic direction of sign(A): -A exp(mean_t clipped log rho_t) (GMPO, Zhao et al. 2025, arXiv:2507.20673).
    Sequence-level losses (gspo, gmpo) sit on each of the sequence's tokens, so with seq-mean-token-mean they weigh
    once per sequence (as in the papers) and `aggregate` applies unchanged. The advantage of a sequence is read from its
    tokens (they are all equal for the estimators here). stats: clip_fraction (share of tokens, or of sequences for
    gspo, where clipping removed the gradient), approx_kl (k3 of pi_old vs pi, token mean), ratio_mean."""
    mask = response_mask.bool()
    maskf = mask.to(logps.dtype)
    log_ratio = (logps - old_logps) * maskf  # [B, T]
    seq_len = maskf.sum(1).clamp(min=1)  # [B]
    if variant == "ppo":
        ratio = torch.exp(log_ratio)
        unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
        token_loss = torch.maximum(unclipped, clipped)
        is_clipped = clipped > unclipped
        if dual_clip is not None:
            capped = torch.minimum(token_loss, -advantages * dual_clip)
            is_clipped = is_clipped | ((advantages < 0) & (capped < token_loss))
            token_loss = torch.where(advantages < 0, capped, token_loss)
        clip_fraction = (is_clipped & mask).sum() / mask.sum().clamp(min=1)
        ratio_mean = (ratio * maskf).sum() / maskf.sum().clamp(min=1)
    elif variant in ("gspo", "gmpo"):
        seq_adv = (advantages * maskf).sum(1) / seq_len  # [B]
        if variant == "gspo":
            seq_ratio = torch.exp(log_ratio.sum(1) / seq_len)  # [B]
            unclipped, clipped = -seq_adv * seq_ratio, -seq_adv * seq_ratio.clamp(1 - clip_low, 1 + clip_high)
            seq_loss = torch.maximum(unclipped, clipped)
            has_tokens = mask.any(1)
            clip_fraction = ((clipped > unclipped) & has_tokens).sum() / has_tokens.sum().clamp(min=1)
        else:
            sign = torch.sign(seq_adv)[:, None]
            clipped_log = sign * torch.minimum(sign * log_ratio, sign * log_ratio.clamp(-clip_low, clip_high))
            seq_ratio = torch.exp((clipped_log * maskf).sum(1) / seq_len)
            seq_loss = -seq_adv * seq_ratio
            clip_fraction = ((clipped_log != log_ratio) & mask).sum() / mask.sum().clamp(min=1)
        token_loss = seq_loss[:, None].expand_as(logps)
        ratio_mean = seq_ratio[mask.any(1)].mean() if mask.any() else seq_ratio.new_zeros(())
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    loss = aggregate(token_loss * maskf, mask, agg, n_tokens=n_tokens, n_seqs=n_seqs, norm_len=norm_len)
    with torch.no_grad():
        approx_kl = ((torch.exp(-log_ratio) - 1 + log_ratio) * maskf).sum() / maskf.sum().clamp(min=1)
    return loss, {"clip_fraction": clip_fraction.detach(), "approx_kl": approx_kl, "ratio_mean": ratio_mean.detach()}


def kl_penalty(logps, ref_logps, estimator):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, [B, T] (Schulman 2020, "Approximating KL divergence"):
      k1 = log pi - log pi_ref                              (unbiased, high variance, can be negative)
      k2 = (log pi - log pi_ref)^2 / 2                      (biased, low variance)
      k3 = pi_ref/pi - 1 - log(pi_ref/pi)                   (unbiased, >= 0, low variance; GRPO's choice)
    k3's exponent is clamped to [-20, 20] and the result to <= 10 (as verl does): one token the policy has made
    very unlikely under the reference would otherwise give an inf/NaN loss."""
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        neg = (-log_ratio).clamp(-20, 20)
        return (torch.exp(neg) - 1 - neg).clamp(max=10)
    raise ValueError(f"estimator must be k1, k2 or k3, got {estimator!r}")


def overlong_penalty(lengths, max_len, buffer, penalty):
    """DAPO's soft overlong punishment [B]: 0 up to max_len - buffer, then falling linearly to -penalty at max_len."""
    if buffer <= 0:
        return torch.zeros(len(lengths))
    over = (torch.as_tensor(lengths, dtype=torch.float32) - (max_len - buffer)).clamp(min=0)
    return -penalty * (over / buffer).clamp(max=1)


# ====================================================================================================== rollout
def prompt_records(source):
    """(prompt messages, reference answer or None) per record: the chat minus its final assistant turn. Relative image
    paths are resolved against the data file's folder here, so a prompt carries everything it needs."""
    records = load_records(source)
    fmt = detect_format(records)
    if fmt == "preference":
        raise SystemExit(
            f"error: {source}: preference data is for dpo.py; grpo.py needs prompts (messages or message+answer)"
        )
    out = []
    for r in records:
        messages = to_messages(r, fmt)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        for m in messages:
            for part in m["content"] if isinstance(m["content"], list) else []:
                ref = part.get("image")
                if part.get("type") == "image" and isinstance(ref, str) and not ref.startswith(("data:", "/", "http")):
                    part["image"] = str(Path(r.get("_dir", "."), ref.removeprefix("file://")))
        if messages:
            out.append((messages, None if r.get("answer") is None else r["answer"]))
    return out, fmt


def render_prompt(tokenizer, messages):
    """The chat as text up to the assistant header; an image part shows as <image> (rollouts.jsonl, vLLM's prompts)."""
    text_messages = [
        {
            "role": m["role"],
            "content": m["content"]
            if isinstance(m["content"], str)
            else "\n".join(p["text"] if p.get("type") == "text" else "<image>" for p in m["content"]),
        }
        for m in messages
    ]
    return tokenizer.apply_chat_template(text_messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(tokenizer, processor, messages) -> dict:
    """{"input_ids": the chat rendered up to the assistant header, "images": model inputs per image}. A VLM's processor
    expands each image part into its image tokens; a text model refuses image parts instead of silently dropping them."""
    if processor is not None:
        return processor(messages, add_generation_prompt=True)
    if any(
        isinstance(m["content"], list) and any(p.get("type") in ("image", "image_url") for p in m["content"])
        for m in messages
    ):
        raise SystemExit(
            "error: a prompt holds an image but --model-path is a text model; pass a VLM folder "
            "(pretrain_captioner.py / sft.py export, or a native image-text-to-text model)"
        )
    return {
        "input_ids": tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"],
        "images": [],
    }


def stop_ids(tokenizer, model) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids + [tokenizer.eos_token_id]) - {None})


class FirstTokenTemperature:
    """FIRE sampling (LightRFT): divides the logits of the first generated token by `first_t` instead of the normal
    temperature. Generation divides by `temperature` itself (before or after this processor, the product is the same),
    so this rescales by temperature / first_t: the first token is sampled from logits / first_t. The first call is
    the first token (a composed VLM generates from embeddings, so input_ids do not tell the prompt length)."""

    def __init__(self, first_t, temperature):
        self.first, self.scale = True, temperature / first_t

    def __call__(self, input_ids, scores):
        first, self.first = self.first, False
        return scores * self.scale if first else scores


class SampledTokenLogprobs:
    """The rollout engine's own log-probability of each token it samples: log_softmax(scores / temperature) at the
    drawn token (scores after any processor placed before this one, i.e. FIRE's rescaling, before top-p filtering).
    generate() hands processors the logits of step t before sampling token t, so each call reads the token drawn at the
    previous step from input_ids; `finish` reads the last one. Memory: one [B, V] row per step, not T x B x V.
    These logps are only compared with the training model's (rollout/* metrics), never used in the loss: the two
    differ by numerics (KV cache, batching, bf16), and by design under FIRE or top-p < 1."""

    def __init__(self, temperature):
        self.temperature, self.prev, self.logps = temperature, None, []

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.logps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # [B, V]
        return scores

    def finish(self, new_tokens):
        """[B, n_new] logps of new_tokens (positions after a sequence's end hold junk: callers cut at EOS)."""
        if self.prev is not None and len(self.logps) < new_tokens.shape[1]:
            self.logps.append(self.prev.gather(1, new_tokens[:, len(self.logps) : len(self.logps) + 1]).squeeze(1))
        return torch.stack(self.logps, 1) if self.logps else torch.zeros(new_tokens.shape[0], 0)


@torch.no_grad()
def generate(
    model, tokenizer, prompts, args, autocast, *, processor=None, greedy=False, max_new_tokens=None, synced=None
):
    """Completions for encoded prompts (encode_prompt): (completion token lists (EOS kept, pads cut), truncated flags,
    the sampler's own logps of those tokens (lists; None when greedy)).
    Left-padded batch, KV cache, stops at EOS. Under FSDP2, synced_gpus keeps every rank stepping until all are done;
    pass synced=False when only this rank generates (rank-0 eval on an unsharded model), or it waits for the others."""
    from transformers import LogitsProcessorList

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(p["input_ids"]) for p in prompts)  # left-pad: generation appends on the right
    input_ids = torch.tensor(
        [[tokenizer.pad_token_id] * (width - len(p["input_ids"])) + p["input_ids"] for p in prompts], device=device
    )  # [B, T]
    attention_mask = torch.tensor(
        [[0] * (width - len(p["input_ids"])) + [1] * len(p["input_ids"]) for p in prompts], device=device
    )  # [B, T]
    eos = stop_ids(tokenizer, model)
    sampling = {} if greedy else dict(temperature=args.temperature, top_p=args.top_p, top_k=0)
    processors = LogitsProcessorList()
    if not greedy and args.fire_temperature:
        processors.append(FirstTokenTemperature(args.fire_temperature, args.temperature))
    recorder = None if greedy else SampledTokenLogprobs(args.temperature)
    if recorder is not None:
        processors.append(recorder)  # after FIRE: it records the distribution tokens were actually drawn from
    options = dict(
        max_new_tokens=max_new_tokens or args.max_new_tokens,
        do_sample=not greedy,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        logits_processor=processors,
        synced_gpus=dist.is_initialized() if synced is None else synced,
        **sampling,
    )
    with autocast:
        if processor is not None:  # a VLM: its images' inputs in the order their tokens appear row by row
            images = {
                k: v.to(device) if torch.is_tensor(v) else v
                for k, v in processor.image_inputs(prompts, input_ids).items()
            }
            new_tokens = vlm_generate(model, input_ids, attention_mask, **images, **options)  # [B, n_new]
        else:
            new_tokens = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)[
                :, width:
            ]  # [B, n_new]
    model.train(was_training)
    sampler_logps = recorder.finish(new_tokens).tolist() if recorder is not None else None
    completions, truncated, rollout_logps = [], [], []
    for i, row in enumerate(new_tokens.tolist()):
        end = next((j for j, t in enumerate(row) if t in eos), None)
        completions.append(row if end is None else row[: end + 1])
        truncated.append(end is None)
        rollout_logps.append(None if sampler_logps is None else sampler_logps[i][: len(completions[-1])])
    return completions, truncated, rollout_logps


def vllm_generate(engine, model, prompts, args):  # pragma: no cover - GPU only
    """UNTESTED (no GPU when written). Colocated vLLM: load the policy's current full weights, then sample."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from vllm import SamplingParams

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    engine.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(state.items())
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens, logprobs=0)
    outs = engine.generate(prompts, params, use_tqdm=False)
    completions = [list(o.outputs[0].token_ids) for o in outs]
    logps = [[step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    return completions, [o.outputs[0].finish_reason == "length" for o in outs], logps


def build_batch(prompt_ids, completions, pad_id, rollout_logps=None):
    """Right-padded training rows prompt + completion: input_ids, attention_mask, position_ids [B, L] and
    response_mask [B, L], True at t when logps[:, t] (which scores token t+1) scores a completion token; with the
    sampler's own logps (lists per completion), rollout_logps [B, L] on the same positions (0 elsewhere)."""
    rows = [p + c for p, c in zip(prompt_ids, completions)]
    L = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(rows), L), -100, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((len(rows), L), dtype=torch.long)  # [B, L]
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
        attention_mask[i, : len(p) + len(c)] = 1
    response_mask = torch.zeros((len(rows), L), dtype=torch.bool)  # [B, L]
    response_mask[:, :-1] = labels[:, 1:] != -100
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # [B, L]
    batch = dict(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        position_ids=position_ids,
        response_mask=response_mask,
    )
    if rollout_logps is not None and all(lp is not None for lp in rollout_logps):
        batch["rollout_logps"] = torch.zeros((len(rows), L))  # [B, L]
        for i, (p, lp) in enumerate(zip(prompt_ids, rollout_logps)):
            batch["rollout_logps"][i, len(p) - 1 : len(p) - 1 + len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return batch


def token_logps(model, mb, args, entropy=False, image_inputs=None):
    """log pi(completion tokens) [B, L] at the sampling temperature (and entropy [B, L]), via common/logprob.py.
    image_inputs: a VLM's processor.image_inputs for these rows (they may override position_ids, as Qwen-VL's do)."""
    kwargs = {"position_ids": mb["position_ids"], "attention_mask": mb["attention_mask"], **(image_inputs or {})}
    return sequence_logprobs(
        model,
        mb["input_ids"],
        mb["labels"],
        impl=args.logprob_impl,
        temperature=args.temperature,
        return_entropy=entropy,
        **kwargs,
    )


def is_correct(text, answer, rewards) -> bool:
    """Held-out check: math answers as sft.py's eval checks them; otherwise (VQA) exact match after normalisation."""
    return answer_correct(text, str(answer)) if "math" in rewards else exact_match(text.strip(), answer) > 0


@torch.no_grad()
def answer_accuracy(model, tokenizer, items, args, autocast, processor=None, batch_size=25) -> float:
    """Fraction of held-out prompts whose greedy answer is_correct."""
    correct = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        completions, _, _ = generate(
            model,
            tokenizer,
            [encode_prompt(tokenizer, processor, m) for m, _ in chunk],
            args,
            autocast,
            processor=processor,
            greedy=True,
            synced=False,
        )  # rank 0, unsharded model
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        correct += sum(is_correct(t, a, args.rewards) for t, (_, a) in zip(texts, chunk))
    return correct / max(1, len(items))


# ========================================================================= checkpoints and export (as in sft.py)
def export_hf(args, model, tokenizer, rank) -> Path | None:
    """Gathers the full state dict and writes a Hugging Face folder (rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    config = AutoConfig.from_pretrained(resolve_model_path(args.model_path))
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out, tmp = Path(args.output_dir) / "model", Path(args.output_dir) / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.load_state_dict(full_sd, assign=True)
    plain.tie_weights()
    plain.config.use_cache = True
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return replace_dir(tmp, out)


def all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


# ======================================================================================================== main
def main(args: Args):
    # ---- distributed setup and seeding ----
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    compute_dtype = pick_dtype(args.dtype, device)
    say = print if rank == 0 else (lambda *a, **k: None)

    # ---- prompts, reward functions, plan ----
    if args.prompts_per_step % world_size:
        raise SystemExit(
            f"error: --prompts-per-step {args.prompts_per_step} must be a multiple of the {world_size} processes"
        )
    if args.estimator != "reinforce_pp" and args.group_size < 2:
        raise SystemExit(f"error: --estimator {args.estimator} compares completions within a group: --group-size >= 2")
    my_prompts = args.prompts_per_step // world_size
    rows = my_prompts * args.group_size  # completions per process per step
    if rows % args.mini_batches:
        raise SystemExit(
            f"error: {rows} completions per process is not divisible by --mini-batches {args.mini_batches}"
        )
    if args.model_path == Args.model_path and not Path(args.model_path).is_dir():
        raise SystemExit(
            f"error: --model-path {args.model_path} (the default) does not exist yet: run `python sft.py` first, "
            "whose default run exports there, or pass another model, e.g. --model-path smollm2-135m"
        )
    vlm = is_vlm(args.model_path)
    if vlm and args.vllm:
        raise SystemExit("error: --vllm rollouts are for text models here; drop --vllm for a VLM")
    model, processor = load_vlm(args.model_path, device=device) if vlm else (None, None)  # master weights float32
    tokenizer = processor.tokenizer if vlm else load_tokenizer(args.model_path)
    train_items, _ = prompt_records(args.dataset)
    eval_items = []
    if args.eval_dataset and args.eval_samples:
        eval_items = [it for it in prompt_records(args.eval_dataset)[0] if it[1] is not None][: args.eval_samples]
    reward_names = list(args.rewards) + list(args.reward_fn) + (["remote"] if args.reward_url else [])
    reward_fns = [load_reward_fn(n) for n in list(args.rewards) + list(args.reward_fn)]
    if args.reward_url:
        reward_fns.append(remote_reward(args.reward_url, args.reward_timeout, args.reward_retries))
    weights = list(args.reward_weights) if args.reward_weights else [1.0] * len(reward_fns)
    if len(weights) != len(reward_fns) or not reward_fns:
        raise SystemExit(
            f"error: {len(reward_fns)} reward functions ({', '.join(reward_names)}) but {len(weights)} weights"
        )
    say(
        f"[plan] model {args.model_path}{' (VLM)' if vlm else ''} | {len(train_items)} prompts, {len(eval_items)} held-out | {args.max_steps} steps x "
        f"{args.prompts_per_step} prompts x G={args.group_size} | {args.estimator} + {args.variant} ({args.agg}), "
        f"mu={args.mu}, {args.mini_batches} mini-batch(es) | rewards {', '.join(reward_names)} | kl {args.kl_coef} | "
        f"world size {world_size} | {device} {compute_dtype}"
    )
    if args.dry_run:
        from transformers import AutoConfig

        config = model.config if vlm else AutoConfig.from_pretrained(resolve_model_path(args.model_path))
        say(
            f"[plan] {config.model_type}: {config.num_hidden_layers} layers, hidden {config.hidden_size}; dry run, exiting"
        )
        return None

    # ---- models: policy (and reference when KL is on), accuracy before, FSDP2 ----
    if not vlm:
        model = load_model(args.model_path, device=device, gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:  # a composed VLM checkpoints its LM's layers; a native VLM its own
        checkpoint_vlm(model)
    ref_model = None
    if args.kl_coef > 0:
        ref_model = load_vlm(args.model_path, device=device)[0] if vlm else load_model(args.model_path, device=device)
        ref_model.eval().requires_grad_(False)
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    results = {}
    if eval_items and not args.resume:
        if rank == 0:
            results["accuracy_before"] = answer_accuracy(model, tokenizer, eval_items, args, autocast, processor)
            say(f"[eval] held-out answer accuracy before training: {results['accuracy_before']:.3f}")
        barrier()
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(device.type, (world_size,))
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for m in [model] + ([ref_model] if ref_model is not None else []):
            # a VLM's vision encoder blocks too: the first ModuleList under vision/visual (as in sft.py)
            blocks = [
                b for n, b in m.named_modules() if isinstance(b, torch.nn.ModuleList) and re.search("vision|visual", n)
            ]
            for layer in [*m.get_decoder().layers, *(blocks[0] if vlm and blocks else [])]:
                fully_shard(layer, mesh=mesh, mp_policy=mp)
            fully_shard(m, mesh=mesh, mp_policy=mp)  # root: embeddings, final norm, LM head (a VLM's projector too)
            if hasattr(m, "vision_encoder"):  # ComposedVLM.generate bypasses forward: make it gather the root's weights
                register_fsdp_forward_method(m, "generate")
        autocast = nullcontext()  # FSDP2's mixed-precision policy casts instead
    engine = None
    if args.vllm:  # pragma: no cover - GPU only, untested
        from vllm import LLM

        engine = LLM(model=resolve_model_path(args.model_path), gpu_memory_utilization=0.3, enable_sleep_mode=True)
    # a VLM gets one lr per module (projector, vision, LM); a module at lr 0 is frozen and left out
    groups = param_groups(model, args.lr, args.lr_projector, args.lr_vision, None, args.weight_decay) if vlm else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(groups or trainable, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))

    step = 0
    if args.resume:
        found = checkpoint_dirs(args.output_dir)
        if found:
            step = load_checkpoint(found[-1], model, optimizer, scheduler, rank)
            say(f"[resume] from {found[-1]} at step {step}")
        else:
            say(f"[resume] no complete checkpoint in {args.output_dir}/checkpoints, starting fresh")
    logger = RunLogger(
        args.output_dir,
        asdict(args),
        enabled=rank == 0,
        track=args.track,
        project=args.wandb_project,
        run_name=args.run_name,
        resume_step=step if args.resume else None,
    )
    rollout_file = Path(args.output_dir) / "rollouts.jsonl"
    if args.save_rollouts and rank == 0 and not args.resume:
        rollout_file.unlink(missing_ok=True)
    stop_signal = []  # SIGTERM/SIGUSR1 (preemption): save at the end of the step and exit cleanly
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    # ---- training loop ----
    model.train()
    progress = tqdm(total=args.max_steps, initial=step, desc="grpo", disable=rank != 0, dynamic_ncols=True)
    while step < args.max_steps:
        t0 = time.time()
        # Seed everything from the step number: resume reproduces prompts and samples without replaying earlier steps.
        torch.manual_seed(args.seed * 1_000_003 + step * 7919 + rank)
        # -- rollouts: G completions per prompt, scored; DAPO dynamic sampling keeps groups whose rewards differ --
        kept, dropped = [], []  # groups: dicts of prompt ids, completions, rewards, ...
        verify_before = dict(VERIFY_STATS)
        reward_failures = [0] * len(reward_fns)
        n_generated_groups = 0
        for attempt in range(1 + (args.max_resample if args.dynamic_sampling else 0)):
            picker = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 101 + attempt)
            chosen = torch.randperm(len(train_items), generator=picker)[: args.prompts_per_step].tolist()
            mine = [train_items[i] for i in chosen[rank * my_prompts : (rank + 1) * my_prompts]]
            encoded = [encode_prompt(tokenizer, processor, m) for m, _ in mine for _ in range(args.group_size)]
            if engine is not None:  # pragma: no cover
                texts = [render_prompt(tokenizer, m) for m, _ in mine for _ in range(args.group_size)]
                completions, truncated, rollout_logps = vllm_generate(engine, model, texts, args)
            else:
                completions, truncated, rollout_logps = generate(
                    model, tokenizer, encoded, args, autocast, processor=processor
                )
            decoded = tokenizer.batch_decode(completions, skip_special_tokens=True)
            prompts_msgs = [m for m, _ in mine for _ in range(args.group_size)]
            answers = [a for _, a in mine for _ in range(args.group_size)]
            per_fn = []
            for k, fn in enumerate(reward_fns):
                values, failures = safe_rewards(fn, decoded, prompts_msgs, answers)
                per_fn.append(values)
                reward_failures[k] += failures
            per_fn_t = torch.tensor(per_fn, dtype=torch.float32).T  # [rows, n_fns]
            total = per_fn_t @ torch.tensor(weights, dtype=torch.float32)  # [rows]
            total += overlong_penalty(
                [len(c) for c in completions], args.max_new_tokens, args.overlong_buffer, args.overlong_penalty
            )
            for g in range(my_prompts):
                sl = slice(g * args.group_size, (g + 1) * args.group_size)
                group = dict(
                    prompts=encoded[sl],
                    completions=completions[sl],
                    truncated=truncated[sl],
                    rollout_logps=rollout_logps[sl],
                    reward=total[sl],
                    per_fn=per_fn_t[sl],
                    texts=decoded[sl],
                    prompt_text=render_prompt(tokenizer, prompts_msgs[sl.start]),
                    answer=answers[sl.start],
                )
                n_generated_groups += 1
                degenerate = args.dynamic_sampling and bool((group["reward"] == group["reward"][0]).all())
                (dropped if degenerate else kept).append(group)
            # every rank must take the same decision, or their generate calls (collectives under FSDP2) fall out of step
            missing = all_sum([max(0, my_prompts - len(kept))], device)[0]
            if missing == 0:
                break
        n_filtered_groups = n_generated_groups - len(kept)
        groups = (kept + dropped)[:my_prompts]  # short of informative groups: fill with dropped ones (zero advantage)
        t_rollout = time.time() - t0

        # -- advantages: on the whole global batch (reinforce_pp whitens over all of it) --
        row_prompts = [p for g in groups for p in g["prompts"]]  # encoded prompts (token ids, images) per row
        prompt_ids = [p["input_ids"] for p in row_prompts]
        completions = [c for g in groups for c in g["completions"]]
        rollout_logps = [lp for g in groups for lp in g["rollout_logps"]]
        truncated = torch.tensor([t for g in groups for t in g["truncated"]])  # [rows]
        rewards = torch.cat([g["reward"] for g in groups])  # [rows]
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.long)  # [rows]
        all_rewards, all_lengths = all_gather_cat(rewards.to(device)).cpu(), all_gather_cat(lengths.to(device)).cpu()
        length_mask = torch.arange(int(all_lengths.max())) < all_lengths[:, None]  # [world * rows, T]
        advantages_all = group_advantages(all_rewards, length_mask, args.group_size, args.estimator)
        seq_adv_all = advantages_all.sum(1) / all_lengths.clamp(min=1)  # one value per completion
        seq_adv = seq_adv_all[rank * rows : (rank + 1) * rows]  # [rows]
        batch = build_batch(prompt_ids, completions, tokenizer.pad_token_id, rollout_logps)
        if args.mask_truncated:
            batch["response_mask"] &= ~truncated[:, None]
        batch["advantages"] = seq_adv[:, None] * batch["response_mask"]  # [rows, L]

        # -- mu inner epochs over mini-batches; micro-batches accumulate with global-count normalisation --
        order_gen = torch.Generator().manual_seed(args.seed + step)
        reuse = args.mu > 1 or args.mini_batches > 1
        old_logps = torch.zeros(batch["input_ids"].shape)  # [rows, L]
        ref_logps = torch.zeros(batch["input_ids"].shape)
        mb_size = args.micro_batch_size

        def micro(rows_idx):
            mb = {k: v[rows_idx] for k, v in batch.items()}
            width = int(mb["attention_mask"].sum(1).max())  # trim right padding to this micro-batch's longest row
            mb = {k: v[:, :width].to(device) for k, v in mb.items()}
            images = None
            if processor is not None:  # a VLM: these rows' images, in row order
                images = processor.image_inputs([row_prompts[i] for i in rows_idx.tolist()], mb["input_ids"])
                images = {k: v.to(device) if torch.is_tensor(v) else v for k, v in images.items()}
            return mb, width, images

        if reuse or ref_model is not None:
            with torch.no_grad():
                for i in range(0, rows, mb_size):
                    idx = torch.arange(i, min(i + mb_size, rows))
                    mb, width, images = micro(idx)
                    with autocast:
                        if reuse:
                            old_logps[idx, :width] = token_logps(model, mb, args, image_inputs=images).float().cpu()
                        if ref_model is not None:
                            ref_logps[idx, :width] = token_logps(ref_model, mb, args, image_inputs=images).float().cpu()
        sums = dict(
            loss=0.0,
            kl=0.0,
            entropy=0.0,
            clip=0.0,
            approx_kl=0.0,
            tokens=0.0,
            engine_tokens=0.0,
            engine_abs_diff=0.0,
            engine_ratio=0.0,
            engine_max_diff=0.0,
        )
        n_updates, grad_norms = 0, []
        rows_per_mini = rows // args.mini_batches
        for epoch in range(args.mu):
            perm = torch.randperm(rows, generator=order_gen)
            for m in range(args.mini_batches):
                mini = perm[m * rows_per_mini : (m + 1) * rows_per_mini]
                mini = mini[torch.argsort(batch["attention_mask"][mini].sum(1))]  # similar lengths share micro-batches
                n_tok, n_seq = all_sum(
                    [float(batch["response_mask"][mini].sum()), float(batch["response_mask"][mini].any(1).sum())],
                    device,
                )
                for i in range(0, len(mini), mb_size):
                    idx = mini[i : i + mb_size]
                    mb, width, images = micro(idx)
                    with autocast:
                        logps, entropy = token_logps(model, mb, args, entropy=True, image_inputs=images)
                    old = old_logps[idx, :width].to(device) if reuse else logps.detach()
                    if epoch == 0 and "rollout_logps" in mb:  # the sampler's logps vs the training model's: logged only
                        diff = (old - mb["rollout_logps"]).float()[mb["response_mask"]]
                        sums["engine_tokens"] += diff.numel()
                        sums["engine_abs_diff"] += float(diff.abs().sum())
                        sums["engine_ratio"] += float(diff.exp().sum())
                        sums["engine_max_diff"] = max(
                            sums["engine_max_diff"], float(diff.abs().max()) if diff.numel() else 0.0
                        )
                    loss, stats = policy_loss(
                        logps,
                        old,
                        mb["advantages"],
                        mb["response_mask"],
                        variant=args.variant,
                        clip_low=args.clip_low,
                        clip_high=args.clip_high,
                        dual_clip=args.dual_clip,
                        agg=args.agg,
                        n_tokens=n_tok,
                        n_seqs=n_seq,
                        norm_len=args.max_new_tokens,
                    )
                    if ref_model is not None:
                        kl_tok = kl_penalty(logps, ref_logps[idx, :width].to(device), args.kl_estimator)
                        kl_term = aggregate(
                            kl_tok * mb["response_mask"],
                            mb["response_mask"],
                            args.agg,
                            n_tokens=n_tok,
                            n_seqs=n_seq,
                            norm_len=args.max_new_tokens,
                        )
                        loss = loss + args.kl_coef * kl_term
                        sums["kl"] += float((kl_tok.detach() * mb["response_mask"]).sum())
                    # FSDP2 averages gradients over ranks; scaling by world_size turns that into the global sum
                    (loss * world_size).backward()
                    n_mb_tok = float(mb["response_mask"].sum())
                    sums["loss"] += float(loss.detach())  # already over global counts: ranks' shares add up
                    sums["entropy"] += float((entropy.detach() * mb["response_mask"]).sum())
                    sums["clip"] += float(stats["clip_fraction"]) * n_mb_tok
                    sums["approx_kl"] += float(stats["approx_kl"]) * n_mb_tok
                    sums["tokens"] += n_mb_tok
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    trainable, args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
                )
                grad_norms.append(float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                n_updates += 1
        step += 1
        t_end = time.time()

        # -- metrics (global over ranks) --
        per_fn_rows = torch.cat([g["per_fn"] for g in groups])  # [rows, n_fns]
        n = float(world_size * rows)
        totals = all_sum(
            [
                float(rewards.sum()),
                float(rewards.square().sum()),
                float(lengths.sum()),
                float(truncated.sum()),
                sums["loss"],
                sums["entropy"],
                sums["clip"],
                sums["approx_kl"],
                sums["kl"],
                sums["tokens"],
                n_filtered_groups,
                n_generated_groups,
            ]
            + per_fn_rows.sum(0).tolist()
            + per_fn_rows.square().sum(0).tolist()
            + reward_failures,
            device,
        )
        (r_sum, r_sq, len_sum, trunc_sum, loss_sum, ent_sum, clip_sum, akl_sum, kl_sum, tok_sum, n_filt, n_gen) = (
            totals[:12]
        )
        k = len(reward_fns)
        fn_sum, fn_sq, fn_fail = totals[12 : 12 + k], totals[12 + k : 12 + 2 * k], totals[12 + 2 * k :]
        metrics = {
            "reward/mean": r_sum / n,
            "reward/std": math.sqrt(max(0.0, r_sq / n - (r_sum / n) ** 2)),
            "completion/length_mean": len_sum / n,
            "completion/truncated_fraction": trunc_sum / n,
            "train/loss": loss_sum / n_updates,
            "train/entropy": ent_sum / max(tok_sum, 1),
            "train/clip_fraction": clip_sum / max(tok_sum, 1),
            "train/approx_kl": akl_sum / max(tok_sum, 1),
            "train/grad_norm": sum(grad_norms) / len(grad_norms),
            "train/lr": scheduler.get_last_lr()[0],
            "rollout/filtered_group_fraction": n_filt / max(n_gen, 1),
            "time/rollout_share": t_rollout / (t_end - t0),
            "time/step_s": t_end - t0,
            "time/completions_per_s": n / (t_end - t0),
        }
        if ref_model is not None:
            metrics["train/kl"] = kl_sum / max(tok_sum, 1)
        engine_tok, engine_abs, engine_ratio = all_sum(
            [sums["engine_tokens"], sums["engine_abs_diff"], sums["engine_ratio"]], device
        )
        if engine_tok:  # how far the sampler's numerics drift from the training forward's (same weights)
            metrics["rollout/train_vs_sampler_ratio_mean"] = engine_ratio / engine_tok
            metrics["rollout/train_vs_sampler_abs_logp_diff_mean"] = engine_abs / engine_tok
            metrics["rollout/train_vs_sampler_abs_logp_diff_max"] = sums["engine_max_diff"]  # this rank's
        for name, s, sq, fail in zip(reward_names, fn_sum, fn_sq, fn_fail):
            metrics[f"reward/{name}_mean"] = s / n
            metrics[f"reward/{name}_std"] = math.sqrt(max(0.0, sq / n - (s / n) ** 2))
            metrics[f"reward/{name}_failures"] = fail
        if "math" in reward_names:
            metrics["train/accuracy"] = metrics["reward/math_mean"]
        verify_delta = {key: VERIFY_STATS[key] - verify_before.get(key, 0) for key in VERIFY_STATS}
        for key, v in verify_delta.items():
            if key != "verified":
                metrics[f"reward/math_verify_{key}"] = all_sum([v], device)[0]
        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps and eval_items and world_size == 1:
            metrics["eval/accuracy"] = answer_accuracy(model, tokenizer, eval_items, args, autocast, processor)
        logger.log(metrics, step)
        if args.save_rollouts and rank == 0:  # rank 0's share of the rollouts
            with rollout_file.open("a") as f:
                for j, g in enumerate(groups):
                    for q in range(args.group_size):
                        f.write(
                            json.dumps(
                                {
                                    "step": step,
                                    "prompt": g["prompt_text"],
                                    "completion": g["texts"][q],
                                    "answer": g["answer"],
                                    "reward": float(g["reward"][q]),
                                    "rewards": dict(zip(reward_names, g["per_fn"][q].tolist())),
                                    "advantage": float(seq_adv[j * args.group_size + q]),
                                    "truncated": bool(g["truncated"][q]),
                                }
                            )
                            + "\n"
                        )
        progress.update(1)
        progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", len=f"{metrics['completion/length_mean']:.0f}")

        preempted = torch.tensor(float(bool(stop_signal)), device=device)
        if dist.is_initialized():
            dist.all_reduce(preempted)  # every rank must agree to save, or the collective save hangs
        if preempted.item() or (args.save_every and step % args.save_every == 0) or step == args.max_steps:
            path = save_checkpoint(args.output_dir, step, model, optimizer, scheduler, rank, args.keep_checkpoints)
            if preempted.item():
                say(f"\n[signal] saved {path} at step {step}; exiting. Continue with --resume.")
                progress.close()
                logger.close()
                return {"step": step, "preempted": True}
    progress.close()

    # ---- export and answer accuracy after training ----
    if args.export:
        out = (
            export_vlm(model, processor, Path(args.output_dir) / "model", lambda: load_vlm(args.model_path)[0], rank)
            if vlm
            else export_hf(args, model, tokenizer, rank)
        )
        say(f"[export] {'VLM' if vlm else 'Hugging Face'} folder: {out}")
    if eval_items:
        if world_size == 1:
            results["accuracy_after"] = answer_accuracy(model, tokenizer, eval_items, args, autocast, processor)
        elif args.export and rank == 0:
            from transformers import AutoModelForCausalLM

            exported = (
                load_vlm(out, device=device)[0]
                if vlm
                else AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device)
            )
            results["accuracy_after"] = answer_accuracy(
                exported,
                tokenizer,
                eval_items,
                args,
                torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32),
                processor,
            )
        if "accuracy_after" in results:
            say(
                f"[eval] held-out answer accuracy after training: {results['accuracy_after']:.3f}"
                + (f" (before: {results['accuracy_before']:.3f})" if "accuracy_before" in results else "")
            )
            logger.log({f"eval/{k}": v for k, v in results.items()}, step)
    barrier()
    logger.close()
    if dist.is_initialized():
        dist.barrier()  # gloo aborts a rank whose peer tears down while it is still in a collective
        dist.destroy_process_group()
    return {"step": step, **results}


if __name__ == "__main__":
    main(cli(Args))
