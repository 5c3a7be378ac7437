"""ppo.py: PPO with a learned critic for language and vision-language models (RLHF-style), and the reward model it can
use (text models and VLMs), in one file.

One step (PPO: Schulman et al. 2017, arXiv:1707.06347; GAE: Schulman et al. 2016, arXiv:1506.02438; the LM recipe:
Ziegler et al. 2019, arXiv:1909.08593, Ouyang et al. 2022, arXiv:2203.02155):

    prompts --generate one completion each--> score r (verifiers | reward model | URL)
    no grad: log pi_old, log pi_ref, V_old at every response token
    token rewards   r_t = -beta * kl_t, plus r on the last response token        kl_t = log pi_old - log pi_ref (k1)
    A_t, R_t = gae(r_t, V_old, gamma, lambda);   A <- whiten(A)
    for mu epochs, for each mini-batch:                                     (one optimizer step per mini-batch)
        loss = policy_loss(log pi, log pi_old, A) + value_loss(V, V_old, R)     (critic only during warm-up steps)
    beta <- adaptive_kl_coef(beta, KL, --kl-target)                         (Ziegler et al. 2019; only with --kl-target)

Reward model (--mode rm): Bradley-Terry on preference pairs, loss = -log sigmoid(r(chosen) - r(rejected)), r = the
value head at the last non-pad token; exported as an AutoModelForSequenceClassification folder (num_labels=1). A VLM
reward model (image pairs) is a VLMCritic scoring each side with its image, exported as the VLM critic is.

Launch:
    python sft.py && python ppo.py                  # 1 CPU: PPO from sft.py's export, bundled arithmetic task, verifiers
    python ppo.py --model-path smollm2-135m         # without the SFT run
    python ppo.py --mode rm                         # reward model on data/arith_pref -> runs/rm/model
    python ppo.py --reward-model runs/rm/model --rewards                     # the learned reward only (no verifier)
    python ppo.py --reward-model runs/rm/model --critic-path runs/rm/model   # critic initialised from the reward model
    python ppo.py --kl-target 2.0                   # adaptive KL coefficient
    python ppo.py --mode rm --model-path runs/vqa_sft/model --dataset easy-vqa:pairs-train \
        --eval-dataset easy-vqa:pairs-test --output-dir runs/vqa_rm   # a VLM reward model on image pairs
    python ppo.py --model-path runs/vqa_sft/model --dataset easy-vqa:train --eval-dataset easy-vqa:test --rewards vqa \
        --max-new-tokens 8 --lr-vision 0 --output-dir runs/vqa_ppo   # a VLM on image prompts, frozen vision encoder
    python ppo.py --model-path Qwen/Qwen2.5-0.5B-Instruct --dataset my.jsonl --prompts-per-step 64   # 1 GPU
    torchrun --nproc_per_node=8 ppo.py --model-path Qwen/Qwen2.5-1.5B-Instruct --dataset my.jsonl   # N GPUs, FSDP2

Where this departs from the textbook / TRL's PPOTrainer / OpenRLHF:
  * Actor and critic are separate models (no shared trunk) trained by one AdamW with two parameter groups (--lr,
    --critic-lr), each clipped to --max-grad-norm on its own. There is no value-loss coefficient: scaling the loss of
    disjoint parameters only rescales their gradients, which Adam undoes.
  * The critic starts from the policy's weights with a zero value head (values 0 at first), so PPO runs with verifiers
    alone; TRL and OpenRLHF start it from the reward model, which is `--critic-path runs/rm/model` here.
  * The KL penalty sits in the per-token reward (k1 by default, as in TRL and OpenRLHF's PPO), not in the loss as in
    grpo.py. It is measured with the old logps, recomputed by the training model after generation (the sampler's own
    logprobs are not used), and the adaptive controller steers the per-sequence KL sum.
  * The reward model reads the decoded completion through its own chat template, so its tokenizer may differ from the
    policy's (TRL feeds it the policy's token ids). A truncated completion is scored as it stands: no EOS penalty.
  * Losses are divided by the response-token count of the whole global mini-batch (as in grpo.py), so gradient
    accumulation and the number of processes do not change the gradient. Advantages are whitened over the global batch.
  * GAE treats each completion as one episode: the last response token bootstraps from 0, truncated or not.
  * A VLM's critic is a second copy of the VLM plus a zero linear head on its final hidden states (VLMCritic), so
    values see the image; it trains at --critic-lr throughout (--lr-projector/--lr-vision set the actor's lrs only).
  * Rollouts use Hugging Face `generate` on the training model (synced_gpus under FSDP2, as in grpo.py); --vllm is an
    optional, untested-without-GPU path.
"""

from __future__ import annotations

import copy
import math
import os
import random
import re
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from common.data import content_text, detect_format, load_records, preference_messages, to_messages
from common.logprob import forward_hidden, sequence_logprobs
from common.metrics import RunLogger, cli, exact_match
from common.models import (
    barrier,
    checkpoint_dirs,
    load_checkpoint,
    load_model,
    load_tokenizer,
    pick_attn_implementation,
    pick_dtype,
    prepare_model,
    replace_dir,
    resolve_model_path,
    save_checkpoint,
)
from common.rewards import answer_correct, load_reward_fn, remote_reward, safe_rewards
from common.vision import (
    checkpoint_vlm,
    export_vlm,
    gather_unsharded,
    is_vlm,
    load_vlm,
    param_groups,
    save_vlm,
    vlm_generate,
)

DEFAULT_MODEL = "runs/sft/model"
MODE_DEFAULTS = {  # field: (ppo default, rm default)
    "dataset": ("data/arith/train.jsonl", "data/arith_pref/train.jsonl"),
    "eval_dataset": ("data/arith/test.jsonl", "data/arith_pref/test.jsonl"),
    "output_dir": ("runs/ppo", "runs/rm"),
    "max_steps": (16, 40),
    "lr": (1e-5, 5e-5),
}


