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
    python grpo.py --rewards math my_rewards.py:score --reward-url http://host:8000/score  # your own rewards
    python grpo.py --model-path Qwen/Qwen2.5-0.5B-Instruct --dataset my.jsonl --vllm    # 1 GPU (bf16 picked automatically)
    torchrun --nproc_per_node=8 grpo.py --model-path Qwen/Qwen2.5-1.5B-Instruct --dataset my.jsonl   # N GPUs, FSDP2

Where this departs from TRL's GRPOTrainer / the papers:
  * The loss of each micro-batch is divided by the token (or sequence) count of the whole global mini-batch, counted
    before the micro-batch loop, so gradient accumulation and the number of processes do not change the gradient.
  * Old-policy logps are recomputed with the training model (no grad) when a rollout batch is used for more than one
    optimizer step; with a single step (mu=1, one mini-batch) they equal the current logps, so the detached current
    logps are used and the extra forward is skipped (ratio = 1 exactly, as in TRL and verl).
  * KL is off by default (as in DAPO and Dr.GRPO); the reference model is loaded only when --kl-coef > 0, kept in the
    compute dtype, and with LoRA it is no second model: the policy with its adapters disabled (as dpo.py does).
  * DAPO's dynamic sampling is on by default: groups whose G rewards are all equal carry no gradient, and on a task the
    SFT model half solves a third to a half of them are. With few prompts per step, Adam turns the noise of a small
    batch into steps as large as signal ones: 8 prompts x G=8 at lr 2e-5 lowered held-out accuracy, 16 x 8 at 1e-5
    raised it (README).
  * Rollouts use Hugging Face `generate` on the training model itself. Under FSDP2 every rank all-gathers the
    sharded layers once and decodes with the full weights (--no-unshard-for-generation: `synced_gpus=True`, all ranks
    make the same number of forward calls, no unsharded copy). --vllm samples with a colocated vLLM engine instead
    (docs/vllm.md), synced with the policy's weights (LoRA merged) before every rollout phase.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from tqdm import tqdm

