"""reward_model.py: a Bradley-Terry reward model on preference pairs, for text models and VLMs, in one file.

For a prompt x with a preferred answer y_w and a dispreferred one y_l, the model's scalar score r (a linear head on the
last token of the whole chat) is trained so that the preferred chat scores higher:

    loss = - mean over pairs of log sigmoid(r(x, y_w) - r(x, y_l))        (Bradley & Terry 1952; Ouyang et al. 2022)

A text model becomes a sequence-classification model (num_labels=1), exported as a Hugging Face
AutoModelForSequenceClassification folder; a VLM becomes a VLMCritic (common/value.py) that scores each side with the
prompt's image, exported as a save_vlm folder plus value_head.safetensors. ppo.py and grpo.py read either with
--reward-model, and ppo.py's --critic-path starts its critic from one.

Launch:
    python sft.py && python reward_model.py            # 1 CPU: from sft.py's export, on the bundled arithmetic pairs
    python reward_model.py --model-path smollm2-135m   # from the instruct model itself
    python reward_model.py --model-path runs/vqa_sft/model --dataset easy-vqa:pairs-train \\
        --eval-dataset easy-vqa:pairs-test --output-dir runs/vqa_rm          # a VLM reward model on image pairs
    python reward_model.py --model-path Qwen/Qwen2.5-0.5B-Instruct --dataset prefs.jsonl   # 1 GPU
    torchrun --nproc_per_node=8 reward_model.py --model-path Qwen/Qwen2.5-1.5B-Instruct --dataset prefs.jsonl   # N GPUs

Where this departs from TRL's RewardTrainer / OpenRLHF:
  * Pairs with a side longer than --max-len tokens are skipped, not truncated (a cut answer is not the one judged).
  * The head reads each right-padded row's last real token (as TRL; OpenRLHF reads the EOS token), or with
    `--pooling mean` its mean over the assistant tokens, which gives every answer token a gradient. No reward-centring
    or margin term.
  * `--pooling logprob` (text models) has no head: r is the LM's mean log-probability of the answer tokens, SimPO's
    reference-free implicit reward (Meng et al. 2024) with beta 1 and no margin, exported as a causal-LM folder. An LM
    that has seen the task already scores right answers above wrong ones (sft.py's export: 197 of the 200 held-out
    pairs before any training, docs/results.md).
  * The chats are rendered by the reward model's own chat template, so at PPO time it reads the decoded completion,
    whatever the policy's tokenizer.
  * A new head starts from transformers' default initialisation (a critic's starts at zero: common/value.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from tqdm import tqdm

from common.checkpoint import resume, save_if_due
from common.cli import cli
from common.data import DataError, has_images, load_mixture, preference_messages
from common.datasets import detect_format, load_data
from common.models import describe, fsdp_blocks, load_processor
from common.run import (
    RunLogger,
    all_reduce_sums,
    derive_seed,
    fill_shards,
    finish,
    fsdp_options,
    full_weights,
    lr_lambda,
    optimizer_step,
    setup,
)
from common.value import chat_scores, export_value_model, load_value_model, score_chats, set_pooling
from common.vision import is_vlm


@dataclass
class Args:
    model_path: str = "runs/sft/model"
    """the reward model's trunk: `python sft.py`'s export, an alias (smollm2-135m), an HF folder, a VLM folder (image
    pairs) or a hub id; a sequence-classification folder continues with its head"""
    dataset: str = "data/arith_pref/train.jsonl"
    """preference pairs (prompt, chosen, rejected): a .jsonl/.json/.parquet file, a folder of them, easy-vqa:pairs-train
    or a datasets hub name; a weighted mixture as --dataset a.jsonl:0.7 --dataset b.jsonl:0.3"""
    eval_dataset: str | None = "data/arith_pref/test.jsonl"
    """held-out pairs: pair accuracy (chosen scored above rejected) before and after training"""
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
    output_dir: str = "runs/rm"
    """checkpoints, metrics.jsonl and the exported reward model (`<output-dir>/model`)"""
    config: str | None = None
    """a .yaml or .json file of field: value defaults; command-line flags override them"""
    dry_run: bool = False
    """validate arguments, read the data and the model config, print the plan and exit"""
    seed: int = 0
    """seed for the pair order"""
    max_steps: int = 40
    """optimizer steps (40 x 8 pairs: one epoch of the bundled pairs)"""
    pairs_per_step: int = 8
    """preference pairs per optimizer step over all processes"""
    micro_batch_size: int = 8
    """chats (2 per pair) per forward/backward per process"""
    pooling: Literal["last", "mean", "logprob"] = "last"
    """the score of a chat: the head at its last token (TRL, OpenRLHF), the head's mean over the assistant tokens
    (every answer token gets a gradient), or, text only and no head, the LM's mean log-probability of the assistant
    tokens (SimPO's reward); saved with the model, so ppo.py and grpo.py score the same way"""
    max_len: int = 512
    """pairs with a side longer than this many tokens are skipped"""
    lr: float = 5e-5
    """learning rate (AdamW, constant after warmup)"""
    warmup_steps: int = 0
    """linear warmup over this many steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (0 disables)"""
    dtype: str = "auto"
    """compute dtype: auto (bf16 where the hardware has it), float32 or bfloat16; master weights stay float32"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    cpu_offload: bool = False
    """FSDP2's CPU offload: parameters, gradients and optimizer state stay on the CPU between uses (launch with torchrun;
    --nproc_per_node=1 for one device)"""
    eval_samples: int = 100
    """held-out pairs (the first N) scored before and after training (0 disables)"""
    eval_every: int = 0
    """also measure held-out pair accuracy every N steps (0: only before and after)"""
    save_every: int = 0
    """save a resumable checkpoint every N steps (0: only on preemption and at the end)"""
    keep_checkpoints: int = 2
    """how many recent checkpoints to keep"""
    resume: bool = False
    """continue from the newest complete checkpoint in <output-dir>/checkpoints"""
    export: bool = True
    """write the reward model to <output-dir>/model at the end"""
    track: bool = False
    """log to Weights & Biases (offline mode when no account is configured; WANDB_PROJECT, WANDB_NAME name the run)"""


def bradley_terry_loss(chosen_scores, rejected_scores):
    """(loss, accuracy) of a reward model on pairs [N]: mean -log sigmoid(r_chosen - r_rejected) (Bradley & Terry 1952;
    Ouyang et al. 2022), accuracy = share of pairs with r_chosen > r_rejected."""
    margin = chosen_scores.float() - rejected_scores.float()
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean().detach()


def preference_pairs(source, processor, max_len, limit=None, seed=0):
    """[((chosen messages, image folder), (rejected messages, image folder))] of the first `limit` preference records
    of a source (or of records already loaded); the prompt explicit or implicit (common/datasets.py). Pairs with a side
    over max_len tokens are skipped. Image pairs need a VLM, and a VLM image pairs."""
    records = (load_mixture(source, seed=seed) if isinstance(source, str) else source)[:limit]
    source = source if isinstance(source, str) else "dataset"
    if detect_format(records, use="pairs", script="reward_model.py") != "preference":
        raise DataError(f"{records[0]['_where']}: reward_model.py needs preference records (chosen, rejected): "
                        "unpaired ones (label) train KTO with dpo.py --loss-type kto")  # fmt: skip
    kept = []
    for r in records:
        chats = preference_messages(r)
        if processor.image_token_id is not None and not has_images(chats[0]):
            raise DataError(f"{r['_where']}: the pair holds no image but --model-path is a VLM (a VLM reward model "
                            "trains on image pairs)")  # fmt: skip
        try:  # a side over max_len comes back None (overlong="drop"); a text model refuses image parts
            sides = [processor(m, base_dir=r["_dir"], max_len=max_len, overlong="drop") for m in chats]
        except DataError as e:
            raise DataError(f"{r['_where']}: {e}") from None
        if None not in sides:
            kept.append(tuple((m, r["_dir"]) for m in chats))
    if not kept:
        raise DataError(f"{source}: every pair is longer than --max-len {max_len}")
    return kept


def stream_indices(n_items: int, seed: int, start: int, count: int) -> list[int]:
    """Items start .. start+count-1 of an endless stream of shuffled epochs over n_items; each epoch's order comes
    from the seeding rule alone, so a resumed run replays the stream exactly."""
    epochs = range(start // n_items, (start + count - 1) // n_items + 1)
    orders = {e: torch.randperm(n_items, generator=torch.Generator().manual_seed(derive_seed(seed, e, "order")))
              for e in epochs}  # fmt: skip
    return [int(orders[i // n_items][i % n_items]) for i in range(start, start + count)]


def pair_accuracy(model, processor, pairs, args, run) -> float:
    """Held-out pair accuracy; every rank scores every pair (under FSDP2 the forwards are collective)."""
    model.eval()
    chosen = score_chats(model, processor, [c for c, _ in pairs], run, args.micro_batch_size)
    rejected = score_chats(model, processor, [r for _, r in pairs], run, args.micro_batch_size)
    model.train()
    return float(bradley_terry_loss(chosen, rejected)[1])


def main(args: Args):
    run = setup(args.seed, args.dtype, args.cpu_offload)
    if args.pairs_per_step % run.world_size:
        raise SystemExit(
            f"error: --pairs-per-step {args.pairs_per_step} must be a multiple of the {run.world_size} processes"
        )
    if args.model_path == Args.model_path and not Path(args.model_path).exists():
        raise SystemExit(f"error: {args.model_path} not found: run `python sft.py` first (its default run exports there), "
                         "or pass --model-path smollm2-135m")  # fmt: skip

    # ---- pairs, plan ----
    processor = load_processor(args.model_path)
    records, eval_records = load_data(args, with_eval=args.eval_samples > 0)
    pairs = preference_pairs(records, processor, args.max_len)
    eval_pairs = preference_pairs(eval_records, processor, args.max_len, args.eval_samples) if eval_records else []
    run.print(f"[plan] reward model | model {args.model_path}{' (VLM)' if is_vlm(args.model_path) else ''} | "
              f"{len(pairs)} pairs, {len(eval_pairs)} held-out | {args.max_steps} steps x {args.pairs_per_step} pairs | "
              f"lr {args.lr} | world size {run.world_size} | {run.device} {run.dtype}")  # fmt: skip
    if args.dry_run:
        run.print(f"[plan] {describe(args.model_path)}; dry run, exiting")
        return None

    # ---- model, FSDP2, optimizer ----
    model, _ = load_value_model(args.model_path, device=run.device, zero_new_head=False, pooling=args.pooling,
                                gradient_checkpointing=args.gradient_checkpointing, meta=run.sharded and not run.main)  # fmt: skip
    set_pooling(model, args.pooling)
    if run.sharded:  # FSDP2: rank 0 read the weights, the other ranks built their model on the meta device
        full, fsdp = full_weights(model, run), fsdp_options(run, args.cpu_offload)
        for block in fsdp_blocks(model):  # decoder layers (and a VLM's vision blocks), then the root
            fully_shard(block, **fsdp)
        fully_shard(model, **fsdp)  # root: embeddings, final norm, the score head
        fill_shards(model, full, run)  # rank 0's weights into every rank's shards
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, args.warmup_steps, args.max_steps))
    step = resume(run, args.output_dir, model, optimizer, scheduler) if args.resume else 0
    logger = RunLogger(args.output_dir, asdict(args), run, track=args.track,
                       resume_step=step if args.resume else None)  # fmt: skip
    results = {}
    if eval_pairs and step == 0:
        results["pair_accuracy_before"] = pair_accuracy(model, processor, eval_pairs, args, run)
        run.print(f"[eval] held-out pair accuracy before training: {results['pair_accuracy_before']:.3f}")

    # ---- training loop: each step takes the next pairs of the stream of shuffled epochs ----
    per_rank, chunk = args.pairs_per_step // run.world_size, max(1, args.micro_batch_size // 2)
    model.train()
    progress = tqdm(total=args.max_steps, initial=step, desc="rm", disable=not run.main, dynamic_ncols=True)
    while step < args.max_steps:
        t0 = time.time()
        start = step * args.pairs_per_step + run.rank * per_rank
        mine = [pairs[i] for i in stream_indices(len(pairs), args.seed, start, per_rank)]
        sums = {"loss": 0.0, "accuracy": 0.0}
        for i in range(0, per_rank, chunk):
            part = mine[i : i + chunk]
            with run.autocast(model):  # [2 * len(part)]: chosen rows, then rejected rows
                scores = chat_scores(model, processor, [c for c, _ in part] + [r for _, r in part], run.device)
            loss, accuracy = bradley_terry_loss(scores[: len(part)], scores[len(part) :])
            (loss * len(part) / per_rank).backward()  # FSDP2 averages over ranks: the global pair mean
            sums["loss"] += float(loss.detach()) * len(part)
            sums["accuracy"] += float(accuracy) * len(part)
        grad_norm = optimizer_step(optimizer, scheduler, params, args.max_grad_norm)
        step += 1
        sums = all_reduce_sums(sums, run)
        metrics = {"train/loss": sums["loss"] / args.pairs_per_step, "train/accuracy": sums["accuracy"] / args.pairs_per_step,
                   "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                   "train/pairs_per_s": args.pairs_per_step / (time.time() - t0)}  # fmt: skip
        if eval_pairs and args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            metrics["eval/pair_accuracy"] = pair_accuracy(model, processor, eval_pairs, args, run)
        logger.log(metrics, step)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/accuracy']:.2f}")
        if save_if_due(run, args, step, args.max_steps, model, optimizer, scheduler):
            return finish(run, logger, {"step": step, "preempted": True}, progress)
    progress.close()

    # ---- pair accuracy after training, export ----
    if eval_pairs:
        results["pair_accuracy_after"] = pair_accuracy(model, processor, eval_pairs, args, run)
        run.print(
            f"[eval] held-out pair accuracy after training: {results['pair_accuracy_after']:.3f}"
            + (f" (before: {results['pair_accuracy_before']:.3f})" if "pair_accuracy_before" in results else "")
        )
        logger.log({f"eval/{k}": v for k, v in results.items()}, step)
    if args.export:
        out = export_value_model(model, processor, Path(args.output_dir) / "model", run, base_path=args.model_path)
        run.print(f"[export] reward model: {out}")
    return finish(run, logger, {"step": step, **results})


if __name__ == "__main__":
    main(cli(Args))