@dataclass
class Args:
    mode: Literal["ppo", "rm"] = "ppo"
    """ppo: train the policy on rewards; rm: train a reward model on preference pairs (Bradley-Terry) and export it"""
    model_path: str = DEFAULT_MODEL
    """policy (ppo) or reward-model trunk (rm): `python sft.py`'s export, an alias (smollm2-135m), an HF folder or hub id"""
    critic_path: str | None = None
    """critic start: None = the policy plus a zero value head; a sequence-classification folder (runs/rm/model) keeps its head"""
    reward_model: str | None = None
    """scalar reward model from --mode rm (e.g. runs/rm/model: a sequence-classification folder, or a VLM one that scores
    the prompt's image too); its score joins the reward"""
    dataset: str | None = None
    """ppo: prompts (messages or message+answer; image parts need a VLM --model-path, e.g. easy-vqa:train), default
    data/arith/train.jsonl; rm: pairs, default data/arith_pref/train.jsonl"""
    eval_dataset: str | None = None
    """held-out set (ppo: greedy answer accuracy, rm: pair accuracy, before/after); default: the matching test.jsonl"""
    output_dir: str | None = None
    """default runs/ppo or runs/rm: checkpoints, metrics.jsonl, exports (<output-dir>/model; ppo also <output-dir>/critic,
    for a VLM a save_vlm folder plus value_head.safetensors)"""
    config: str | None = None
    """a .yaml or .json file of field: value defaults; command-line flags override them"""
    dry_run: bool = False
    """validate arguments, read the data and the model config, print the plan and exit"""
    seed: int = 0
    """seed for prompt/pair order and sampling"""
    max_steps: int | None = None
    """ppo: rollout steps (default 16); rm: optimizer steps (default 40, one epoch of the bundled pairs)"""
    prompts_per_step: int = 16
    """ppo: prompts per rollout step over all processes, one completion each"""
    pairs_per_step: int = 8
    """rm: preference pairs per optimizer step over all processes"""
    max_new_tokens: int = 96
    """completion budget; longer completions are cut"""
    max_len: int = 512
    """rm: chats longer than this many tokens are skipped"""
    temperature: float = 1.0
    """sampling temperature of rollouts (and of the logps the loss uses)"""
    top_p: float = 1.0
    """nucleus sampling threshold of rollouts"""
    lr: float | None = None
    """actor (ppo, default 1e-5) or reward-model (rm, default 5e-5) learning rate; AdamW, constant after warmup"""
    critic_lr: float = 5e-5
    """critic learning rate"""
    lr_projector: float | None = None
    """VLM only: the actor's projector lr (default --lr); 0 freezes it"""
    lr_vision: float | None = None
    """VLM only: the actor's vision-encoder lr (default --lr); 0 freezes it"""
    warmup_steps: int = 0
    """linear warmup over this many optimizer steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold, per model (0 disables)"""
    mu: int = 2
    """PPO epochs over each rollout batch"""
    mini_batches: int = 2
    """optimizer steps per epoch: the rollout batch is split into this many mini-batches"""
    micro_batch_size: int = 8
    """sequences per forward/backward per process (gradient accumulation inside a mini-batch)"""
    clip_low: float = 0.2
    """policy ratio clip below 1 (1 - clip_low)"""
    clip_high: float = 0.2
    """policy ratio clip above 1 (1 + clip_high)"""
    value_clip: float | None = 0.2
    """value clipping: new values stay within this distance of the old ones in the clipped term (None disables)"""
    gamma: float = 1.0
    """discount over the response tokens"""
    lam: float = 0.95
    """GAE lambda (1: Monte-Carlo returns, 0: one-step TD)"""
    whiten_advantages: bool = True
    """normalise advantages to mean 0 / std 1 over the global batch's response tokens"""
    critic_warmup_steps: int = 0
    """only the critic trains during the first N rollout steps (the policy waits for useful values)"""
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty in the reward (initial value with --kl-target); 0 loads no reference"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token KL estimator in the reward (see kl_penalty)"""
    kl_target: float | None = None
    """adaptive KL: steer beta so that the mean per-sequence KL approaches this (Ziegler et al. 2019); None: fixed beta"""
    kl_horizon: int = 10000
    """adaptive KL horizon (in samples): how fast beta moves"""
    rewards: tuple[str, ...] = ("math", "format")
    """reward functions summed into the reward: built-ins (math, format, exact, vqa) or module:function / file.py:function"""
    reward_weights: tuple[float, ...] | None = None
    """one weight per reward (functions, then --reward-model, then --reward-url); default all 1"""
    reward_url: str | None = None
    """HTTP reward: POST {"prompts", "completions", "answers"} JSON, expects {"rewards": [...]}"""
    dtype: str = "auto"
    """compute dtype: auto (bf16 where the hardware has it), float32 or bfloat16; master weights stay float32"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory (actor and critic)"""
    eval_samples: int = 100
    """held-out prompts (ppo) or pairs (rm) evaluated before and after training (0 disables the evaluation)"""
    save_every: int = 0
    """save a resumable checkpoint every N steps (0: only on preemption and at the end)"""
    keep_checkpoints: int = 2
    """how many recent checkpoints to keep"""
    resume: bool = False
    """continue from the newest complete checkpoint in <output-dir>/checkpoints (ppo)"""
    export: bool = True
    """write Hugging Face folders at the end: <output-dir>/model (policy or reward model), <output-dir>/critic"""
    vllm: bool = False
    """generate rollouts with a colocated vLLM engine (GPU only; UNTESTED: no GPU was available when written)"""
    track: bool = False
    """log to Weights & Biases (offline mode when no account is configured)"""
    wandb_project: str = "cleanpost"
    """wandb project name"""
    run_name: str | None = None
    """wandb run name"""


