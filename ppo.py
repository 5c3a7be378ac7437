"""ppo.py: PPO with a learned critic for language and vision-language models (RLHF-style), in one file.

One step (PPO: Schulman et al. 2017, arXiv:1707.06347; GAE: Schulman et al. 2016, arXiv:1506.02438; the LM recipe:
Ziegler et al. 2019, arXiv:1909.08593, Ouyang et al. 2022, arXiv:2203.02155):

    prompts --generate G completions each (default 1)--> score r (verifiers | reward model | URL)
    G > 1: r <- r - mean of the prompt's other G - 1 scores                  (RLOO's baseline; see below)
    no grad: log pi_old, log pi_ref, V_old at every response token
    token rewards   r_t = -beta * kl_t, plus r on the last response token        kl_t = log pi_old - log pi_ref (k1)
    A_t, R_t = gae(r_t, V_old, gamma, lambda);   A <- whiten(A)
    for mu epochs, for each mini-batch:                                     (one optimizer step per mini-batch)
        loss = policy_loss(log pi, log pi_old, A) + value_loss(V, V_old, R)     (critic only during warm-up steps)
    beta <- adaptive_kl_coef(beta, KL, --kl-target)                         (Ziegler et al. 2019; only with --kl-target)

The reward model it can score with is trained by reward_model.py (Bradley-Terry on preference pairs).

Launch:
    python sft.py && python ppo.py                  # 1 CPU: PPO from sft.py's export, bundled arithmetic task, verifiers
    python ppo.py --model-path smollm2-135m         # without the SFT run
    python reward_model.py && python ppo.py --reward-model runs/rm/model --rewards   # the learned reward only
    python ppo.py --reward-model runs/rm/model --critic-path runs/rm/model   # critic initialised from the reward model
    python ppo.py --kl-target 2.0                   # adaptive KL coefficient
    python ppo.py --model-path runs/vqa_sft/model --dataset easy-vqa:train --eval-dataset easy-vqa:test --rewards vqa \
        --max-new-tokens 8 --lr-vision 0 --output-dir runs/vqa_ppo   # a VLM on image prompts, frozen vision encoder
    python ppo.py --model-path Qwen/Qwen2.5-0.5B-Instruct --dataset my.jsonl --prompts-per-step 256   # 1 GPU
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
  * lam = 1 by default (TRL and OpenRLHF use 0.95). With a new critic (values 0) and lam < 1 the final reward reaches
    token t scaled by lam^(tokens left), so after whitening the first tokens of right answers get negative advantages
    and the ends of wrong ones positive (tests/test_ppo.py: 35% of the tokens of a 30-token, 16-sample batch); with
    lam = 1 each token's advantage is the return minus the value, and its sign follows the reward from the first step.
  * By default one optimizer step per rollout step (mu = 1, one mini-batch of 64 completions), not TRL's 4 epochs of
    small mini-batches: Adam's normalised step is as large from 8 samples as from 64, so small mini-batches are noise
    (docs/results.md: 16 prompts x mu 2 x 2 mini-batches left the bundled task at 0.745; 64 x 1 x 1 raised it to 0.800).
    With one update per batch the ratio is 1 at that update and the clip never binds; --mu or --mini-batches > 1 use it.
  * --group-size G > 1 samples G completions per prompt and subtracts from each score the mean of its prompt's other
    G - 1 (RLOO's leave-one-out baseline, Ahmadian et al. 2024) before GAE, as OpenRLHF can with
    n_samples_per_prompt: the critic then has only the within-prompt part of the return to explain. With one
    completion per prompt the baseline is the critic alone. On the bundled task G = 4 did worse than the default
    (docs/results.md), so the default stays at 1.
  * A VLM's critic is a second copy of the VLM plus a zero linear head on its final hidden states (common/value.py's
    VLMCritic), so values see the image; it trains at --critic-lr throughout (--lr-projector/--lr-vision set the
    actor's lrs only).
  * The reference and the reward model never train: they are kept in the compute dtype. With --lora-r the actor and
    the critic train adapters (the critic's value head fully) and the reference is the actor with its adapters off.
  * Rollouts come from common/rollout.py (Hugging Face `generate`, the full weights gathered once per call under
    FSDP2) or, with --vllm, a colocated vLLM engine.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from tqdm import tqdm

from common.checkpoint import export_model, resume, save_if_due
from common.cli import cli
from common.datasets import load_data
from common.evaluation import evaluate, held_out_sets
from common.models import describe, fsdp_blocks, load_model, load_processor
from common.rewards import reward_setup, score_completions
from common.rollout import (
    build_batch,
    micro_batches,
    prompt_records,
    sample_completions,
    sampler_gap,
    tis_weights,
    token_logps,
)
from common.run import (
    RunLogger,
    all_reduce_sums,
    clip_grad_norm,
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
from common.value import export_value_model, load_value_model, score_chats, token_values
from common.vision import ComposedVLM, is_vlm, param_groups
from common.vllm_engine import fsdp_named_tensors, sleep_engine, start_vllm, sync_weights


@dataclass
class Args:
    model_path: str = "runs/sft/model"
    """policy: `python sft.py`'s export, an alias (smollm2-135m), an HF folder, a VLM folder or a hub id"""
    critic_path: str | None = None
    """critic start: None = the policy plus a zero value head; a value-model folder (reward_model.py's export) keeps its
    head"""
    reward_model: str | None = None
    """reward model trained by reward_model.py (a sequence-classification folder, a likelihood one (--pooling logprob)
    or a VLM one that scores the prompt's image too); its score joins the reward"""
    dataset: str = "data/arith/train.jsonl"
    """prompts: a `prompt` field, messages, message+answer or a preference pair's prompt (common/datasets.py); `answer`
    is the reference of the verifiers; image parts need a VLM --model-path (e.g. easy-vqa:train). A weighted mixture:
    --dataset a.jsonl:0.7 --dataset b.jsonl:0.3"""
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
    output_dir: str = "runs/ppo"
    """checkpoints, metrics.jsonl and the exports: <output-dir>/model (policy), <output-dir>/critic"""
    config: str | None = None
    """a .yaml or .json file of field: value defaults; command-line flags override them"""
    dry_run: bool = False
    """validate arguments, read the data and the model config, print the plan and exit"""
    seed: int = 0
    """seed for prompt order and sampling"""
    max_steps: int = 12
    """rollout steps"""
    prompts_per_step: int = 64
    """prompts per rollout step over all processes"""
    group_size: int = 1
    """completions sampled per prompt (as grpo.py's G); with G > 1 each completion's score is centred by the mean score
    of its prompt's other G - 1 completions (RLOO's baseline) before the critic and GAE see it"""
    max_new_tokens: int = 96
    """completion budget; longer completions are cut"""
    temperature: float = 1.0
    """sampling temperature of rollouts (and of the logps the loss uses)"""
    top_p: float = 1.0
    """nucleus sampling threshold of rollouts"""
    lr: float = 1e-5
    """actor learning rate (AdamW, constant after warmup)"""
    critic_lr: float = 1e-4
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
    mu: int = 1
    """PPO epochs over each rollout batch"""
    mini_batches: int = 1
    """optimizer steps per epoch: the rollout batch is split into this many mini-batches"""
    micro_batch_size: int = 16
    """sequences per forward/backward per process (gradient accumulation inside a mini-batch)"""
    max_tokens_per_micro_batch: int = 0
    """token-budget micro-batches: completions (sorted by length) packed into one row of at most this many tokens per
    forward/backward, instead of --micro-batch-size rows padded to the longest; 0: off"""
    clip_low: float = 0.2
    """policy ratio clip below 1 (1 - clip_low)"""
    clip_high: float = 0.2
    """policy ratio clip above 1 (1 + clip_high)"""
    value_clip: float | None = 0.2
    """value clipping: new values stay within this distance of the old ones in the clipped term (None disables)"""
    gamma: float = 1.0
    """discount over the response tokens"""
    lam: float = 1.0
    """GAE lambda (1: Monte-Carlo returns, 0: one-step TD); < 1 needs a trained critic (see the docstring)"""
    whiten_advantages: bool = True
    """normalise advantages to mean 0 / std 1 over the global batch's response tokens"""
    critic_warmup_steps: int = 0
    """only the critic trains during the first N rollout steps (the policy waits for useful values)"""
    tis_cap: float | None = None
    """truncated importance sampling: each token's policy-gradient term weighted by min(pi_old / pi_sampler, C), the
    sampler/trainer mismatch correction (e.g. 2.0; most useful with --vllm); None: off"""
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
    """one weight per reward (--rewards in order, then --reward-url, then --reward-model); default all 1"""
    reward_url: str | None = None
    """HTTP reward: POST {"prompts", "completions", "answers"} JSON, expects {"rewards": [...]}"""
    reward_timeout: float = 30.0
    """seconds per HTTP reward attempt"""
    reward_retries: int = 3
    """retries of a failed HTTP reward request"""
    dtype: str = "auto"
    """compute dtype: auto (bf16 where the hardware has it), float32 or bfloat16; master weights stay float32"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory (actor and critic)"""
    cpu_offload: bool = False
    """FSDP2's CPU offload: parameters, gradients and optimizer state stay on the CPU between uses (launch with torchrun;
    --nproc_per_node=1 for one device)"""
    lora_r: int = 0
    """LoRA rank of the actor and the critic (the critic's value head trains fully); 0 trains all weights. With LoRA the
    reference is the actor with its adapters off (no second model)"""
    lora_alpha: int = 16
    """LoRA scaling numerator"""
    lora_targets: tuple[str, ...] | None = None
    """module names LoRA wraps; default depends on the architecture (all attention and MLP projections for Llama)"""
    merge: bool = True
    """with LoRA: also export the merged actor to <output-dir>/model (the adapter always goes to <output-dir>/model/adapter)"""
    logprob_impl: Literal["fused", "naive"] = "fused"
    """fused: chunked kernel that never builds the logits; naive: log_softmax over full logits"""
    ood_dataset: str | None = "data/arith/ood.jsonl"
    """an out-of-distribution held-out set, answered before and after training beside --eval-dataset's, with paired
    counts and a sign test (common/evaluation.py); the default, the bundled task's OOD split, only with its test split"""
    eval_samples: int = 200
    """held-out prompts answered greedily before and after training (0 disables)"""
    save_every: int = 0
    """save a resumable checkpoint every N steps (0: only on preemption and at the end)"""
    keep_checkpoints: int = 2
    """how many recent checkpoints to keep"""
    resume: bool = False
    """continue from the newest complete checkpoint in <output-dir>/checkpoints"""
    export: bool = True
    """write the policy to <output-dir>/model and the critic to <output-dir>/critic at the end"""
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