from common.checkpoint import export_model, resume, save_if_due
from common.cli import cli
from common.datasets import load_data
from common.evaluation import answer_accuracy, evaluate, held_out_sets
from common.models import describe, fsdp_blocks, load_model, load_processor
from common.rewards import VERIFY_OUTCOMES, VERIFY_STATS, reward_setup, score_completions
from common.rollout import (
    build_batch,
    micro_batches,
    prompt_records,
    render_prompt,
    sample_completions,
    sampler_gap,
    tis_weights,
    token_logps,
)
from common.run import (
    RunLogger,
    all_gather_cat,
    all_reduce_sums,
    copy_shards,
    derive_seed,
    fill_shards,
    finish,
    fsdp_options,
    full_weights,
    lr_lambda,
    optimizer_step,
    setup,
)
from common.value import load_value_model, score_chats
from common.vision import ComposedVLM, param_groups
from common.vllm_engine import fsdp_named_tensors, sleep_engine, start_vllm, sync_weights

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
VARIANTS = ("ppo", "gspo", "gmpo")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class Args:
    model_path: str = "runs/sft/model"
    """policy to train: a local HF folder, an alias (smollm2-135m), a .gguf file or a hub id. The default is the model
    `python sft.py` exports: RL sharpens a policy that already solves some problems, it cannot teach the format from zero"""
    dataset: str = "data/arith/train.jsonl"
    """prompts: a `prompt` field, messages (the final assistant turn is dropped), message+answer or a preference pair's
    prompt (common/datasets.py); `answer` is the reference. Messages may hold image parts when --model-path is a VLM
    (e.g. easy-vqa:train). A weighted mixture: --dataset a.jsonl:0.7 --dataset b.jsonl:0.3"""
    eval_dataset: str | None = "data/arith/test.jsonl"
    """held-out prompts answered greedily before and after training (answer accuracy)"""
    dataset_split: str | None = None
    """split of a hub dataset or of a local `datasets` folder (default: train); a file has none"""
    dataset_config: str | None = None
    """subset (config) of a hub dataset; of a local folder: its subfolder of that name"""
    eval_split: str | None = None
    """held-out records from this split of --dataset (a hub name or folder), instead of --eval-dataset"""
    eval_fraction: float = 0.0
    """hold out this fraction of --dataset's records (seeded by --seed, out of training), instead of --eval-dataset"""
    columns: str | None = None
    """field names to map, new=old comma-separated (e.g. prompt=question,completion=answer; copies; new= drops one)"""
    answer_regex: str | None = None
    """the reference answer is the first group of this regex in the `answer` field (gsm8k: '#### (.*)')"""
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
    max_tokens_per_micro_batch: int = 0
    """token-budget micro-batches: completions (sorted by length) packed into one row of at most this many tokens per
    forward/backward, instead of --micro-batch-size rows padded to the longest; 0: off"""
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
    tis_cap: float | None = None
    """truncated importance sampling: each token's policy-gradient term weighted by min(pi_old / pi_sampler, C), the
    sampler/trainer mismatch correction (e.g. 2.0; most useful with --vllm); None: off"""
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
    """reward functions summed into the reward: built-ins (math: math-verify; format; exact; vqa: VQA v2 score of short
    answers, for image questions) or your own, `module:function` or `path/file.py:function`, called as
    fn(completions, prompts=, answers=)"""
    reward_weights: tuple[float, ...] | None = None
    """one weight per reward (--rewards in order, then --reward-url, then --reward-model); default all 1"""
    reward_model: str | None = None
    """a Bradley-Terry reward model (reward_model.py's export, text or VLM): its score of the chat (prompt, its images
    and the completion) is one more reward, `reward_model`, weighted after --rewards and --reward-url"""
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
    cpu_offload: bool = False
    """FSDP2's CPU offload: parameters, gradients and optimizer state stay on the CPU between uses (launch with torchrun;
    --nproc_per_node=1 for one device)"""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights. With LoRA the reference is the policy with its adapters off (no second model)"""
    lora_alpha: int = 16
    """LoRA scaling numerator"""
    lora_targets: tuple[str, ...] | None = None
    """module names LoRA wraps; default depends on the architecture (all attention and MLP projections for Llama)"""
    merge: bool = True
    """with LoRA: also export the merged model to <output-dir>/model (the adapter always goes to <output-dir>/model/adapter)"""
    logprob_impl: Literal["fused", "naive"] = "fused"
    """fused: chunked kernel that never builds the logits; naive: log_softmax over full logits"""
    ood_dataset: str | None = "data/arith/ood.jsonl"
    """an out-of-distribution held-out set, answered before and after training beside --eval-dataset's, with paired
    counts and a sign test (common/evaluation.py); the default, the bundled task's OOD split, only with its test split"""
    eval_samples: int = 200
    """held-out prompts answered by greedy generation before and after training (0 disables)"""
    eval_every: int = 0
    """also measure held-out accuracy every N steps (0: only before and after); works under torchrun"""
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
    unshard_for_generation: bool = True
    """under FSDP2, gather the full weights once per generate call (one unsharded copy per rank); off: gather layer by
    layer at every decoding step (synced_gpus), for models too large to unshard"""
    vllm: bool = False
    """sample rollouts with a colocated vLLM engine, one per process, fed the policy's weights before every rollout
    phase (README's vLLM tier); held-out evaluation still uses Hugging Face generate"""
    vllm_gpu_memory_utilization: float = 0.3
    """--vllm: the share of GPU memory the engine takes (weights + KV cache); on CPU the KV cache is 2 GiB of RAM
    (VLLM_CPU_KVCACHE_SPACE, in GiB, overrides it)"""
    vllm_enforce_eager: bool = True
    """--vllm: skip compilation and CUDA graphs (start-up in seconds instead of minutes; on a GPU, --no-vllm-enforce-eager
    decodes faster once started)"""
    track: bool = False
    """log to Weights & Biases (offline mode when no account is configured; WANDB_PROJECT, WANDB_NAME name the run)"""


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