# =============================================================================================== the algorithm
def gae(token_rewards, values, response_mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438): (advantages, returns), all [B, T].

    token_rewards, values [B, T] float; response_mask [B, T] bool. Positions outside the mask are skipped (they neither
    receive nor break the recursion), so each sequence runs over its own response tokens t_1 < ... < t_n:
        delta_k = r_k + gamma V_{k+1} - V_k,   A_k = delta_k + gamma lam A_{k+1},   V_{n+1} = A_{n+1} = 0
    (the last response token bootstraps from 0: the completion is the whole episode). returns = A + V on the mask;
    both outputs are 0 elsewhere. lam = 1 gives Monte-Carlo returns minus values; lam = 0 one-step TD residuals."""
    mask = response_mask.bool()
    rewards, values = token_rewards.float(), values.float()
    advantages = torch.zeros_like(values)  # [B, T]
    next_value = torch.zeros_like(values[:, 0])  # [B]: V of the next response token (0 after the last)
    next_adv = torch.zeros_like(values[:, 0])  # [B]
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        m = mask[:, t]
        advantages[:, t] = torch.where(m, adv, 0.0)
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(values, mask, shift_mean=True, all_reduce=False, eps=1e-8):
    """(values - mean) / sqrt(var + eps) over the mask (variance with Bessel's correction, as TRL's masked_whiten);
    shift_mean=False adds the mean back (scale only). 0 outside the mask. all_reduce: statistics over all processes."""
    maskf = mask.to(values.dtype)
    stats = torch.stack([(values * maskf).sum(), (values.square() * maskf).sum(), maskf.sum()]).double()
    if all_reduce and dist.is_initialized():
        dist.all_reduce(stats)
    total, total_sq, n = stats.tolist()
    mean = total / max(n, 1.0)
    var = max(total_sq - n * mean * mean, 0.0) / max(n - 1, 1.0)
    out = (values - mean) / math.sqrt(var + eps)
    return (out if shift_mean else out + mean) * maskf


def value_loss(values, old_values, returns, response_mask, clip, *, n_tokens=None):
    """(loss, clip_fraction) of the critic, as in PPO2 / TRL / OpenRLHF: 0.5 * masked mean of
    max((V - R)^2, (V_old + clamp(V - V_old, -clip, clip) - R)^2). values, old_values, returns [B, T]; clip=None: plain
    squared error. n_tokens: divisor (default: this batch's mask count; pass the global mini-batch count under
    accumulation). clip_fraction: share of tokens where the clipped term is the larger (its gradient is cut)."""
    maskf = response_mask.to(values.dtype)
    n_tokens = maskf.sum() if n_tokens is None else n_tokens
    unclipped = (values - returns).square()
    if clip is None:
        token_loss, is_clipped = unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns).square()
        token_loss, is_clipped = torch.maximum(unclipped, clipped), clipped > unclipped
    loss = 0.5 * (token_loss * maskf).sum() / max(float(n_tokens), 1.0)
    clip_fraction = (is_clipped.to(maskf.dtype) * maskf).sum() / maskf.sum().clamp(min=1)
    return loss, clip_fraction.detach()


def policy_loss(logps, old_logps, advantages, response_mask, *, clip_low=0.2, clip_high=0.2, n_tokens=None):
    """(loss, stats): PPO's clipped surrogate per token, -min(rho A, clip(rho, 1-clip_low, 1+clip_high) A),
    rho = pi/pi_old (Schulman et al. 2017), token mean over n_tokens (default: this batch's count). Tensors [B, T].
    stats: clip_fraction (share of tokens where clipping removed the gradient), approx_kl (k3 of pi_old vs pi)."""
    mask = response_mask.bool()
    maskf = mask.to(logps.dtype)
    n_tokens = maskf.sum() if n_tokens is None else n_tokens
    log_ratio = (logps - old_logps) * maskf  # [B, T]
    ratio = torch.exp(log_ratio)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = (torch.maximum(unclipped, clipped) * maskf).sum() / max(float(n_tokens), 1.0)
    with torch.no_grad():
        clip_fraction = ((clipped > unclipped) & mask).sum() / mask.sum().clamp(min=1)
        approx_kl = ((torch.exp(-log_ratio) - 1 + log_ratio) * maskf).sum() / maskf.sum().clamp(min=1)
    return loss, {"clip_fraction": clip_fraction, "approx_kl": approx_kl}


def kl_penalty(logps, ref_logps, estimator):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, [B, T] (Schulman 2020, "Approximating KL divergence"):
    k1 = log pi - log pi_ref; k2 = (log pi - log pi_ref)^2 / 2; k3 = pi_ref/pi - 1 - log(pi_ref/pi), clamped as in verl."""
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        neg = (-log_ratio).clamp(-20, 20)
        return (torch.exp(neg) - 1 - neg).clamp(max=10)
    raise ValueError(f"estimator must be k1, k2 or k3, got {estimator!r}")


def adaptive_kl_coef(coef, kl, target, n_samples, horizon):
    """Ziegler et al. 2019's proportional controller: e = clip(KL / target - 1, -0.2, 0.2),
    beta <- beta * (1 + e * n_samples / horizon). kl: the mean per-sequence KL of the batch just trained on."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_samples / horizon)


def bradley_terry_loss(chosen_scores, rejected_scores):
    """(loss, accuracy) of a reward model on pairs [N]: mean -log sigmoid(r_chosen - r_rejected) (Bradley & Terry 1952;
    Ouyang et al. 2022), accuracy = share of pairs with r_chosen > r_rejected."""
    margin = chosen_scores.float() - rejected_scores.float()
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean().detach()


# ========================================================================================= value models (critic, RM)
def load_value_model(path, pad_token_id, device, *, zero_new_head, gradient_checkpointing=False):
    """AutoModelForSequenceClassification with one label: a transformer plus a linear `score` head. From a causal-LM
    folder the head is new (zeroed with zero_new_head: the critic's values start at 0); from a sequence-classification
    folder (a reward model) it is kept."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers import logging as hf_logging

    resolved = resolve_model_path(path)
    has_head = any(
        a.endswith("ForSequenceClassification") for a in AutoConfig.from_pretrained(resolved).architectures or []
    )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is expected here
    model = AutoModelForSequenceClassification.from_pretrained(
        resolved, num_labels=1, dtype=torch.float32, attn_implementation=pick_attn_implementation(device)
    )
    hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = pad_token_id
    if zero_new_head and not has_head:
        torch.nn.init.zeros_(model.score.weight)
    return prepare_model(model.to(device), gradient_checkpointing)


class VLMCritic(torch.nn.Module):
    """A VLM's critic: a copy of the policy VLM (so values see the image) and a zero-initialised linear `score` head
    on its final-norm hidden states (values start at 0, as the text critic's). Exported as a save_vlm folder plus
    value_head.safetensors ({"weight": [1, H]})."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm
        self.score = torch.nn.Linear(vlm.config.get_text_config().hidden_size, 1, bias=False)
        torch.nn.init.zeros_(self.score.weight)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **image_inputs):
        hidden = forward_hidden(
            self.vlm, input_ids, attention_mask=attention_mask, position_ids=position_ids, **image_inputs
        )  # [B, L, H]
        return self.score(hidden)  # [B, L, 1]


def token_values(value_model, mb, image_inputs=None):
    """[B, L] float32: the value head at every position. The model's own output pools one position per row, so the
    head's per-token output is caught with a forward hook (calling the whole model keeps FSDP2's root hooks working).
    image_inputs: a VLMCritic's processor.image_inputs for these rows (they may override position_ids)."""
    captured = []
    handle = value_model.score.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        value_model(
            input_ids=mb["input_ids"],
            use_cache=False,
            **{"attention_mask": mb["attention_mask"], "position_ids": mb["position_ids"], **(image_inputs or {})},
        )
    finally:
        handle.remove()
    return captured[0].squeeze(-1).float()


def load_vlm_critic(path, device):
    """(VLMCritic, processor) of a VLM folder: its value_head.safetensors when there is one (an exported critic or
    reward model), else a zero head."""
    from safetensors.torch import load_file

    vlm, processor = load_vlm(path, device=device)
    critic = VLMCritic(vlm).to(device)
    head = Path(str(path)) / "value_head.safetensors"
    if head.exists():
        critic.score.weight.data.copy_(load_file(str(head))["weight"])
    return critic, processor


def last_token_scores(value_model, mb, image_inputs=None):
    """[B]: the value head at each right-padded row's last real token (what the exported model's HF forward returns)."""
    last = mb["attention_mask"].sum(1) - 1  # [B]
    return token_values(value_model, mb, image_inputs).gather(1, last[:, None]).squeeze(1)


def row_scores(value_model, rows, pad_id, device, processor=None):
    """[B] last-token scores of token lists, or with a VLM processor of chats ({"chat", "base_dir"}), encoded here with
    their images (pixels are loaded per batch, not held for a whole data set)."""
    if processor is None:
        return last_token_scores(value_model, pad_rows(rows, pad_id, device))
    examples = [processor(r["chat"], base_dir=r["base_dir"]) for r in rows]
    mb = pad_rows([e["input_ids"] for e in examples], pad_id, device)
    images = processor.image_inputs(examples, mb["input_ids"])  # each row's own images, in row order
    return last_token_scores(value_model, mb, {k: v.to(device) if torch.is_tensor(v) else v for k, v in images.items()})


def chat_ids(tokenizer, messages):
    """Token ids of a whole chat rendered by the tokenizer's template (text parts only)."""
    text = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": content_text(m["content"])} for m in messages], tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pad_rows(rows, pad_id, device):
    """Right-padded input_ids, attention_mask, position_ids [B, L] of token lists."""
    L = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((len(rows), L), dtype=torch.long)  # [B, L]
    for i, r in enumerate(rows):
        input_ids[i, : len(r)], attention_mask[i, : len(r)] = torch.tensor(r), 1
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "position_ids": position_ids.to(device),
    }