def policy_loss(logps, old_logps, advantages, response_mask, *, clip_low=0.2, clip_high=0.2, n_tokens=None,
                token_weights=None):  # fmt: skip
    """(loss, stats): PPO's clipped surrogate per token, -min(rho A, clip(rho, 1-clip_low, 1+clip_high) A),
    rho = pi/pi_old (Schulman et al. 2017), times token_weights when given (TIS), token mean over n_tokens (default:
    this batch's count). Tensors [B, T].
    stats: clip_fraction (share of tokens where clipping removed the gradient), approx_kl (k3 of pi_old vs pi)."""
    mask = response_mask.bool()
    maskf = mask.to(logps.dtype)
    n_tokens = maskf.sum() if n_tokens is None else n_tokens
    log_ratio = (logps - old_logps) * maskf  # [B, T]
    ratio = torch.exp(log_ratio)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    token_loss = torch.maximum(unclipped, clipped) * (1.0 if token_weights is None else token_weights)
    loss = (token_loss * maskf).sum() / max(float(n_tokens), 1.0)
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


# ======================================================================================================= one step
@torch.no_grad()
def frozen_pass(model, critic, ref_model, batch, prompts, processor, args, run):
    """No-grad pass over the rollout batch: the old policy's logps, the reference's (with --kl-coef > 0; with LoRA the
    actor with its adapters disabled) and the critic's old values at every position, [rows, L] each (values zeroed
    outside the response)."""
    old_logps, ref_logps, old_values = (torch.zeros(batch["input_ids"].shape) for _ in range(3))
    by_length = torch.argsort(batch["attention_mask"].sum(1))
    for idx, mb, images in micro_batches(batch, by_length, prompts, processor, run, size=args.micro_batch_size,
                                         max_tokens=args.max_tokens_per_micro_batch):  # fmt: skip
        width, kw = mb["input_ids"].shape[1], dict(impl=args.logprob_impl, temperature=args.temperature)
        with run.autocast(model):
            old_logps[idx, :width] = token_logps(model, mb, images, **kw).float().cpu()
            old_values[idx, :width] = token_values(critic, mb, images).cpu()
            if ref_model is not None:
                ref_logps[idx, :width] = token_logps(ref_model, mb, images, **kw).float().cpu()
            elif args.kl_coef > 0:  # LoRA
                with model.disable_adapter():
                    ref_logps[idx, :width] = token_logps(model, mb, images, **kw).float().cpu()
    return old_logps, ref_logps, old_values * batch["response_mask"]