def policy_loss(logps, old_logps, advantages, response_mask, *, variant, clip_low=0.2, clip_high=0.2, dual_clip=None,
                agg="token-mean", n_tokens=None, n_seqs=None, norm_len=None, token_weights=None):  # fmt: skip
    """(scalar loss, stats) of the clipped surrogate. logps, old_logps, advantages [B, T] float, response_mask [B, T];
    token_weights [B, T] (detached, e.g. tis_weights) multiply each token's loss.

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
    if token_weights is not None:
        token_loss = token_loss * token_weights
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


# ====================================================================================================== rollouts
def sample_groups(model, processor, items, reward_fns, weights, args, run, step, engine=None, scorer=None):
    """One step's rollouts on this rank: its share of --prompts-per-step prompts, --group-size completions each, scored.
    DAPO dynamic sampling: a group whose rewards are all equal carries no gradient, so up to --max-resample more rounds
    of fresh prompts replace such groups; any still missing are filled with dropped ones (zero advantage). Returns flat
    per-completion lists (rows in groups of G) and the step's counts. With --vllm the engine first gets the policy's
    current weights (streamed one parameter at a time from the FSDP2 shards) and, on a GPU, sleeps after. scorer:
    (reward model, its processor) of --reward-model, whose score is the last reward."""
    if engine is not None:
        sync_weights(engine, fsdp_named_tensors(model))
    my_prompts = args.prompts_per_step // run.world_size
    kept, dropped, n_generated, failures = [], [], 0, [0] * len(weights)
    for attempt in range(1 + (args.max_resample if args.dynamic_sampling else 0)):
        picker = torch.Generator().manual_seed(derive_seed(args.seed, step, "prompts", attempt))
        chosen = torch.randperm(len(items), generator=picker)[: args.prompts_per_step].tolist()
        mine = [items[i] for i in chosen[run.rank * my_prompts : (run.rank + 1) * my_prompts]]
        prompt_msgs = [m for m, _ in mine for _ in range(args.group_size)]
        answers = [a for _, a in mine for _ in range(args.group_size)]
        encoded = [processor(m, add_generation_prompt=True) for m, _ in mine]  # token ids (+ a VLM's images)
        with run.autocast(model):
            completions, truncated, sampler_logps = sample_completions(
                model, processor, encoded, [m for m, _ in mine], n=args.group_size, engine=engine,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                fire_temperature=args.fire_temperature, gather=args.unshard_for_generation)  # fmt: skip
        encoded = [p for p in encoded for _ in range(args.group_size)]  # one per completion
        texts = processor.tokenizer.batch_decode(completions, skip_special_tokens=True)
        per_fn, failed = score_completions(reward_fns, texts, prompt_msgs, answers)  # [rows, n_fns]
        if scorer is not None:  # the reward model reads the whole chat through its own template (and its images)
            chats = [(m + [{"role": "assistant", "content": t}], ".") for m, t in zip(prompt_msgs, texts)]
            rm_scores = score_chats(*scorer, chats, run, args.micro_batch_size)  # [rows]
            per_fn, failed = torch.cat([per_fn, rm_scores[:, None]], 1), failed + [0]
        failures = [a + b for a, b in zip(failures, failed)]
        total = per_fn @ torch.tensor(weights, dtype=torch.float32)  # [rows]
        total += overlong_penalty([len(c) for c in completions], args.max_new_tokens, args.overlong_buffer,
                                  args.overlong_penalty)  # fmt: skip
        for g in range(my_prompts):
            rows = range(g * args.group_size, (g + 1) * args.group_size)
            group = [dict(prompt=encoded[i], prompt_msgs=prompt_msgs[i], answer=answers[i], completion=completions[i],
                          truncated=truncated[i], sampler_logps=sampler_logps[i], text=texts[i], reward=total[i],
                          per_fn=per_fn[i]) for i in rows]  # fmt: skip
            degenerate = args.dynamic_sampling and len({float(r["reward"]) for r in group}) == 1
            (dropped if degenerate else kept).append(group)
            n_generated += 1
        # every rank must take the same decision, or their generate calls (collectives under FSDP2) fall out of step
        if all_reduce_sums({"missing": max(0, my_prompts - len(kept))}, run)["missing"] == 0:
            break
    groups = (kept + dropped)[:my_prompts]  # short of informative groups: fill with dropped ones (zero advantage)
    if engine is not None:
        sleep_engine(engine)  # GPU: the engine's memory goes back to training until the next rollout phase
    rows = [r for g in groups for r in g]
    counts = {"generated_groups": n_generated, "filtered_groups": n_generated - len(kept)}
    return {k: [r[k] for r in rows] for k in rows[0]}, counts, failures


@torch.no_grad()
def frozen_logps(model, ref_model, batch, prompts, processor, args, run, reuse):
    """No-grad passes over the rollout batch: the old policy's logps (only when a batch is reused for several optimizer
    steps: with one, they equal the current logps) and the reference's (only with --kl-coef > 0; with LoRA the
    reference is the policy with its adapters disabled), [rows, L] each."""
    old_logps, ref_logps = torch.zeros(batch["input_ids"].shape), torch.zeros(batch["input_ids"].shape)
    by_length = torch.argsort(batch["attention_mask"].sum(1))
    lora_ref = args.kl_coef > 0 and args.lora_r > 0
    for idx, mb, images in micro_batches(batch, by_length, prompts, processor, run, size=args.micro_batch_size,
                                         max_tokens=args.max_tokens_per_micro_batch):  # fmt: skip
        width = mb["input_ids"].shape[1]
        for target, net, adapters_off in ((old_logps, model if reuse else None, False),
                                          (ref_logps, model if lora_ref else ref_model, lora_ref)):  # fmt: skip
            if net is not None:
                with run.autocast(net), net.disable_adapter() if adapters_off else contextlib.nullcontext():
                    logps = token_logps(net, mb, images, impl=args.logprob_impl, temperature=args.temperature)
                target[idx, :width] = logps.float().cpu()
    return old_logps, ref_logps


# ======================================================================================================== main
def main(args: Args):
    run = setup(args.seed, args.dtype, args.cpu_offload)

    # ---- prompts, reward functions, plan ----
    rows = args.prompts_per_step // run.world_size * args.group_size  # completions per process per step
    if args.prompts_per_step % run.world_size or rows % args.mini_batches:
        raise SystemExit(f"error: --prompts-per-step {args.prompts_per_step} must split into {run.world_size} processes "
                         f"and its {rows} completions per process into --mini-batches {args.mini_batches}")  # fmt: skip
    if args.estimator != "reinforce_pp" and args.group_size < 2:
        raise SystemExit(f"error: --estimator {args.estimator} compares completions within a group: --group-size >= 2")
    if args.model_path == Args.model_path and not Path(args.model_path).is_dir():
        raise SystemExit(f"error: --model-path {args.model_path} (the default) does not exist yet: run `python sft.py` "
                         "first, whose default run exports there, or pass another model, e.g. --model-path smollm2-135m")  # fmt: skip
    reward_names, reward_fns, weights = reward_setup(args)  # --rewards, --reward-url, --reward-model; their weights
    processor = load_processor(args.model_path)
    records, eval_records = load_data(args, with_eval=args.eval_samples > 0)
    train_items = prompt_records(records, processor, script="grpo.py")
    eval_items = [it for it in prompt_records(eval_records, processor, script="grpo.py") if it[1] is not None]
    eval_items = eval_items[: args.eval_samples]
    held_out = held_out_sets(args, processor, eval_items, "grpo.py")  # in-distribution and OOD answer prompts
    run.print(
        f"[plan] model {args.model_path} | {len(train_items)} prompts, {len(eval_items)} held-out | "
        f"{args.max_steps} steps x {args.prompts_per_step} prompts x G={args.group_size} | {args.estimator} + "
        f"{args.variant} ({args.agg}), mu={args.mu}, {args.mini_batches} mini-batch(es) | rewards "
        f"{', '.join(reward_names)} | kl {args.kl_coef} | world size {run.world_size} | {run.device} {run.dtype}"
    )
    if args.dry_run:
        run.print(f"[plan] {describe(args.model_path)}; dry run, exiting")
        return None

    # ---- models: policy (and reference when KL is on, reward model), FSDP2, accuracy before, optimizer ----
    meta = run.sharded and not run.main  # FSDP2: rank 0 reads the weights, the other ranks build on the meta device
    model = load_model(args.model_path, device=run.device, gradient_checkpointing=args.gradient_checkpointing, meta=meta,
                       lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets)  # fmt: skip
    ref_model = None  # never trained: kept in the compute dtype; with LoRA, the policy with its adapters off
    if args.kl_coef > 0 and args.lora_r == 0:  # FSDP2: built on the meta device, a copy of the policy's shards
        ref_model = load_model(args.model_path, device=run.device, dtype=run.dtype, meta=run.sharded)
        ref_model.eval().requires_grad_(False)
    reward_model = rm_processor = None  # never trained either: in the compute dtype, sharded like the reference
    if args.reward_model:
        reward_model, rm_processor = load_value_model(args.reward_model, device=run.device, zero_new_head=False,
                                                      dtype=run.dtype, meta=meta)  # fmt: skip
        reward_model.eval().requires_grad_(False)
    if run.sharded:
        fsdp = fsdp_options(run, args.cpu_offload)
        for m in [m for m in (model, ref_model, reward_model) if m is not None]:
            full = full_weights(m, run) if m is not ref_model else None
            for block in fsdp_blocks(m):  # decoder layers (and a VLM's vision blocks), then the root
                fully_shard(block, **fsdp)
            fully_shard(m, **fsdp)  # root: embeddings, final norm, LM head (a VLM's projector too)
            if m is ref_model:  # the reference starts as the policy: each rank copies its own shards
                copy_shards(m, model)
            else:
                fill_shards(m, full, run)  # rank 0's weights into every rank's shards
            if isinstance(m, ComposedVLM) or hasattr(m, "peft_config"):  # generate bypasses the root's forward: make
                register_fsdp_forward_method(m, "generate")  # it gather the root's weights (embeddings, head) too
        del full
    results = {}
    flags_before = None
    if not args.resume:
        flags_before = evaluate(model, processor, held_out, run, results, "before", max_new_tokens=args.max_new_tokens,
                                gather=args.unshard_for_generation)  # fmt: skip
    # one lr per part of a VLM (projector, vision, LM; lr 0 freezes a part); a text model is all LM
    groups = param_groups(model, args.lr, args.lr_projector, args.lr_vision, None, args.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, args.warmup_steps, args.max_steps))
    step = resume(run, args.output_dir, model, optimizer, scheduler) if args.resume else 0
    logger = RunLogger(args.output_dir, asdict(args), run, track=args.track,
                       resume_step=step if args.resume else None)  # fmt: skip
    rollout_file = Path(args.output_dir) / "rollouts.jsonl"
    if args.save_rollouts and run.main and not args.resume:
        rollout_file.unlink(missing_ok=True)
    autocast = run.autocast(model)
    engine = start_vllm(model, args, run)  # --vllm: a colocated engine per process

    # ---- training loop ----
    model.train()
    progress = tqdm(total=args.max_steps, initial=step, desc="grpo", disable=not run.main, dynamic_ncols=True)
    while step < args.max_steps:
        t0 = time.time()
        torch.manual_seed(derive_seed(args.seed, step, "sampling", run.rank))  # common/run.py's seeding rule
        verify_before = dict(VERIFY_STATS)
        # -- rollouts: G completions per prompt, scored; DAPO dynamic sampling keeps groups whose rewards differ --
        rollout, counts, failures = sample_groups(model, processor, train_items, reward_fns, weights, args, run, step,
                                                  engine, (reward_model, rm_processor) if reward_model else None)  # fmt: skip
        t_rollout = time.time() - t0

        # -- advantages over the whole global batch (reinforce_pp whitens over all of it) --
        rewards = torch.stack(rollout["reward"])  # [rows]
        lengths = torch.tensor([len(c) for c in rollout["completion"]])  # [rows]
        all_rewards, all_lengths = (
            all_gather_cat(rewards.to(run.device)).cpu(),
            all_gather_cat(lengths.to(run.device)).cpu(),
        )
        length_mask = torch.arange(int(all_lengths.max())) < all_lengths[:, None]  # [world * rows, T]
        advantages_all = group_advantages(all_rewards, length_mask, args.group_size, args.estimator)
        seq_adv = (advantages_all.sum(1) / all_lengths.clamp(min=1))[run.rank * rows : (run.rank + 1) * rows]  # [rows]
        batch = build_batch([p["input_ids"] for p in rollout["prompt"]], rollout["completion"],
                            processor.tokenizer.pad_token_id, rollout["sampler_logps"])  # fmt: skip
        if args.mask_truncated:
            batch["response_mask"] &= ~torch.tensor(rollout["truncated"])[:, None]
        batch["advantages"] = seq_adv[:, None] * batch["response_mask"]  # [rows, L]

        # -- old-policy and reference logps (no grad); then mu inner epochs over mini-batches --
        reuse = args.mu > 1 or args.mini_batches > 1
        old_logps, ref_logps = frozen_logps(model, ref_model, batch, rollout["prompt"], processor, args, run, reuse)
        order_gen = torch.Generator().manual_seed(derive_seed(args.seed, step, "mini-batches"))
        keys = "loss kl entropy clip approx_kl tokens gap_tokens gap_abs gap_ratio tis_capped".split()
        sums, grad_norms = dict.fromkeys(keys, 0.0), []
        for epoch in range(args.mu):
            perm = torch.randperm(rows, generator=order_gen)
            for m in range(args.mini_batches):
                mini = perm[m * rows // args.mini_batches : (m + 1) * rows // args.mini_batches]
                mini = mini[torch.argsort(batch["attention_mask"][mini].sum(1))]  # similar lengths share micro-batches
                # losses are normalised by the token (or sequence) counts of the whole global mini-batch
                n = all_reduce_sums({"tok": batch["response_mask"][mini].sum(),
                                     "seq": batch["response_mask"][mini].any(1).sum()}, run)  # fmt: skip
                for idx, mb, images in micro_batches(batch, mini, rollout["prompt"], processor, run,
                                                     size=args.micro_batch_size, max_tokens=args.max_tokens_per_micro_batch):  # fmt: skip
                    width, mask = mb["input_ids"].shape[1], mb["response_mask"]
                    with autocast:
                        logps, entropy = token_logps(model, mb, images, impl=args.logprob_impl,
                                                     temperature=args.temperature, entropy=True)  # fmt: skip
                    old = old_logps[idx, :width].to(run.device) if reuse else logps.detach()
                    tis = None  # the sampler's own logps vs the training model's: logged, and TIS weights
                    if "rollout_logps" in mb:
                        if epoch == 0:
                            gap = sampler_gap(old, mb["rollout_logps"], mask, args.tis_cap)
                            sums |= {k: sums[k] + v for k, v in gap.items()}
                        if args.tis_cap:
                            tis = tis_weights(old, mb["rollout_logps"], mask, args.tis_cap)
                    loss, stats = policy_loss(logps, old, mb["advantages"], mask, variant=args.variant,
                                              clip_low=args.clip_low, clip_high=args.clip_high, dual_clip=args.dual_clip,
                                              agg=args.agg, n_tokens=n["tok"], n_seqs=n["seq"],
                                              norm_len=args.max_new_tokens, token_weights=tis)  # fmt: skip
                    if args.kl_coef > 0:
                        kl_tok = kl_penalty(logps, ref_logps[idx, :width].to(run.device), args.kl_estimator) * mask
                        loss = loss + args.kl_coef * aggregate(kl_tok, mask, args.agg, n_tokens=n["tok"],
                                                               n_seqs=n["seq"], norm_len=args.max_new_tokens)  # fmt: skip
                        sums["kl"] += float(kl_tok.detach().sum())
                    # FSDP2 averages gradients over ranks; scaling by world_size turns that into the global sum
                    (loss * run.world_size).backward()
                    n_mb_tok = float(mask.sum())
                    sums["loss"] += float(loss.detach())  # already over global counts: ranks' shares add up
                    sums["entropy"] += float((entropy.detach() * mask).sum())
                    sums["clip"] += float(stats["clip_fraction"]) * n_mb_tok
                    sums["approx_kl"] += float(stats["approx_kl"]) * n_mb_tok
                    sums["tokens"] += n_mb_tok
                grad_norms.append(optimizer_step(optimizer, scheduler, trainable, args.max_grad_norm))
        step += 1

        # -- metrics (global over ranks) --
        t_end = time.time()
        per_fn = torch.stack(rollout["per_fn"])  # [rows, n_fns]
        totals = all_reduce_sums({**sums, **counts, "reward": rewards.sum(), "reward_sq": rewards.square().sum(),
                                  "length": lengths.sum(), "truncated": sum(rollout["truncated"]),
                                  **{f"{name}_sum": v for name, v in zip(reward_names, per_fn.sum(0).tolist())},
                                  **{f"{name}_sq": v for name, v in zip(reward_names, per_fn.square().sum(0).tolist())},
                                  **{f"{name}_failures": v for name, v in zip(reward_names, failures)},
                                  **{f"verify_{k}": VERIFY_STATS[k] - verify_before.get(k, 0)
                                     for k in VERIFY_OUTCOMES[1:]}}, run)  # fmt: skip
        metrics = step_metrics(totals, reward_names, run.world_size * rows, len(grad_norms), args)
        metrics.update({"train/grad_norm": sum(grad_norms) / len(grad_norms), "train/lr": scheduler.get_last_lr()[0],
                        "time/rollout_share": t_rollout / (t_end - t0), "time/step_s": t_end - t0,
                        "time/completions_per_s": run.world_size * rows / (t_end - t0)})  # fmt: skip
        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps and eval_items:
            metrics["eval/accuracy"] = answer_accuracy(model, processor, eval_items, run, max_new_tokens=args.max_new_tokens,
                                                       gather=args.unshard_for_generation)  # fmt: skip
        logger.log(metrics, step)
        if args.save_rollouts and run.main:  # rank 0's share of the rollouts
            save_rollouts(rollout_file, step, rollout, seq_adv, reward_names, processor.tokenizer)
        progress.update(1)
        progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", len=f"{metrics['completion/length_mean']:.0f}")
        if save_if_due(run, args, step, args.max_steps, model, optimizer, scheduler):
            return finish(run, logger, {"step": step, "preempted": True}, progress, engine)
    progress.close()

    # ---- export and answer accuracy after training ----
    if args.export:
        out = export_model(model, processor, Path(args.output_dir) / "model", run, base_path=args.model_path,
                           merge=args.merge)  # fmt: skip
        run.print(f"[export] {out}")
    evaluate(model, processor, held_out, run, results, "after", max_new_tokens=args.max_new_tokens,
             gather=args.unshard_for_generation, before=flags_before)  # fmt: skip
    if results:
        logger.log({f"eval/{k}": v for k, v in results.items()}, step)
    return finish(run, logger, {"step": step, **results}, engine=engine)


def step_metrics(totals, reward_names, n, n_updates, args) -> dict:
    """The step's logged metrics from the rank-summed totals: reward, completion, loss and sampler-drift statistics."""

    def std(s, sq):
        return math.sqrt(max(0.0, sq / n - (s / n) ** 2))

    tok = max(totals["tokens"], 1)
    metrics = {"reward/mean": totals["reward"] / n, "reward/std": std(totals["reward"], totals["reward_sq"]),
               "completion/length_mean": totals["length"] / n, "completion/truncated_fraction": totals["truncated"] / n,
               "train/loss": totals["loss"] / n_updates, "train/entropy": totals["entropy"] / tok,
               "train/clip_fraction": totals["clip"] / tok, "train/approx_kl": totals["approx_kl"] / tok,
               "rollout/filtered_group_fraction": totals["filtered_groups"] / max(totals["generated_groups"], 1)}  # fmt: skip
    if args.kl_coef > 0:
        metrics["train/kl"] = totals["kl"] / tok
    if totals["gap_tokens"]:  # how far the sampler's numerics drift from the training forward's (same weights)
        metrics["rollout/train_vs_sampler_ratio_mean"] = totals["gap_ratio"] / totals["gap_tokens"]
        metrics["rollout/train_vs_sampler_abs_logp_diff_mean"] = totals["gap_abs"] / totals["gap_tokens"]
        if args.tis_cap:
            metrics["rollout/tis_capped_fraction"] = totals["tis_capped"] / totals["gap_tokens"]
    for name in reward_names:
        metrics[f"reward/{name}_mean"] = totals[f"{name}_sum"] / n
        metrics[f"reward/{name}_std"] = std(totals[f"{name}_sum"], totals[f"{name}_sq"])
        metrics[f"reward/{name}_failures"] = totals[f"{name}_failures"]
    if "math" in reward_names:
        metrics["train/accuracy"] = metrics["reward/math_mean"]
    metrics |= {f"reward/math_verify_{k[7:]}": v for k, v in totals.items() if k.startswith("verify_") and v}
    return metrics


def save_rollouts(path, step, rollout, seq_adv, reward_names, tokenizer):
    """Appends this rank's rollouts (prompt, completion, rewards, advantage) to rollouts.jsonl."""
    with path.open("a") as f:
        for i, text in enumerate(rollout["text"]):
            row = {"step": step, "prompt": render_prompt(tokenizer, rollout["prompt_msgs"][i]), "completion": text,
                   "answer": rollout["answer"][i], "reward": float(rollout["reward"][i]),
                   "rewards": dict(zip(reward_names, rollout["per_fn"][i].tolist())), "advantage": float(seq_adv[i]),
                   "truncated": bool(rollout["truncated"][i])}  # fmt: skip
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(cli(Args))
