"""dpo.py: direct preference optimisation and its family (DPO, cDPO, hinge, IPO, robust, SimPO, ORPO, KTO), in one file.

For a prompt x with a preferred answer y_w and a dispreferred one y_l, every loss here is a function of the policy's
sequence log-probabilities log pi(y|x) (summed over the answer tokens, or averaged for ipo/simpo/orpo) and, except for
the reference-free simpo and orpo, of the same quantities under a frozen reference model. The implied reward of an
answer is r(y) = beta * (log pi(y|x) - log pi_ref(y|x)) (beta * log pi(y|x) when reference-free); see
`preference_loss` for each formula and its paper.

Launch:
    python dpo.py                                          # one CPU: SmolLM2-135M-Instruct on the bundled arithmetic pairs
    python dpo.py --model-path runs/sft/model              # start from sft.py's default run (better: it knows the format)
    python dpo.py --loss-type ipo --beta 0.5 --lora-r 16 --merge
    python dpo.py --model-path Qwen/Qwen2.5-0.5B-Instruct --dataset prefs.jsonl   # one GPU (picked up automatically)
    torchrun --nproc_per_node=8 dpo.py --dataset prefs.jsonl   # N GPUs, FSDP2
    python dpo.py --config run.yaml --dry-run
    python dpo.py --model-path runs/vqa_sft/model --dataset prefs.jsonl --lr-vision 0   # a VLM on image pairs

Data: records {"prompt", "chosen", "rejected"} (strings or chat messages; the prompt may be implicit), with kto also
unpaired {"prompt", "completion", "label"} (common/datasets.py); loss only on the answer tokens. With a VLM, prompts
may hold images; projector, encoder and LM get their own learning rates (--lr-projector/--lr-vision/--lr-lm).

Where this departs from the textbook / from TRL's DPOTrainer:
  * The reference log-probs are computed once, before training, in a no-grad pass over the data, and cached on disk under
    a key of (reference model identity, tokenised data and a VLM's preprocessed pixels, max_len, dtype). No reference
    model sits in memory while training, and a second run with the same model and data skips the pass. TRL by default
    runs the reference every step.
  * One forward per micro-batch: the chosen rows, then the rejected rows, in one batch (padded, or packed with
    `--packing`, where sequences are told apart by restarting position_ids and a per-token sequence index).
  * The loss is averaged over the pairs of the whole accumulated global batch across ranks, so gradient accumulation and the
    number of GPUs do not change the gradient. KTO's KL reference point is likewise estimated over the global batch
    (a no-grad pass over mismatched prompt/answer pairs before the loss forwards).
  * Unpaired KTO data (TRL's KTOTrainer shape) trains example by example: --batch-size counts examples there, and the
    logged rewards/logps are means over the desirable and the undesirable examples of the batch.
  * ORPO's NLL term is the per-pair mean token NLL of the chosen answer (the paper's eq. 6); TRL averages over all chosen
    tokens of the batch instead.
  * With LoRA the reference is the base model with the adapters disabled (`model.disable_adapter()`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from tqdm import tqdm

from common.chat import epoch_batches
from common.checkpoint import export_model, load_or_compute, resume, save_if_due, weights_identity
from common.cli import cli
from common.datasets import load_data
from common.evaluation import evaluate, held_out_sets
from common.models import cache_dir, describe, fsdp_blocks, load_model, load_processor
from common.pairs import build_pairs, collate_pairs, len_answer, sequence_logps, sides_of
from common.rollout import prompt_records
from common.run import (
    RunLogger,
    fill_shards,
    finish,
    fsdp_options,
    full_weights,
    lr_lambda,
    optimizer_step,
    reshard,
    setup,
)
from common.vision import param_groups

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")
LENGTH_AVERAGED = ("ipo", "simpo", "orpo")  # these losses see mean token log-probs, the others summed ones


@dataclass
class Args:
    model_path: str = "smollm2-135m"
    """policy to train: an alias (smollm2-135m), a .gguf file, a local HF folder (e.g. runs/sft/model) or a hub id; or a
    VLM folder (common/vision.py's save_vlm, or a native HF VLM): then prompts may hold images"""
    ref_model: str | None = None
    """reference model (same tokenizer as the policy); default: the initial policy (with LoRA: the base model with
    adapters disabled)"""
    dataset: str = "data/arith_pref/train.jsonl"
    """preference pairs (chosen, rejected, prompt explicit or implicit) or, for kto, unpaired (prompt, completion,
    label) records: a .jsonl/.json/.parquet file, a folder of them, or a hub name; a weighted mixture as
    --dataset a.jsonl:0.7 --dataset b.jsonl:0.3"""
    eval_dataset: str | None = "data/arith_pref/test.jsonl"
    """held-out pairs for preference accuracy (and task accuracy when records carry an `answer` field)"""
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
    output_dir: str = "runs/dpo"
    """checkpoints, metrics.jsonl and the exported Hugging Face folder (`<output-dir>/model`) go here"""
    config: str | None = None
    """a .yaml or .json file of field: value defaults; command-line flags override them"""
    dry_run: bool = False
    """validate arguments, read the data and the model config, print the plan and exit"""
    seed: int = 0
    """seed for data order"""
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "simpo", "orpo", "kto"] = "sigmoid"
    """preference loss (see preference_loss)"""
    beta: float = 0.1
    """inverse temperature of the implied reward (ORPO: the weight lambda of the odds-ratio term)"""
    label_smoothing: float = 0.0
    """probability that a label is flipped (sigmoid: conservative DPO; robust; simpo); must be < 0.5"""
    gamma: float = 0.5
    """SimPO's target reward margin"""
    desirable_weight: float = 1.0
    """KTO's lambda_D, the weight of desirable answers (chosen, or label true)"""
    undesirable_weight: float = 1.0
    """KTO's lambda_U, the weight of undesirable answers (rejected, or label false); the paper advises
    lambda_D n_D / (lambda_U n_U) in [1, 4/3]"""
    lr: float = 5e-6
    """peak learning rate (AdamW)"""
    lr_projector: float | None = None
    """VLM only: learning rate of the projector (None: --lr; 0 freezes it)"""
    lr_vision: float | None = None
    """VLM only: learning rate of the vision encoder (None: --lr; 0 freezes it)"""
    lr_lm: float | None = None
    """VLM only: learning rate of the language model (None: --lr; 0 freezes it)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """learning-rate decay after warmup"""
    warmup_steps: int = 5
    """linear warmup from 0 to --lr over this many steps"""
    min_lr_ratio: float = 0.1
    """cosine/linear decay ends at lr * min_lr_ratio"""
    epochs: int = 1
    """passes over the training pairs (ignored when --max-steps > 0)"""
    max_steps: int = 40
    """optimizer steps to run; 0 means --epochs full passes"""
    batch_size: int = 8
    """pairs (unpaired KTO data: examples) per micro-batch per process (2x as many rows: chosen, then rejected)"""
    grad_accum: int = 1
    """micro-batches accumulated per optimizer step; global batch = batch_size * grad_accum * world_size pairs"""
    max_len: int = 256
    """maximum tokens of prompt + answer (and the row length with --packing)"""
    overlong: Literal["truncate", "drop"] = "truncate"
    """what to do with pairs longer than --max-len"""
    packing: bool = False
    """pack the batch's sequences into rows of --max-len tokens instead of padding each to the longest"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (0 disables)"""
    dtype: str = "auto"
    """compute dtype: auto (bf16 where the hardware has it), float32 or bfloat16; master weights stay float32"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    cpu_offload: bool = False
    """FSDP2's CPU offload: parameters, gradients and optimizer state stay on the CPU between uses (launch with torchrun;
    --nproc_per_node=1 for one device)"""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights"""
    lora_alpha: int = 16
    """LoRA scaling numerator"""
    lora_targets: tuple[str, ...] | None = None
    """module names LoRA wraps; default depends on the architecture"""
    merge: bool = False
    """with LoRA: also export the merged model to <output-dir>/model (the adapter always goes to <output-dir>/model/adapter)"""
    logprob_impl: Literal["fused", "naive"] = "fused"
    """fused: chunked kernel that never builds the logits; naive: log_softmax over full logits"""
    ref_cache_dir: str | None = None
    """where reference log-probs are cached (default: $CLEANPOST_CACHE/dpo_ref)"""
    eval_every: int = 0
    """held-out preference eval every N steps (0: only before and after training)"""
    ood_dataset: str | None = "data/arith/ood.jsonl"
    """an out-of-distribution held-out set, answered before and after training beside --eval-dataset's, with paired
    counts and a sign test (common/evaluation.py); the default, the bundled task's OOD split, only with its test split"""
    eval_samples: int = 50
    """held-out prompts answered by greedy generation before and after training for task accuracy (0 disables)"""
    max_new_tokens: int = 96
    """generation budget for the task-accuracy eval"""
    save_every: int = 50
    """save a resumable checkpoint every N steps (0: only on preemption and at the end)"""
    keep_checkpoints: int = 2
    """how many recent checkpoints to keep"""
    resume: bool = False
    """continue from the newest complete checkpoint in <output-dir>/checkpoints"""
    export: bool = True
    """write a Hugging Face folder to <output-dir>/model at the end"""
    track: bool = False
    """log to Weights & Biases (offline mode when no account is configured; WANDB_PROJECT, WANDB_NAME name the run)"""