def step_metrics(totals, reward_names, n, n_updates, train_actor, kl_coef) -> dict:
    """The step's logged metrics from the rank-summed totals."""
    var_ret = totals["return_sq"] / totals["resp"] - (totals["return"] / totals["resp"]) ** 2
    var_res = totals["residual_sq"] / totals["resp"] - (totals["residual"] / totals["resp"]) ** 2
    metrics = {"reward/mean": totals["score"] / n,
               "reward/std": math.sqrt(max(0.0, totals["score_sq"] / n - (totals["score"] / n) ** 2)),
               "completion/length_mean": totals["length"] / n, "completion/truncated_fraction": totals["truncated"] / n,
               "train/kl": totals["kl"] / n, "train/kl_coef": kl_coef, "train/value_loss": totals["value_loss"] / n_updates,
               "train/value_clip_fraction": totals["value_clip"] / totals["tokens"],
               "train/explained_variance": 1.0 - var_res / var_ret if var_ret > 1e-8 else 0.0,
               "train/value_mean": totals["value"] / totals["resp"], "train/return_mean": totals["return"] / totals["resp"]}  # fmt: skip
    if train_actor:
        metrics.update({"train/policy_loss": totals["policy_loss"] / n_updates,
                        "train/entropy": totals["entropy"] / totals["tokens"],
                        "train/policy_clip_fraction": totals["policy_clip"] / totals["tokens"],
                        "train/approx_kl": totals["approx_kl"] / totals["tokens"]})  # fmt: skip
    for name in reward_names:
        metrics[f"reward/{name}_mean"] = totals[f"{name}_sum"] / n
        metrics[f"reward/{name}_failures"] = totals[f"{name}_failures"]
    if totals["gap_tokens"]:  # how far the sampler's numerics drift from the training forward's (same weights)
        metrics["rollout/train_vs_sampler_ratio_mean"] = totals["gap_ratio"] / totals["gap_tokens"]
        metrics["rollout/train_vs_sampler_abs_logp_diff_mean"] = totals["gap_abs"] / totals["gap_tokens"]
        if "tis_capped" in totals:
            metrics["rollout/tis_capped_fraction"] = totals["tis_capped"] / totals["gap_tokens"]
    return metrics