@torch.no_grad()
def score_rows(value_model, rows, pad_id, device, autocast, batch_size, processor=None):
    """[len(rows)] float32 last-token scores of rows (see row_scores), batch by batch."""
    out = []
    for i in range(0, len(rows), batch_size):
        with autocast:
            out.append(row_scores(value_model, rows[i : i + batch_size], pad_id, device, processor).float().cpu())
    return torch.cat(out)


def preference_pairs(source, tokenizer, max_len, processor=None, limit=None):
    """[(chosen, rejected)] of a preference file's first `limit` records: token lists, or with a VLM processor chats
    for row_scores; pairs with a side over max_len tokens are skipped. Image pairs need a VLM, and a VLM image pairs."""
    records = load_records(source)[:limit]
    if detect_format(records) != "preference":
        raise SystemExit(f"error: {source}: --mode rm needs preference records (prompt, chosen, rejected)")
    kept = []
    for r in records:
        chats = preference_messages(r)
        if any(
            isinstance(m["content"], list) and any(p.get("type") in ("image", "image_url") for p in m["content"])
            for m in chats[0]
        ) != (processor is not None):
            raise SystemExit(
                f"error: {r.get('_where', source)}: "
                + (
                    "the pair holds no image but --model-path is a VLM (a VLM reward model trains on image pairs)"
                    if processor
                    else "the pair holds an image but --model-path is a text model; pass a VLM folder"
                )
            )
        if processor is None:
            sides = [chat_ids(tokenizer, m) for m in chats]
            sides = sides if max(len(ids) for ids in sides) <= max_len else [None]
        else:  # a side over max_len comes back None (overlong="drop")
            sides = [
                processor(m, base_dir=r.get("_dir", "."), max_len=max_len, overlong="drop")
                and {"chat": m, "base_dir": r.get("_dir", ".")}
                for m in chats
            ]
        if None not in sides:
            kept.append(tuple(sides))
    if not kept:
        raise SystemExit(f"error: {source}: every pair is longer than --max-len {max_len}")
    return kept


# ====================================================================================== rollout (as in grpo.py)
def prompt_records(source):
    """(prompt messages, reference answer or None) per record: the chat minus its final assistant turn. Relative image
    paths are resolved against the data file's folder here, so a prompt carries everything it needs."""
    records = load_records(source)
    fmt = detect_format(records)
    if fmt == "preference":
        raise SystemExit(
            f"error: {source}: preference data is for --mode rm; PPO needs prompts (messages or message+answer)"
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
        if messages:  # answers stay as given: a VQA answer may be a list of annotators' answers
            out.append((messages, r.get("answer")))
    return out


def render_prompt(tokenizer, messages):
    text_messages = [{"role": m["role"], "content": content_text(m["content"])} for m in messages]
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


@torch.no_grad()
def generate(model, tokenizer, prompts, args, autocast, *, processor=None, greedy=False, synced=None):
    """Completions for encoded prompts (encode_prompt): (completion token lists (EOS kept, pads cut), truncated flags).
    Left-padded batch, KV cache, stops at EOS. Under FSDP2, synced_gpus keeps every rank stepping until all are done;
    pass synced=False when only this rank generates (rank-0 eval on an unsharded model)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(p["input_ids"]) for p in prompts)  # left-pad: generation appends on the right
    input_ids = torch.tensor(
        [[tokenizer.pad_token_id] * (width - len(p["input_ids"])) + p["input_ids"] for p in prompts], device=device
    )  # [B, T]
    attention_mask = (
        torch.arange(width) >= width - torch.tensor([len(p["input_ids"]) for p in prompts])[:, None]
    ).long()
    attention_mask = attention_mask.to(device)  # [B, T]
    eos = stop_ids(tokenizer, model)
    sampling = {} if greedy else dict(temperature=args.temperature, top_p=args.top_p, top_k=0)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=not greedy,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
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
            new_tokens = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)[:, width:]
    model.train(was_training)
    completions, truncated = [], []
    for row in new_tokens.tolist():
        end = next((i for i, t in enumerate(row) if t in eos), None)
        completions.append(row if end is None else row[: end + 1])
        truncated.append(end is None)
    return completions, truncated


def vllm_generate(engine, model, prompts, args):  # pragma: no cover - GPU only
    """UNTESTED (no GPU when written). Colocated vLLM: load the policy's current full weights, then sample."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from vllm import SamplingParams

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    engine.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(state.items())
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens)
    outs = engine.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].finish_reason == "length" for o in outs]


def build_batch(prompt_ids, completions, pad_id):
    """Right-padded training rows prompt + completion: input_ids, labels, attention_mask, position_ids [B, L] and
    response_mask [B, L], True at t when logps[:, t] (which scores token t+1) scores a completion token; the critic's
    value at t is the value of that same state (the prefix up to t)."""
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
    return dict(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        position_ids=position_ids,
        response_mask=response_mask,
    )


def token_logps(model, mb, args, entropy=False, image_inputs=None):
    """log pi(completion tokens) [B, L] at the sampling temperature (and entropy [B, L]), via common/logprob.py.
    image_inputs: a VLM's processor.image_inputs for these rows (they may override position_ids, as Qwen-VL's do)."""
    kwargs = {"position_ids": mb["position_ids"], "attention_mask": mb["attention_mask"], **(image_inputs or {})}
    return sequence_logprobs(
        model, mb["input_ids"], mb["labels"], temperature=args.temperature, return_entropy=entropy, **kwargs
    )


def is_correct(text, answer, vlm) -> bool:
    """Held-out check: a text model's answers as sft.py's eval checks them; a VLM's (VQA) by exact match after
    normalisation (grpo.py picks by --rewards instead; here text runs keep their check whatever the rewards)."""
    return exact_match(text.strip(), answer) > 0 if vlm else answer_correct(text, str(answer))