# ------------------------------------------------------------------------------------------------ losses
def _log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(logp)) for logp < 0, stable near 0 (expm1) and for very negative logp."""
    return torch.log(-torch.expm1(logp.clamp(max=-1e-6)))


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: mean (policy - reference) logps of mismatched prompt/answer pairs, no gradient, >= 0."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(logratios, desirable, kl, *, beta: float, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 8) per example [B], and the implied rewards [B] (no
    gradient). With r = log pi(y|x) - log pi_ref(y|x) (`logratios`), z0 = `kl` (kto_kl) and `desirable` [B] bool:
        desirable y:    lambda_D (1 - sigma(beta (r - z0)))
        undesirable y:  lambda_U (1 - sigma(beta (z0 - r)))
    i.e. lambda_y - v(x, y) of the paper's loss E[lambda_y - v(x, y)]; TRL's desirable_weight and undesirable_weight."""
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))))  # fmt: skip
    return losses, beta * logratios.detach()


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                    loss_type: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.5, kl=None,
                    desirable_weight: float = 1.0, undesirable_weight: float = 1.0):  # fmt: skip
    """Per-pair losses [B] and the implied rewards of the chosen and rejected answers ([B] each, no gradient).

    All inputs are [B] sequence log-probs (summed over answer tokens; length-averaged for ipo, simpo, orpo: the caller
    averages). The reference ones are ignored (may be None) for the reference-free simpo and orpo. With
    h = (pi_w - ref_w) - (pi_l - ref_l), the difference of log-ratios, and eps = label_smoothing:

    sigmoid  DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7): -log sigma(beta h); with eps > 0 conservative DPO
             (Mitchell 2023, "A note on DPO with noisy preferences"): -(1-eps) log sigma(beta h) - eps log sigma(-beta h).
    hinge    SLiC (Zhao et al. 2023, arXiv:2305.10425, eq. 3, with delta = 1 and beta = 1/delta): max(0, 1 - beta h).
    ipo      IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17; length-averaged logps as in TRL):
             (h - 1/(2 beta))^2, where beta is the paper's tau.
    robust   robust DPO (Chowdhury et al. 2024, arXiv:2403.00409, eq. 9): an unbiased loss under label flips with rate eps:
             (-(1-eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps).
    simpo    SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6): reference-free, length-averaged logps, target margin gamma:
             -log sigma(beta (pi_w - pi_l) - gamma) (label-smoothed like sigmoid when eps > 0).
    orpo     ORPO (Hong et al. 2024, arXiv:2403.07691, eqs. 7-8): with odds(y) = p / (1 - p), p = exp(mean token logp),
             -beta log sigma(log odds(y_w) - log odds(y_l)); beta is the paper's lambda. The caller adds the chosen
             answer's NLL (the SFT term of eq. 6).
    kto      KTO (kto_loss) on the pair's two answers, chosen desirable and rejected undesirable, reference point z0 =
             `kl` (see kto_kl): (lambda_D (1 - sigma(beta (log-ratio_w - z0))) + lambda_U (1 - sigma(beta (z0 -
             log-ratio_l)))) / 2, i.e. the mean over the 2B examples as in TRL.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    eps = label_smoothing
    if loss_type in REFERENCE_FREE:
        chosen_rewards, rejected_rewards = beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()
    else:
        chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [B]
        rejected_logratios = policy_rejected_logps - ref_rejected_logps  # [B]
        chosen_rewards, rejected_rewards = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
        h = chosen_logratios - rejected_logratios  # [B]

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "simpo":
        z = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "orpo":
        log_odds = (policy_chosen_logps - policy_rejected_logps) - (
            _log1mexp(policy_chosen_logps) - _log1mexp(policy_rejected_logps)
        )
        losses = -beta * F.logsigmoid(log_odds)
    else:  # kto
        if kl is None:
            raise ValueError("loss_type='kto' needs kl= (the reference point, see kto_kl)")
        weights = dict(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        desirable = torch.ones_like(chosen_logratios, dtype=torch.bool)
        losses = (kto_loss(chosen_logratios, desirable, kl, **weights)[0]
                  + kto_loss(rejected_logratios, ~desirable, kl, **weights)[0]) / 2  # fmt: skip
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------------------- reference pass
def reference_cache_key(ref_path: str, pairs: list[dict], sides, max_len: int, dtype: torch.dtype) -> str:
    """Hash of the reference model's identity and the exact tokens scored (which covers data, template and max_len),
    and of a VLM's preprocessed images (an image token says nothing about the pixels behind it)."""
    model = weights_identity(ref_path)
    h = hashlib.sha1(json.dumps({"model": model, "max_len": max_len, "dtype": str(dtype), "sides": list(sides)},
                                sort_keys=True).encode())  # fmt: skip
    for p in pairs:
        for side in sides:
            h.update(json.dumps([p[side]["input_ids"], p[side]["labels"]]).encode())
            for image in p[side].get("images", ()):
                for name in sorted(image):
                    h.update(image[name].numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_logps(model, pairs, sides, args, processor, run) -> dict:
    """{side: summed answer log-probs [N]} of every pair, no grad; ranks share the work and all-reduce. Every rank
    runs as many forwards (FSDP2's are collective): one with nothing left scores a pair and drops it."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(sides), len(pairs), dtype=torch.float32, device=run.device)  # [sides, N]
    mine = list(range(run.rank, len(pairs), run.world_size))
    n_batches = math.ceil(math.ceil(len(pairs) / run.world_size) / args.batch_size)
    for b in tqdm(range(n_batches), desc="reference logps", disable=not run.main, leave=False):
        idx = mine[b * args.batch_size : (b + 1) * args.batch_size]
        batch = collate_pairs([pairs[i] for i in idx or [0]], processor, packing=args.packing, max_len=args.max_len,
                              sides=sides)  # fmt: skip
        with run.autocast(model):
            sums, _ = sequence_logps(model, batch, args.logprob_impl)
        if idx:
            out[:, idx] = sums.float().view(len(sides), len(idx))
    if dist.is_initialized():
        dist.all_reduce(out)
    reshard(model)
    model.train(was_training)
    return {side: out[k].cpu() for k, side in enumerate(sides)}


def reference_logps(args, name, pairs, sides, policy, processor, run):
    """Reference logps of `pairs` ({side: [N]}), from the disk cache when the same reference already scored the same
    tokens, and whether it did. The reference: --ref-model, the base model with LoRA's adapters off, or the initial
    policy (called before any update)."""

    @torch.no_grad()
    def compute():
        if args.ref_model:  # loaded, sharded like the policy, used once and dropped
            ref = load_model(args.ref_model, device=run.device, dtype=run.dtype, meta=run.sharded and not run.main)
            if run.sharded:
                full, fsdp = full_weights(ref, run), fsdp_options(run, args.cpu_offload)
                for block in fsdp_blocks(ref):
                    fully_shard(block, **fsdp)
                fully_shard(ref, **fsdp)
                fill_shards(ref, full, run)
            return compute_logps(ref, pairs, sides, args, processor, run)
        with policy.disable_adapter() if args.lora_r > 0 else contextlib.nullcontext():  # LoRA: no second model
            return compute_logps(policy, pairs, sides, args, processor, run)

    key = reference_cache_key(args.ref_model or args.model_path, pairs, sides, args.max_len, run.dtype)
    path = Path(args.ref_cache_dir or cache_dir() / "dpo_ref") / f"{key}.pt"
    t0 = time.time()
    logps, hit = load_or_compute(path, compute, run)
    run.print(f"[ref] {name}: {'cached' if hit else 'computed'} reference logps of {len(pairs)} pairs in "
              f"{time.time() - t0:.1f} s: {path}")  # fmt: skip
    return logps, hit


# ----------------------------------------------------------------------------------------------- one step
def policy_logps(model, chunk, args, processor, run, sides=("chosen", "rejected")):
    """Policy logps of the chunk's sequences, side by side ([B] each: chosen, rejected), averaged per token for the
    length-averaged losses."""
    batch = collate_pairs(chunk, processor, packing=args.packing, max_len=args.max_len, sides=sides)
    with run.autocast(model):
        sums, counts = sequence_logps(model, batch, args.logprob_impl)
    logps = sums / counts.clamp(min=1) if args.loss_type in LENGTH_AVERAGED and sides != ("kl",) else sums
    return logps.chunk(len(sides))


def pair_losses(model, chunk, ref_table, kl, args, processor, run):
    """Per-pair losses [B] and the metric rows [B, 8] of one micro-batch (of examples, for unpaired KTO data)."""
    if "label" in chunk[0]:
        return example_losses(model, chunk, ref_table, kl, args, processor, run)
    pc, pr = policy_logps(model, chunk, args, processor, run)
    idx = torch.tensor([p["index"] for p in chunk])
    rc = ref_table["chosen"][idx].to(pc.device) if ref_table else None
    rr = ref_table["rejected"][idx].to(pc.device) if ref_table else None
    if rc is not None and args.loss_type in LENGTH_AVERAGED:  # ipo: the reference is averaged like the policy
        rc = rc / torch.tensor([len_answer(p["chosen"]) for p in chunk], device=pc.device)
        rr = rr / torch.tensor([len_answer(p["rejected"]) for p in chunk], device=pc.device)
    losses, cr, rj = preference_loss(pc, pr, rc, rr, loss_type=args.loss_type, beta=args.beta,
                                     label_smoothing=args.label_smoothing, gamma=args.gamma, kl=kl,
                                     desirable_weight=args.desirable_weight,
                                     undesirable_weight=args.undesirable_weight)  # fmt: skip
    if args.loss_type == "orpo":
        losses = losses - pc  # the SFT term: mean token NLL of the chosen answer
    rows = torch.stack(
        [losses.detach(), cr, rj, cr - rj, (cr > rj).float(), pc.detach(), pr.detach(), (pc > pr).float().detach()], 1
    )  # fmt: skip  [B, 8]
    return losses, rows


def example_losses(model, chunk, ref_table, kl, args, processor, run):
    """Unpaired KTO: per-example losses [B] and metric rows [B, 8]: loss, the reward and log-prob of each example as
    desirable and as undesirable (0 when it is the other kind), whether its reward has its label's sign, and the two
    kinds' indicators (metric_means averages the rewards and log-probs over each kind)."""
    (logps,) = policy_logps(model, chunk, args, processor, run, sides=("completion",))
    idx = torch.tensor([p["index"] for p in chunk])
    desirable = torch.tensor([p["label"] for p in chunk], device=logps.device)
    losses, rewards = kto_loss(logps - ref_table["completion"][idx].to(logps.device), desirable, kl, beta=args.beta,
                               desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight)  # fmt: skip
    d, u, lp = desirable.float(), (~desirable).float(), logps.detach()
    return losses, torch.stack([losses.detach(), rewards * d, rewards * u, ((rewards > 0) == desirable).float(),
                                lp * d, lp * u, d, u], 1)  # fmt: skip


@torch.no_grad()
def global_kl(model, chunks, ref_table, args, processor, run, filler):
    """KTO's reference point z0 over the global batch: kto_kl of every rank's mismatched pairs. An empty chunk (an eval
    tail) still runs a forward on `filler`: FSDP2 ranks must run as many."""
    policy, ref = [torch.zeros(0, dtype=torch.float64)], [torch.zeros(0, dtype=torch.float64)]
    for chunk in chunks:
        (logps,) = policy_logps(model, chunk or filler, args, processor, run, sides=("kl",))
        if chunk:
            policy.append(logps.double().cpu())
            ref.append(ref_table["kl"][torch.tensor([p["index"] for p in chunk])].double())
    policy, ref = torch.cat(policy), torch.cat(ref)
    if dist.is_initialized():  # every rank's pairs: z0 is a global-batch mean
        gathered = [None] * run.world_size
        dist.all_gather_object(gathered, (policy, ref))
        policy, ref = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
    return kto_kl(policy, ref).float().to(run.device)


@torch.no_grad()
def run_eval(model, eval_pairs, ref_eval, args, processor, run) -> dict:
    """Held-out means of loss, rewards and accuracies (reward margin > 0; policy logp of chosen > rejected)."""
    model.eval()
    n_batches = math.ceil(len(eval_pairs) / (args.batch_size * run.world_size))
    chunks = [
        eval_pairs[(b * run.world_size + run.rank) * args.batch_size :][: args.batch_size] for b in range(n_batches)
    ]
    kl = global_kl(model, chunks, ref_eval, args, processor, run, eval_pairs[:1]) if args.loss_type == "kto" else None
    totals = torch.zeros(9, dtype=torch.float64, device=run.device)  # 8 metric sums + pair count
    for chunk in chunks:
        _, rows = pair_losses(model, chunk or eval_pairs[:1], ref_eval, kl, args, processor, run)  # as many forwards
        if chunk:
            totals[:8] += rows.double().sum(0)
            totals[8] += len(chunk)
    model.train()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return metric_means(totals[:8], totals[8], "eval", unpaired="label" in eval_pairs[0])


def metric_means(sums, n, prefix: str, unpaired=False) -> dict:
    """Means of the summed metric rows of n pairs (logps_accuracy: held-out only). Unpaired KTO data: rewards and
    log-probs averaged over the desirable examples (logged as chosen) and the undesirable ones (rejected), as TRL's
    KTOTrainer logs them; no logps_accuracy (there are no pairs)."""
    m = (sums / n).tolist()
    if unpaired:
        d, u = max(m[6], 1e-12), max(m[7], 1e-12)  # the shares of desirable and undesirable examples
        m = [m[0], m[1] / d, m[2] / u, m[1] / d - m[2] / u, m[3], m[4] / d, m[5] / u]
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "logps_accuracy")[: 7 if prefix == "train" else 8]  # fmt: skip
    return {f"{prefix}/{k}": v for k, v in zip(keys, m)}