# ======================================================================================================== main
def check_args(args: Args, world_size: int) -> int:
    """Refuses flag combinations that can't run, before anything loads; returns the completions per process per step."""
    if args.model_path == Args.model_path and not Path(args.model_path).exists():
        raise SystemExit(f"error: {args.model_path} not found: run `python sft.py` first (its default run exports there), "
                         "or pass --model-path smollm2-135m")  # fmt: skip
    per_process = args.prompts_per_step // world_size * args.group_size
    if args.prompts_per_step % world_size or per_process % args.mini_batches:
        raise SystemExit(f"error: --prompts-per-step {args.prompts_per_step} must split into {world_size} processes x "
                         f"--mini-batches {args.mini_batches}")  # fmt: skip
    if args.group_size < 1:
        raise SystemExit(f"error: --group-size must be >= 1, got {args.group_size}")
    if is_vlm(args.model_path) and args.critic_path and not is_vlm(args.critic_path):
        raise SystemExit(
            f"error: --critic-path {args.critic_path}: a VLM policy needs a VLM critic (or no --critic-path)"
        )
    if args.kl_target is not None and args.kl_coef <= 0:
        raise SystemExit("error: --kl-target adapts --kl-coef multiplicatively: give a starting --kl-coef > 0")
    return args.prompts_per_step // world_size