@torch.no_grad()
def answer_accuracy(model, tokenizer, items, args, autocast, processor=None, batch_size=25) -> float:
    """Fraction of held-out prompts whose greedy answer is_correct."""
    correct = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        completions, _ = generate(
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
        correct += sum(is_correct(t, a, processor is not None) for t, (_, a) in zip(texts, chunk))
    return correct / max(1, len(items))


# ============================================================================================ distributed, export
def export_hf(model, tokenizer, out, rank, auto_class) -> Path | None:
    """Gathers the full state dict and writes a Hugging Face folder of `auto_class` (rank 0), via out.tmp + rename."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    config = copy.deepcopy(model.config)
    config.use_cache = True
    with torch.device("meta"):
        plain = auto_class.from_config(config, dtype=torch.float32)
    out, tmp = Path(out), Path(f"{out}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.load_state_dict(full_sd, assign=True)
    plain.tie_weights()
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return replace_dir(tmp, out)


def export_vlm_critic(args, critic, processor, out, rank) -> Path | None:
    """A VLMCritic's VLM as a save_vlm folder plus its head in <out>/value_head.safetensors ({"weight": [1, H]})."""
    plain = gather_unsharded(critic, lambda: VLMCritic(load_vlm(args.model_path)[0]), rank)
    if plain is None:
        return None
    # the head goes into the folder before it is published: never a critic folder without its head
    head = {"weight": plain.score.weight.detach().float().cpu().contiguous()}
    return save_vlm(plain.vlm, processor, out, extra_tensors={"value_head.safetensors": head})


def all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def shard(models, device, compute_dtype, world_size):
    """FSDP2: fully_shard each decoder layer (and a VLM's vision-encoder blocks), then the root (embeddings, final norm,
    heads, a VLM's projector), as in grpo.py."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for m in models:
        inner = m.vlm if isinstance(m, VLMCritic) else m
        base = getattr(inner, "base_model", None)  # text: LlamaModel; a VLM's decoder sits under get_decoder()
        decoder = base if hasattr(base, "layers") else inner.get_decoder()
        # a VLM's vision encoder blocks: the first ModuleList under vision/visual (as in sft.py)
        blocks = [
            b for n, b in inner.named_modules() if isinstance(b, torch.nn.ModuleList) and re.search("vision|visual", n)
        ]
        for layer in [*decoder.layers, *(blocks[0] if blocks else [])]:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(m, mesh=mesh, mp_policy=mp)
        if hasattr(m, "vision_encoder"):  # ComposedVLM.generate bypasses forward: make it gather the root's weights too
            register_fsdp_forward_method(m, "generate")


def grad_norm(params, max_norm) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ======================================================================================================== main
def main(args: Args):
    # ---- mode defaults, distributed setup, seeding ----
    args = replace(args, **{k: v[args.mode == "rm"] for k, v in MODE_DEFAULTS.items() if getattr(args, k) is None})
    if args.model_path == DEFAULT_MODEL and not Path(DEFAULT_MODEL).exists():
        raise SystemExit(
            f"error: {DEFAULT_MODEL} not found: run `python sft.py` first (its default run exports there), "
            "or pass --model-path smollm2-135m"
        )
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
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    if args.mode == "rm":
        return train_reward_model(args, world_size, rank, device, compute_dtype, autocast, say)

    # ---- prompts, rewards, plan ----
    if args.prompts_per_step % world_size:
        raise SystemExit(
            f"error: --prompts-per-step {args.prompts_per_step} must be a multiple of the {world_size} processes"
        )
    rows = args.prompts_per_step // world_size  # completions per process per step
    if rows % args.mini_batches:
        raise SystemExit(
            f"error: {rows} completions per process is not divisible by --mini-batches {args.mini_batches}"
        )
    vlm = is_vlm(args.model_path)
    if vlm and args.vllm:
        raise SystemExit("error: --vllm rollouts are for text models here; drop --vllm for a VLM")
    if vlm and args.critic_path and not is_vlm(args.critic_path):
        raise SystemExit(
            f"error: --critic-path {args.critic_path}: a VLM policy needs a VLM critic (or no --critic-path)"
        )
    if args.reward_model and is_vlm(args.reward_model) and not vlm:
        raise SystemExit(
            f"error: --reward-model {args.reward_model} is a VLM reward model, which scores a prompt with its "
            "image, but --model-path is a text model (its prompts hold no images)"
        )
    model, processor = load_vlm(args.model_path, device=device) if vlm else (None, None)  # master weights float32
    tokenizer = processor.tokenizer if vlm else load_tokenizer(args.model_path)
    train_items = prompt_records(args.dataset)
    eval_items = []
    if args.eval_dataset and args.eval_samples:
        eval_items = [it for it in prompt_records(args.eval_dataset) if it[1] is not None][: args.eval_samples]
    reward_names = (
        list(args.rewards) + (["reward_model"] if args.reward_model else []) + (["remote"] if args.reward_url else [])
    )
    reward_fns = [load_reward_fn(n) for n in args.rewards]
    if args.reward_url:
        remote = remote_reward(args.reward_url)  # 30 s per attempt, 3 retries
    weights = torch.tensor(args.reward_weights or [1.0] * len(reward_names), dtype=torch.float32)
    if len(weights) != len(reward_names) or not reward_names:
        listed = ", ".join(reward_names) or "none: pass --rewards, --reward-model or --reward-url"
        raise SystemExit(f"error: {len(reward_names)} rewards ({listed}) but {len(weights)} weights")
    if args.kl_target is not None and args.kl_coef <= 0:
        raise SystemExit("error: --kl-target adapts --kl-coef multiplicatively: give a starting --kl-coef > 0")
    say(
        f"[plan] ppo | model {args.model_path}{' (VLM)' if vlm else ''} | critic {args.critic_path or 'policy + zero head'} | {len(train_items)} "
        f"prompts, {len(eval_items)} held-out | {args.max_steps} steps x {args.prompts_per_step} prompts | mu={args.mu}, "
        f"{args.mini_batches} mini-batch(es), critic warm-up {args.critic_warmup_steps} | rewards {', '.join(reward_names)}"
        f" | kl {args.kl_estimator} x {args.kl_coef}{f' -> target {args.kl_target}' if args.kl_target else ''} | "
        f"world size {world_size} | {device} {compute_dtype}"
    )
    if args.dry_run:
        return None

    # ---- models: actor, critic, reference, reward model; accuracy before; FSDP2 ----
    if vlm:  # the critic: a second copy of the VLM (values must see the image) + a zero value head (or an exported one)
        critic = load_vlm_critic(args.critic_path or args.model_path, device)[0]
        for vlm_model in (model, critic.vlm) if args.gradient_checkpointing else ():
            checkpoint_vlm(vlm_model)
    else:
        model = load_model(args.model_path, device=device, gradient_checkpointing=args.gradient_checkpointing)
        critic = load_value_model(
            args.critic_path or args.model_path,
            tokenizer.pad_token_id,
            device,
            zero_new_head=True,
            gradient_checkpointing=args.gradient_checkpointing,
        )
    ref_model = None
    if args.kl_coef > 0:
        ref_model = load_vlm(args.model_path, device=device)[0] if vlm else load_model(args.model_path, device=device)
        ref_model.eval().requires_grad_(False)
    reward_model = rm_tokenizer = rm_processor = None
    if args.reward_model and is_vlm(args.reward_model):  # a VLM reward model (--mode rm): it reads the images too
        reward_model, rm_processor = load_vlm_critic(args.reward_model, device)
        rm_tokenizer = rm_processor.tokenizer
    elif args.reward_model:
        rm_tokenizer = load_tokenizer(args.reward_model)
        reward_model = load_value_model(args.reward_model, rm_tokenizer.pad_token_id, device, zero_new_head=False)
    if reward_model is not None:
        reward_model.eval().requires_grad_(False)
    results = {}
    if eval_items and not args.resume:
        if rank == 0:
            results["accuracy_before"] = answer_accuracy(model, tokenizer, eval_items, args, autocast, processor)
            say(f"[eval] held-out answer accuracy before training: {results['accuracy_before']:.3f}")
        barrier()
    if world_size > 1:
        shard([m for m in (model, critic, ref_model, reward_model) if m is not None], device, compute_dtype, world_size)
        autocast = nullcontext()  # FSDP2's mixed-precision policy casts instead
    engine = None
    if args.vllm:  # pragma: no cover - GPU only, untested
        from vllm import LLM

        engine = LLM(model=resolve_model_path(args.model_path), gpu_memory_utilization=0.3, enable_sleep_mode=True)
    # One module, one optimizer (a parameter group per model), so save_checkpoint/load_checkpoint cover both exactly;
    # the KL coefficient rides along as a buffer (the adaptive controller changes it).
    state = torch.nn.ModuleDict({"actor": model, "critic": critic})
    state.register_buffer("kl_coef", torch.tensor(float(args.kl_coef), dtype=torch.float64, device=device))
    # a VLM actor gets one lr per module (projector, vision, LM); a module at lr 0 is frozen and left out
    actor_groups = (
        param_groups(model, args.lr, args.lr_projector, args.lr_vision, None, args.weight_decay) if vlm else None
    )
    actor_params = [p for p in model.parameters() if p.requires_grad]
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        (actor_groups or [{"params": actor_params, "lr": args.lr}]) + [{"params": critic_params, "lr": args.critic_lr}],
        weight_decay=args.weight_decay,
        betas=(0.9, 0.99),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    step = 0
    if args.resume:
        found = checkpoint_dirs(args.output_dir)
        if found:
            step = load_checkpoint(found[-1], state, optimizer, scheduler, rank)
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
    stop_signal = []  # SIGTERM/SIGUSR1 (preemption): save at the end of the step and exit cleanly
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    # ---- training loop ----
    model.train()
    critic.train()
    mb_size = args.micro_batch_size
    progress = tqdm(total=args.max_steps, initial=step, desc="ppo", disable=rank != 0, dynamic_ncols=True)
    while step < args.max_steps:
        t0 = time.time()
        # Seed everything from the step number: resume reproduces prompts and samples without replaying earlier steps.
        torch.manual_seed(args.seed * 1_000_003 + step * 7919 + rank)
        # -- rollouts and their scores --
        picker = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 101)
        chosen = torch.randperm(len(train_items), generator=picker)[: args.prompts_per_step].tolist()
        mine = [train_items[i] for i in chosen[rank * rows : (rank + 1) * rows]]
        encoded = [encode_prompt(tokenizer, processor, m) for m, _ in mine]  # token ids (+ images for a VLM)
        if engine is not None:  # pragma: no cover
            completions, truncated = vllm_generate(engine, model, [render_prompt(tokenizer, m) for m, _ in mine], args)
        else:
            completions, truncated = generate(model, tokenizer, encoded, args, autocast, processor=processor)
        decoded = tokenizer.batch_decode(completions, skip_special_tokens=True)
        prompts_msgs, answers = [m for m, _ in mine], [a for _, a in mine]
        per_fn, failures = [], []
        for fn in reward_fns + ([remote] if args.reward_url else []):
            values, n_failed = safe_rewards(fn, decoded, prompts_msgs, answers)
            per_fn.append(torch.tensor(values))
            failures.append(n_failed)
        if reward_model is not None:
            chats = [m + [{"role": "assistant", "content": c}] for m, c in zip(prompts_msgs, decoded)]
            rm_rows = [{"chat": c, "base_dir": "."} if rm_processor else chat_ids(rm_tokenizer, c) for c in chats]
            per_fn.insert(
                len(reward_fns),
                score_rows(reward_model, rm_rows, rm_tokenizer.pad_token_id, device, autocast, mb_size, rm_processor),
            )
            failures.insert(len(reward_fns), 0)
        per_fn_t = torch.stack(per_fn, 1).float()  # [rows, n_rewards]
        scores = per_fn_t @ weights  # [rows]: the sequence-level reward

        # -- no-grad pass: old logps, reference logps, old values at every response token --
        batch = build_batch([p["input_ids"] for p in encoded], completions, tokenizer.pad_token_id)
        mask = batch["response_mask"]  # [rows, L]
        old_logps, ref_logps, old_values = (torch.zeros(mask.shape) for _ in range(3))  # [rows, L] each

        def micro(rows_idx):
            mb = {k: v[rows_idx] for k, v in batch.items()}
            width = int(mb["attention_mask"].sum(1).max())  # trim right padding to this micro-batch's longest row
            mb = {k: v[:, :width].to(device) for k, v in mb.items()}
            images = None
            if (
                processor is not None
            ):  # a VLM: these rows' images, in row order (actor, reference and critic all see them)
                images = processor.image_inputs([encoded[i] for i in rows_idx.tolist()], mb["input_ids"])
                images = {k: v.to(device) if torch.is_tensor(v) else v for k, v in images.items()}
            return mb, width, images

        with torch.no_grad():
            for i in range(0, rows, mb_size):
                idx = torch.arange(i, min(i + mb_size, rows))
                mb, width, images = micro(idx)
                with autocast:
                    old_logps[idx, :width] = token_logps(model, mb, args, image_inputs=images).float().cpu()
                    old_values[idx, :width] = token_values(critic, mb, images).cpu()
                    if ref_model is not None:
                        ref_logps[idx, :width] = token_logps(ref_model, mb, args, image_inputs=images).float().cpu()
        old_values *= mask

        # -- token rewards (KL penalty + the score on the last response token), GAE --
        kl_coef = float(state.kl_coef)
        kl_tok = (
            kl_penalty(old_logps, ref_logps, args.kl_estimator) * mask
            if ref_model is not None
            else torch.zeros(mask.shape)
        )
        token_rewards = -kl_coef * kl_tok  # [rows, L]
        last = (mask * torch.arange(mask.shape[1])).argmax(1)  # [rows]: each row's last response position
        token_rewards[torch.arange(rows), last] += scores
        advantages, returns = gae(token_rewards, old_values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = whiten(advantages, mask, all_reduce=True)
        batch.update(advantages=advantages, returns=returns, old_values=old_values, old_logps=old_logps)
        t_rollout = time.time() - t0

        # -- mu epochs over mini-batches; micro-batches accumulate with global-count normalisation --
        train_actor = step >= args.critic_warmup_steps
        order_gen = torch.Generator().manual_seed(args.seed + step)
        sums = dict(
            policy_loss=0.0, value_loss=0.0, entropy=0.0, policy_clip=0.0, value_clip=0.0, approx_kl=0.0, tokens=0.0
        )
        n_updates, actor_norms, critic_norms = 0, [], []
        rows_per_mini = rows // args.mini_batches
        for epoch in range(args.mu):
            perm = torch.randperm(rows, generator=order_gen)
            for m in range(args.mini_batches):
                mini = perm[m * rows_per_mini : (m + 1) * rows_per_mini]
                mini = mini[torch.argsort(batch["attention_mask"][mini].sum(1))]  # similar lengths share micro-batches
                n_tok = all_sum([float(mask[mini].sum())], device)[0]
                for i in range(0, len(mini), mb_size):
                    mb, width, images = micro(mini[i : i + mb_size])
                    with autocast:
                        values = token_values(critic, mb, images)
                        if train_actor:
                            logps, entropy = token_logps(model, mb, args, entropy=True, image_inputs=images)
                    loss, v_clip = value_loss(
                        values, mb["old_values"], mb["returns"], mb["response_mask"], args.value_clip, n_tokens=n_tok
                    )
                    sums["value_loss"] += float(loss.detach())  # already over global counts: ranks' shares add up
                    n_mb_tok = float(mb["response_mask"].sum())
                    if train_actor:
                        p_loss, stats = policy_loss(
                            logps,
                            mb["old_logps"],
                            mb["advantages"],
                            mb["response_mask"],
                            clip_low=args.clip_low,
                            clip_high=args.clip_high,
                            n_tokens=n_tok,
                        )
                        loss = loss + p_loss
                        sums["policy_loss"] += float(p_loss.detach())
                        sums["entropy"] += float((entropy.detach() * mb["response_mask"]).sum())
                        sums["policy_clip"] += float(stats["clip_fraction"]) * n_mb_tok
                        sums["approx_kl"] += float(stats["approx_kl"]) * n_mb_tok
                    # FSDP2 averages gradients over ranks; scaling by world_size turns that into the global sum
                    (loss * world_size).backward()
                    sums["value_clip"] += float(v_clip) * n_mb_tok
                    sums["tokens"] += n_mb_tok
                if train_actor:
                    actor_norms.append(grad_norm(actor_params, args.max_grad_norm))
                critic_norms.append(grad_norm(critic_params, args.max_grad_norm))
                optimizer.step()  # actor parameters without gradients (critic warm-up) are left untouched
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                n_updates += 1
        step += 1
        t_end = time.time()

        # -- metrics (global over ranks) --
        n = float(args.prompts_per_step)
        residual = (returns - old_values) * mask
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
        totals = all_sum(
            [
                float(scores.sum()),
                float(scores.square().sum()),
                float(lengths.sum()),
                float(sum(truncated)),
                float(kl_tok.sum()),
                float(returns.sum()),
                float(returns.square().sum()),
                float(residual.sum()),
                float(residual.square().sum()),
                float(mask.sum()),
                float(old_values.sum()),
            ]
            + list(sums.values())
            + per_fn_t.sum(0).tolist()
            + failures,
            device,
        )
        r_sum, r_sq, len_sum, trunc_sum, kl_sum, ret_sum, ret_sq, res_sum, res_sq, n_resp, v_sum = totals[:11]
        s = dict(zip(sums, totals[11 : 11 + len(sums)]))
        fn_sums, fn_failures = (
            totals[11 + len(sums) : 11 + len(sums) + len(reward_names)],
            totals[11 + len(sums) + len(reward_names) :],
        )
        var_ret = ret_sq / n_resp - (ret_sum / n_resp) ** 2
        var_res = res_sq / n_resp - (res_sum / n_resp) ** 2
        metrics = {
            "reward/mean": r_sum / n,
            "reward/std": math.sqrt(max(0.0, r_sq / n - (r_sum / n) ** 2)),
            "completion/length_mean": len_sum / n,
            "completion/truncated_fraction": trunc_sum / n,
            "train/kl": kl_sum / n,
            "train/kl_coef": kl_coef,
            "train/value_loss": s["value_loss"] / n_updates,
            "train/value_clip_fraction": s["value_clip"] / s["tokens"],
            "train/explained_variance": 1.0 - var_res / var_ret if var_ret > 1e-8 else 0.0,
            "train/value_mean": v_sum / n_resp,
            "train/return_mean": ret_sum / n_resp,
            "train/critic_grad_norm": sum(critic_norms) / len(critic_norms),
            "train/lr": scheduler.get_last_lr()[0],
            "time/rollout_share": t_rollout / (t_end - t0),
            "time/step_s": t_end - t0,
        }
        if train_actor:
            metrics.update(
                {
                    "train/policy_loss": s["policy_loss"] / n_updates,
                    "train/entropy": s["entropy"] / s["tokens"],
                    "train/policy_clip_fraction": s["policy_clip"] / s["tokens"],
                    "train/approx_kl": s["approx_kl"] / s["tokens"],
                    "train/actor_grad_norm": sum(actor_norms) / len(actor_norms),
                }
            )
        for name, total, failed in zip(reward_names, fn_sums, fn_failures):
            metrics[f"reward/{name}_mean"], metrics[f"reward/{name}_failures"] = total / n, failed
        if args.kl_target is not None and ref_model is not None:
            state.kl_coef.fill_(adaptive_kl_coef(kl_coef, kl_sum / n, args.kl_target, n, args.kl_horizon))
        logger.log(metrics, step)
        progress.update(1)
        progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['train/kl']:.3f}")

        preempted = torch.tensor(float(bool(stop_signal)), device=device)
        if dist.is_initialized():
            dist.all_reduce(preempted)  # every rank must agree to save, or the collective save hangs
        if preempted.item() or (args.save_every and step % args.save_every == 0) or step == args.max_steps:
            path = save_checkpoint(args.output_dir, step, state, optimizer, scheduler, rank, args.keep_checkpoints)
            if preempted.item():
                say(f"\n[signal] saved {path} at step {step}; exiting. Continue with --resume.")
                progress.close()
                logger.close()
                return {"step": step, "preempted": True}
    progress.close()

    # ---- export and answer accuracy after training ----
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if args.export and vlm:
        out = export_vlm(model, processor, Path(args.output_dir) / "model", lambda: load_vlm(args.model_path)[0], rank)
        export_vlm_critic(args, critic, processor, Path(args.output_dir) / "critic", rank)
        say(
            f"[export] VLM folders: {out} (policy), {Path(args.output_dir) / 'critic'} (critic + value_head.safetensors)"
        )
    elif args.export:
        out = export_hf(model, tokenizer, Path(args.output_dir) / "model", rank, AutoModelForCausalLM)
        export_hf(critic, tokenizer, Path(args.output_dir) / "critic", rank, AutoModelForSequenceClassification)
        say(f"[export] Hugging Face folders: {out} (policy), {Path(args.output_dir) / 'critic'} (critic)")
    if eval_items:
        if world_size == 1:
            results["accuracy_after"] = answer_accuracy(model, tokenizer, eval_items, args, autocast, processor)
        elif args.export and rank == 0:
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
    return finish(logger, {"step": step, **results})


def finish(logger, results):
    barrier()
    logger.close()
    if dist.is_initialized():
        dist.barrier()  # gloo aborts a rank whose peer tears down while it is still in a collective
        dist.destroy_process_group()
    return results


def train_reward_model(args, world_size, rank, device, compute_dtype, autocast, say):
    """--mode rm: Bradley-Terry reward model on preference pairs; pair accuracy on held-out pairs before and after;
    exported to <output-dir>/model as an AutoModelForSequenceClassification folder (num_labels=1, pad_token_id set).
    A VLM --model-path trains a VLMCritic on image pairs (each side scored with its image), exported as the VLM critic."""
    if args.pairs_per_step % world_size:
        raise SystemExit(
            f"error: --pairs-per-step {args.pairs_per_step} must be a multiple of the {world_size} processes"
        )
    vlm = is_vlm(args.model_path)
    model, processor = load_vlm_critic(args.model_path, device) if vlm else (None, None)
    tokenizer = processor.tokenizer if vlm else load_tokenizer(args.model_path)
    pairs = preference_pairs(args.dataset, tokenizer, args.max_len, processor)
    eval_pairs = []
    if args.eval_dataset and args.eval_samples:
        eval_pairs = preference_pairs(args.eval_dataset, tokenizer, args.max_len, processor, args.eval_samples)
    say(
        f"[plan] rm | model {args.model_path}{' (VLM)' if vlm else ''} | {len(pairs)} pairs, {len(eval_pairs)} held-out | "
        f"{args.max_steps} steps x {args.pairs_per_step} pairs | lr {args.lr} | world size {world_size} | {device} {compute_dtype}"
    )
    if args.dry_run:
        return None
    if not vlm:
        model = load_value_model(
            args.model_path,
            tokenizer.pad_token_id,
            device,
            zero_new_head=False,
            gradient_checkpointing=args.gradient_checkpointing,
        )
    elif args.gradient_checkpointing:
        checkpoint_vlm(model.vlm)
    if world_size > 1:
        shard([model], device, compute_dtype, world_size)
        autocast = nullcontext()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    logger = RunLogger(
        args.output_dir,
        asdict(args),
        enabled=rank == 0,
        track=args.track,
        project=args.wandb_project,
        run_name=args.run_name,
    )
    pad, per_rank, chunk = tokenizer.pad_token_id, args.pairs_per_step // world_size, max(1, args.micro_batch_size // 2)

    def pair_accuracy():  # every rank scores every held-out pair: under FSDP2 the forwards are collective
        chosen = score_rows(model, [c for c, _ in eval_pairs], pad, device, autocast, args.micro_batch_size, processor)
        rejected = score_rows(
            model, [r for _, r in eval_pairs], pad, device, autocast, args.micro_batch_size, processor
        )
        return float(bradley_terry_loss(chosen, rejected)[1])

    results = {}
    if eval_pairs:
        results["pair_accuracy_before"] = pair_accuracy()
        say(f"[eval] held-out pair accuracy before training: {results['pair_accuracy_before']:.3f}")
    perms = {}

    def pair_at(i):  # the i-th pair of an endless stream of shuffled epochs
        epoch = i // len(pairs)
        if epoch not in perms:
            perms[epoch] = torch.randperm(
                len(pairs), generator=torch.Generator().manual_seed(args.seed + epoch)
            ).tolist()
        return pairs[perms[epoch][i % len(pairs)]]

    model.train()
    for step in tqdm(range(1, args.max_steps + 1), desc="rm", disable=rank != 0, dynamic_ncols=True):
        start = (step - 1) * args.pairs_per_step + rank * per_rank
        mine = [pair_at(start + j) for j in range(per_rank)]
        loss_sum = acc_sum = 0.0
        for i in range(0, per_rank, chunk):
            part = mine[i : i + chunk]
            with autocast:  # [2 * len(part)]: chosen rows, then rejected rows
                scores = row_scores(model, [c for c, _ in part] + [r for _, r in part], pad, device, processor)
            loss, acc = bradley_terry_loss(scores[: len(part)], scores[len(part) :])
            (loss * len(part) / per_rank).backward()  # FSDP2 averages over ranks: the global pair mean
            loss_sum, acc_sum = loss_sum + float(loss.detach()) * len(part), acc_sum + float(acc) * len(part)
        norm = grad_norm(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss_sum, acc_sum = all_sum([loss_sum, acc_sum], device)
        logger.log(
            {
                "train/loss": loss_sum / args.pairs_per_step,
                "train/accuracy": acc_sum / args.pairs_per_step,
                "train/grad_norm": norm,
                "train/lr": scheduler.get_last_lr()[0],
            },
            step,
        )
    if eval_pairs:
        results["pair_accuracy_after"] = pair_accuracy()
        say(
            f"[eval] held-out pair accuracy after training: {results['pair_accuracy_after']:.3f} "
            f"(before: {results['pair_accuracy_before']:.3f})"
        )
        logger.log({f"eval/{k}": v for k, v in results.items()}, args.max_steps)
    if args.export and vlm:
        out = export_vlm_critic(args, model, processor, Path(args.output_dir) / "model", rank)
        say(f"[export] VLM reward model (save_vlm folder + value_head.safetensors): {out}")
    elif args.export:
        from transformers import AutoModelForSequenceClassification

        out = export_hf(model, tokenizer, Path(args.output_dir) / "model", rank, AutoModelForSequenceClassification)
        say(f"[export] reward model (AutoModelForSequenceClassification): {out}")
    return finish(logger, {"step": args.max_steps, **results})


if __name__ == "__main__":
    main(cli(Args))