# ------------------------------------------------------------------------------------------------------ main
def main(args: Args):
    if not 0.0 <= args.label_smoothing < 0.5:
        raise SystemExit(f"error: --label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    run = setup(args.seed, args.dtype, args.cpu_offload)
    needs_ref = args.loss_type not in REFERENCE_FREE

    # ---- data (the processor tokenises; a VLM's also reads the images) ----
    processor = load_processor(args.model_path)
    if args.packing and not processor.packable:
        run.print(
            "[note] a native VLM computes its own (M-RoPE) positions, which packed rows cannot restart: --no-packing"
        )
        args = replace(args, packing=False)
    with_kl = args.loss_type == "kto"
    records, eval_records = load_data(args)
    pairs, _ = build_pairs(records, processor, max_len=args.max_len, overlong=args.overlong, with_kl=with_kl,
                           name=args.dataset)  # fmt: skip
    eval_pairs, answer_items = [], []
    if eval_records:
        eval_pairs, kept = build_pairs(eval_records, processor, max_len=args.max_len, with_kl=with_kl, name="held-out")
        answer_items = [r for r in kept if "answer" in r][: args.eval_samples]
        answer_items = prompt_records(answer_items, processor, script="dpo.py")  # image paths resolved
    held_out = held_out_sets(args, processor, answer_items, "dpo.py")  # in-distribution and OOD answer prompts
    global_pairs = args.batch_size * args.grad_accum * run.world_size
    steps_per_epoch = len(pairs) // global_pairs
    if steps_per_epoch == 0:
        raise SystemExit(
            f"error: {len(pairs)} training pairs is less than one global batch of {global_pairs} "
            f"(--batch-size {args.batch_size} x --grad-accum {args.grad_accum} x {run.world_size} processes)"
        )
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
    ref_desc = args.ref_model or ("base model, adapters off" if args.lora_r else "initial policy")
    run.print(
        f"[plan] {args.loss_type} (beta {args.beta}) | model {args.model_path} | reference "
        f"{ref_desc if needs_ref else 'none (reference-free)'} | {len(pairs)} pairs, eval {len(eval_pairs)} pairs, "
        f"{len(answer_items)} answer prompts | {total_steps} steps x {global_pairs} pairs "
        f"({total_steps / steps_per_epoch:.2f} epochs) | world size {run.world_size} | {run.device} {run.dtype}"
    )
    if args.dry_run:
        run.print(f"[plan] {describe(args.model_path)}; dry run, exiting")
        return None

    # ---- model, reference logps (before any update and before FSDP2), answer accuracy before ----
    model = load_model(args.model_path, device=run.device, gradient_checkpointing=args.gradient_checkpointing,
                       lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                       meta=run.sharded and not run.main)  # fmt: skip
    if run.sharded:  # FSDP2: rank 0 read the weights, the other ranks built their model on the meta device
        full, fsdp = full_weights(model, run), fsdp_options(run, args.cpu_offload)
        for block in fsdp_blocks(model):  # decoder layers (and a VLM's vision blocks), then the root
            fully_shard(block, **fsdp)
        fully_shard(model, **fsdp)  # root: embeddings, final norm, LM head (a VLM's projector too)
        fill_shards(model, full, run)  # rank 0's weights into every rank's shards
    results: dict = {"ref_cache_hit": {}}
    ref, ref_eval = {}, {}
    if needs_ref:  # the reference pass: before any update
        ref, results["ref_cache_hit"]["train"] = reference_logps(args, "train", pairs, sides_of(pairs), model,
                                                                 processor, run)  # fmt: skip
        if eval_pairs:
            ref_eval, results["ref_cache_hit"]["eval"] = reference_logps(args, "eval", eval_pairs, sides_of(eval_pairs),
                                                                         model, processor, run)  # fmt: skip
    flags_before = None
    if not args.resume:
        flags_before = evaluate(model, processor, held_out, run, results, "before", max_new_tokens=args.max_new_tokens)
    # one lr per part of a VLM (projector, vision, LM; lr 0 freezes a part); a text model is all LM
    groups = param_groups(model, args.lr, args.lr_projector, args.lr_vision, args.lr_lm, args.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, args.warmup_steps, total_steps, args.schedule, args.min_lr_ratio))  # fmt: skip
    step = resume(run, args.output_dir, model, optimizer, scheduler) if args.resume else 0
    logger = RunLogger(args.output_dir, asdict(args), run, track=args.track,
                       resume_step=step if args.resume else None)  # fmt: skip
    if eval_pairs and step == 0:
        before = run_eval(model, eval_pairs, ref_eval, args, processor, run)
        results.update(preference_accuracy_before=before["eval/rewards/accuracies"],
                       logps_accuracy_before=before.get("eval/logps_accuracy", math.nan))  # fmt: skip
        run.print(f"[eval] held-out before training: reward accuracy {results['preference_accuracy_before']:.3f} "
                  f"(margin > 0), policy prefers chosen {results['logps_accuracy_before']:.3f}")  # fmt: skip
        logger.log(before, 0)

    # ---- training loop ----
    model.train()
    progress = tqdm(total=total_steps, initial=step, desc=args.loss_type, disable=not run.main, dynamic_ncols=True)
    while step < total_steps:
        t0 = time.time()
        epoch, position = divmod(step, steps_per_epoch)
        order = [i for batch in epoch_batches(len(pairs), global_pairs, args.seed, epoch) for i in batch]
        per_rank = args.batch_size * args.grad_accum
        mine = [pairs[i] for i in order[position * global_pairs + run.rank * per_rank :][:per_rank]]
        chunks = [mine[m * args.batch_size : (m + 1) * args.batch_size] for m in range(args.grad_accum)]
        kl = global_kl(model, chunks, ref, args, processor, run, pairs[:1]) if args.loss_type == "kto" else None
        sums = torch.zeros(8, dtype=torch.float64, device=run.device)
        for chunk in chunks:
            losses, rows = pair_losses(model, chunk, ref, kl, args, processor, run)
            # FSDP2 averages gradients over ranks; scaling by world_size turns that into the global-batch mean
            (losses.sum() * run.world_size / global_pairs).backward()
            sums += rows.double().sum(0)
        if dist.is_initialized():
            dist.all_reduce(sums)
        lrs = scheduler.get_last_lr()  # this step's, one per param group
        grad_norm = optimizer_step(optimizer, scheduler, trainable, args.max_grad_norm)
        step += 1

        metrics = metric_means(sums, global_pairs, "train", unpaired="label" in pairs[0])
        metrics.update({"train/lr": lrs[0], "train/grad_norm": grad_norm, "train/epoch": step / steps_per_epoch,
                        "train/pairs_per_s": global_pairs / (time.time() - t0)})  # fmt: skip
        if len(lrs) > 1:  # a VLM's parts
            metrics |= {f"train/lr_{group['name']}": lr for group, lr in zip(optimizer.param_groups, lrs)}
        if kl is not None:
            metrics["train/kl"] = kl.item()
        if eval_pairs and ((args.eval_every and step % args.eval_every == 0) or step == total_steps):
            metrics.update(run_eval(model, eval_pairs, ref_eval, args, processor, run))
        logger.log(metrics, step)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/rewards/accuracies']:.2f}")
        if save_if_due(run, args, step, total_steps, model, optimizer, scheduler):
            return finish(run, logger, {"step": step, "preempted": True, **results}, progress)
    progress.close()
    if eval_pairs and "eval/loss" in metrics:
        results.update(preference_accuracy_after=metrics["eval/rewards/accuracies"],
                       logps_accuracy_after=metrics.get("eval/logps_accuracy", math.nan))  # fmt: skip
        run.print(f"[eval] held-out after training: reward accuracy {results['preference_accuracy_after']:.3f}, "
                  f"policy prefers chosen {results['logps_accuracy_after']:.3f}")  # fmt: skip

    # ---- export and answer accuracy after training ----
    if args.export:
        out = export_model(model, processor, Path(args.output_dir) / "model", run, base_path=args.model_path,
                           merge=args.merge)  # fmt: skip
        run.print(f"[export] {out}")
    evaluate(model, processor, held_out, run, results, "after", max_new_tokens=args.max_new_tokens, before=flags_before)
    logger.log({f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))}, step)
    return finish(run, logger, {"step": step, **results})


if __name__ == "__main__":
    main(cli(Args))