def loo_centred(scores, n):
    """[rows] scores, prompt-major in groups of n: each minus the mean of its group's other n - 1 (RLOO's baseline,
    Kool et al. 2019; Ahmadian et al. 2024). It depends only on the other samples, so the policy gradient stays
    unbiased; n = 1 returns the scores as they are."""
    if n == 1:
        return scores
    groups = scores.view(-1, n)  # [prompts, n]
    return (groups - (groups.sum(1, keepdim=True) - groups) / (n - 1)).reshape(-1)


def main(args: Args):
    run = setup(args.seed, args.dtype, args.cpu_offload)
    n_prompts = check_args(args, run.world_size)  # prompts per process per step
    rows = n_prompts * args.group_size  # completions per process per step

    # ---- prompts, rewards, plan ----
    reward_names, reward_fns, weights = reward_setup(args)  # --rewards, --reward-url, --reward-model; their weights
    processor = load_processor(args.model_path)
    records, eval_records = load_data(args, with_eval=args.eval_samples > 0)
    train_items = prompt_records(records, processor, script="ppo.py")
    eval_items = [it for it in prompt_records(eval_records, processor, script="ppo.py") if it[1] is not None]
    eval_items = eval_items[: args.eval_samples]
    held_out = held_out_sets(args, processor, eval_items, "ppo.py")  # in-distribution and OOD answer prompts
    weights = torch.tensor(weights, dtype=torch.float32)
    run.print(f"[plan] ppo | model {args.model_path} | critic {args.critic_path or 'policy + zero head'} | "
              f"{len(train_items)} prompts, {len(eval_items)} held-out | {args.max_steps} steps x {args.prompts_per_step} "
              f"prompts x {args.group_size} | mu={args.mu}, {args.mini_batches} mini-batch(es), critic warm-up "
              f"{args.critic_warmup_steps} | "
              f"rewards {', '.join(reward_names)} | kl {args.kl_estimator} x {args.kl_coef}"
              f"{f' -> target {args.kl_target}' if args.kl_target else ''} | world size {run.world_size} | "
              f"{run.device} {run.dtype}")  # fmt: skip
    if args.dry_run:
        run.print(f"[plan] {describe(args.model_path)}; dry run, exiting")
        return None

    # ---- models: actor, critic, reference, reward model; FSDP2; accuracy before ----
    meta = run.sharded and not run.main  # FSDP2: rank 0 reads the weights, the other ranks build on the meta device
    lora = dict(lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets)
    model = load_model(args.model_path, device=run.device, gradient_checkpointing=args.gradient_checkpointing, meta=meta,
                       **lora)  # fmt: skip
    critic, _ = load_value_model(args.critic_path or args.model_path, device=run.device, critic=True,
                                 gradient_checkpointing=args.gradient_checkpointing, meta=meta, **lora)  # fmt: skip
    ref_model = None  # never trained: kept in the compute dtype; with LoRA, the actor with its adapters off
    if args.kl_coef > 0 and args.lora_r == 0:  # FSDP2: built on the meta device, a copy of the actor's shards
        ref_model = load_model(args.model_path, device=run.device, dtype=run.dtype, meta=run.sharded)
        ref_model.eval().requires_grad_(False)
    reward_model = rm_processor = None
    if args.reward_model:
        reward_model, rm_processor = load_value_model(args.reward_model, device=run.device, zero_new_head=False,
                                                      dtype=run.dtype, meta=meta)  # fmt: skip
        reward_model.eval().requires_grad_(False)
    if run.sharded:
        fsdp = fsdp_options(run, args.cpu_offload)
        for m in [m for m in (model, critic, ref_model, reward_model) if m is not None]:
            full = full_weights(m, run) if m is not ref_model else None
            for block in fsdp_blocks(m):  # decoder layers (and a VLM's vision blocks), then the root
                fully_shard(block, **fsdp)
            fully_shard(m, **fsdp)  # root: embeddings, final norm, heads (a VLM's projector too)
            if m is ref_model:  # the reference starts as the actor: each rank copies its own shards
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
    # One module, one optimizer (a parameter group per model), so save_checkpoint/resume cover both exactly; the KL
    # coefficient rides along as a buffer (the adaptive controller changes it).
    state = torch.nn.ModuleDict({"actor": model, "critic": critic})
    state.register_buffer("kl_coef", torch.tensor(float(args.kl_coef), dtype=torch.float64, device=run.device))
    # one lr per part of a VLM actor (projector, vision, LM; lr 0 freezes a part); a text actor is all LM
    actor_groups = param_groups(model, args.lr, args.lr_projector, args.lr_vision, None, args.weight_decay)
    actor_params = [p for p in model.parameters() if p.requires_grad]
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(actor_groups + [{"params": critic_params, "lr": args.critic_lr}],
                                  weight_decay=args.weight_decay, betas=(0.9, 0.99))  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, args.warmup_steps, args.max_steps))
    step = resume(run, args.output_dir, state, optimizer, scheduler) if args.resume else 0
    logger = RunLogger(args.output_dir, asdict(args), run, track=args.track,
                       resume_step=step if args.resume else None)  # fmt: skip
    autocast = run.autocast(model)
    engine = start_vllm(model, args, run)  # --vllm: a colocated engine per process

    # ---- training loop ----
    model.train()
    critic.train()
    progress = tqdm(total=args.max_steps, initial=step, desc="ppo", disable=not run.main, dynamic_ncols=True)
    while step < args.max_steps:
        t0 = time.time()
        torch.manual_seed(derive_seed(args.seed, step, "sampling", run.rank))  # common/run.py's seeding rule
        # -- rollouts and their scores --
        picker = torch.Generator().manual_seed(derive_seed(args.seed, step, "prompts"))
        chosen = torch.randperm(len(train_items), generator=picker)[: args.prompts_per_step].tolist()
        mine = [train_items[i] for i in chosen[run.rank * n_prompts : (run.rank + 1) * n_prompts]]
        encoded = [processor(m, add_generation_prompt=True) for m, _ in mine]  # token ids (+ a VLM's images)
        if engine is not None:  # the policy's current weights, streamed one parameter at a time from the FSDP2 shards
            sync_weights(engine, fsdp_named_tensors(model))
        with autocast:
            completions, truncated, sampler_logps = sample_completions(  # prompt-major: prompt i's j-th at i * G + j
                model, processor, encoded, [m for m, _ in mine], n=args.group_size, engine=engine,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                gather=args.unshard_for_generation)  # fmt: skip
        encoded = [p for p in encoded for _ in range(args.group_size)]  # one entry per row from here on
        prompt_msgs = [m for m, _ in mine for _ in range(args.group_size)]
        answers = [a for _, a in mine for _ in range(args.group_size)]
        if engine is not None:
            sleep_engine(engine)  # GPU: the engine's memory goes back to training until the next rollout phase
        texts = processor.tokenizer.batch_decode(completions, skip_special_tokens=True)
        per_fn, failures = score_completions(reward_fns, texts, prompt_msgs, answers)  # [rows, n_fns]
        if reward_model is not None:  # it reads the whole chat through its own template (and the prompt's images)
            chats = [(m + [{"role": "assistant", "content": t}], ".") for m, t in zip(prompt_msgs, texts)]
            rm_scores = score_chats(reward_model, rm_processor, chats, run, args.micro_batch_size)  # [rows]
            per_fn, failures = torch.cat([per_fn, rm_scores[:, None]], 1), failures + [0]
        scores = per_fn @ weights  # [rows]: the sequence-level reward

        # -- no-grad pass: old logps, reference logps, old values; token rewards (KL + the score at the end), GAE --
        batch = build_batch(
            [p["input_ids"] for p in encoded], completions, processor.tokenizer.pad_token_id, sampler_logps
        )
        mask = batch["response_mask"]  # [rows, L]
        old_logps, ref_logps, old_values = frozen_pass(model, critic, ref_model, batch, encoded, processor, args, run)
        gap = sampler_gap(old_logps, batch["rollout_logps"], mask, args.tis_cap)  # the sampler's numerics vs training
        if args.tis_cap:
            batch["tis"] = tis_weights(old_logps, batch["rollout_logps"], mask, args.tis_cap)
        kl_coef = float(state.kl_coef)
        kl_tok = kl_penalty(old_logps, ref_logps, args.kl_estimator) * mask if args.kl_coef > 0 else 0 * old_logps
        token_rewards = -kl_coef * kl_tok  # [rows, L]
        last = (mask * torch.arange(mask.shape[1])).argmax(1)  # [rows]: each row's last response position
        token_rewards[torch.arange(rows), last] += loo_centred(scores, args.group_size)
        advantages, returns = gae(token_rewards, old_values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = whiten(advantages, mask, all_reduce=True)
        batch.update(advantages=advantages, returns=returns, old_values=old_values, old_logps=old_logps)
        t_rollout = time.time() - t0

        # -- mu epochs over mini-batches; micro-batches accumulate with global-count normalisation --
        train_actor = step >= args.critic_warmup_steps
        order_gen = torch.Generator().manual_seed(derive_seed(args.seed, step, "mini-batches"))
        sums = dict.fromkeys(("policy_loss", "value_loss", "entropy", "policy_clip", "value_clip", "approx_kl",
                              "tokens"), 0.0)  # fmt: skip
        n_updates, actor_norms, critic_norms = 0, [], []
        for _epoch in range(args.mu):
            perm = torch.randperm(rows, generator=order_gen)
            for m in range(args.mini_batches):
                mini = perm[m * rows // args.mini_batches : (m + 1) * rows // args.mini_batches]
                mini = mini[torch.argsort(batch["attention_mask"][mini].sum(1))]  # similar lengths share micro-batches
                n_tok = all_reduce_sums({"tok": mask[mini].sum()}, run)["tok"]
                for _, mb, images in micro_batches(batch, mini, encoded, processor, run, size=args.micro_batch_size,
                                                   max_tokens=args.max_tokens_per_micro_batch):  # fmt: skip
                    mb_mask = mb["response_mask"]
                    with autocast:
                        values = token_values(critic, mb, images)
                        if train_actor:
                            logps, entropy = token_logps(model, mb, images, impl=args.logprob_impl,
                                                         temperature=args.temperature, entropy=True)  # fmt: skip
                    loss, v_clip = value_loss(values, mb["old_values"], mb["returns"], mb_mask, args.value_clip,
                                              n_tokens=n_tok)  # fmt: skip
                    sums["value_loss"] += float(loss.detach())  # already over global counts: ranks' shares add up
                    n_mb_tok = float(mb_mask.sum())
                    if train_actor:
                        p_loss, stats = policy_loss(logps, mb["old_logps"], mb["advantages"], mb_mask,
                                                    clip_low=args.clip_low, clip_high=args.clip_high, n_tokens=n_tok,
                                                    token_weights=mb.get("tis"))  # fmt: skip
                        loss = loss + p_loss
                        sums["policy_loss"] += float(p_loss.detach())
                        sums["entropy"] += float((entropy.detach() * mb_mask).sum())
                        sums["policy_clip"] += float(stats["clip_fraction"]) * n_mb_tok
                        sums["approx_kl"] += float(stats["approx_kl"]) * n_mb_tok
                    # FSDP2 averages gradients over ranks; scaling by world_size turns that into the global sum
                    (loss * run.world_size).backward()
                    sums["value_clip"] += float(v_clip) * n_mb_tok
                    sums["tokens"] += n_mb_tok
                if train_actor:
                    actor_norms.append(clip_grad_norm(actor_params, args.max_grad_norm))
                critic_norms.append(clip_grad_norm(critic_params, args.max_grad_norm))
                optimizer_step(optimizer, scheduler)  # actor parameters without gradients (critic warm-up) stay put
                n_updates += 1
        step += 1

        # -- metrics (global over ranks), the adaptive KL coefficient --
        t_end = time.time()
        residual = (returns - old_values) * mask
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
        totals = all_reduce_sums({**sums, **gap, "score": scores.sum(), "score_sq": scores.square().sum(),
                                  "length": lengths.sum(), "truncated": sum(truncated), "kl": kl_tok.sum(),
                                  "return": returns.sum(), "return_sq": returns.square().sum(), "residual": residual.sum(),
                                  "residual_sq": residual.square().sum(), "resp": mask.sum(), "value": old_values.sum(),
                                  **{f"{name}_sum": v for name, v in zip(reward_names, per_fn.sum(0).tolist())},
                                  **{f"{name}_failures": v for name, v in zip(reward_names, failures)}}, run)  # fmt: skip
        n_samples = float(args.prompts_per_step * args.group_size)
        metrics = step_metrics(totals, reward_names, n_samples, n_updates, train_actor, kl_coef)
        metrics.update({"train/critic_grad_norm": sum(critic_norms) / len(critic_norms),
                        "train/lr": scheduler.get_last_lr()[0], "time/rollout_share": t_rollout / (t_end - t0),
                        "time/step_s": t_end - t0})  # fmt: skip
        if train_actor:
            metrics["train/actor_grad_norm"] = sum(actor_norms) / len(actor_norms)
        if args.kl_target is not None and args.kl_coef > 0:
            kl_seq = totals["kl"] / n_samples
            state.kl_coef.fill_(adaptive_kl_coef(kl_coef, kl_seq, args.kl_target, n_samples, args.kl_horizon))
        logger.log(metrics, step)
        progress.update(1)
        progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['train/kl']:.3f}")
        if save_if_due(run, args, step, args.max_steps, state, optimizer, scheduler):
            return finish(run, logger, {"step": step, "preempted": True}, progress, engine)
    progress.close()

    # ---- export and answer accuracy after training ----
    if args.export:
        out = Path(args.output_dir)
        export_model(model, processor, out / "model", run, base_path=args.model_path, merge=args.merge)
        export_value_model(critic, processor, out / "critic", run, base_path=args.critic_path or args.model_path)
        run.print(f"[export] {out / 'model'} (policy), {out / 'critic'} (critic)")
    evaluate(model, processor, held_out, run, results, "after", max_new_tokens=args.max_new_tokens,
             gather=args.unshard_for_generation, before=flags_before)  # fmt: skip
    if results:
        logger.log({f"eval/{k}": v for k, v in results.items()}, step)
    return finish(run, logger, {"step": step, **results}, engine=engine)


if __name__ == "__main__":
    main(cli(Args))
