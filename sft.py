"""sft.py: supervised fine-tuning of a causal LM on chat data, in one file.

The loss is the mean negative log-likelihood of the assistant tokens of the whole global batch:

    loss = - sum_{t in assistant tokens} log p(x_t | x_<t)  /  (number of assistant tokens in the global batch)

computed with common/logprob.py's fused kernel, which never builds the [tokens, vocab] logits.

Launch:
    python sft.py                                          # one CPU: SmolLM2-135M-Instruct on the bundled arithmetic task
    python sft.py --model-path Qwen/Qwen2.5-0.5B-Instruct --dataset my.jsonl    # one GPU (picked up automatically)
    torchrun --nproc_per_node=8 sft.py --dataset my.jsonl                       # N GPUs, FSDP2
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 sft.py ...  # multi-node
    python sft.py --config run.yaml --lr 3e-5              # a config file sets defaults, flags override
    python sft.py --dry-run                                # check data, model and plan, then exit
    python sft.py --dataset a.jsonl:0.7 --dataset b.jsonl:0.3                   # a weighted mixture (common/data.py)
    python sft.py --model-path runs/captioner/model --dataset easy-vqa:train --eval-dataset easy-vqa:test \
        --output-dir runs/vqa_sft --lr-vision 5e-5                              # a VLM folder (common/vision.py)

Where this departs from the textbook / from TRL's SFTTrainer:
  * The loss is normalised by the number of target tokens of the whole accumulated global batch across ranks, not averaged
    per micro-batch, so gradient accumulation and the number of GPUs do not change the gradient (TRL averages per
    micro-batch unless told otherwise).
  * Packing is on by default: examples are concatenated into rows of `--max-len` tokens and kept apart by restarting
    `position_ids` (no attention_mask, no KV cache), so no example attends to another.
  * Only assistant turns are trained on (system, user, template and padding tokens have label -100).
  * A step counts optimizer steps; an epoch drops its last incomplete global batch so every step has the same size.
  * A VLM (`--model-path` a common/vision.py folder) trains on chats with images through the same loop: its processor
    tokenises (image tokens count toward --max-len and a packed row's budget) and collates the pixels; projector,
    vision encoder and LM get their own learning rates (--lr-projector/--lr-vision/--lr-lm; 0 freezes), as in LLaVA's
    stage 2 (Liu et al. 2023, "Visual Instruction Tuning"), which trains projector + LM with the encoder frozen.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.distributed.fsdp import fully_shard
from tqdm import tqdm

from common.chat import IGNORE, build_sft_examples, collate, epoch_batches, heldout_nll, pack_examples
from common.checkpoint import export_model, resume, save_if_due
from common.cli import cli
from common.datasets import load_data
from common.evaluation import evaluate, held_out_sets
from common.logprob import sequence_logprobs
from common.models import describe, fsdp_blocks, load_model, load_processor
from common.rollout import prompt_records
from common.run import (
    RunLogger,
    all_reduce_sums,
    fill_shards,
    finish,
    fsdp_options,
    full_weights,
    lr_lambda,
    optimizer_step,
    setup,
    to_device,
)
from common.vision import param_groups


@dataclass
class Args:
    model_path: str = "smollm2-135m"
    """model to fine-tune: an alias (smollm2-135m), a .gguf file, a local HF folder or a hub id; or a VLM folder
    (common/vision.py's save_vlm, or a native HF VLM such as Qwen2-VL): then records may hold images"""
    dataset: str = "data/arith/train.jsonl"
    """training data (text, messages, prompt+completion or message+answer records; common/datasets.py): a
    .jsonl/.json/.parquet file, a folder of them, easy-vqa:<kind> or a datasets hub name; a mixture as source:weight,
    repeated or comma-separated (--dataset a.jsonl:0.7 --dataset b.jsonl:0.3)"""
    dataset_records: int = 0
    """use this many training records: a seeded sample that keeps the mixture weights (0: every record once)"""
    eval_dataset: str | None = "data/arith/test.jsonl"
    """held-out data for the eval loss (and answer accuracy when its records carry an `answer` field)"""
    eval_dataset_records: int = 0
    """use this many held-out records, a seeded sample (0: all, in order)"""
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
    output_dir: str = "runs/sft"
    """checkpoints, metrics.jsonl and the exported Hugging Face folder (`<output-dir>/model`) go here"""
    config: str | None = None
    """a .yaml or .json file of field: value defaults; command-line flags override them"""
    dry_run: bool = False
    """validate arguments, read the data and the model config, print the plan and exit"""
    seed: int = 0
    """seed for initialisation and data order"""
    lr: float = 2e-4
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
    warmup_steps: int = 10
    """linear warmup from 0 to --lr over this many steps"""
    min_lr_ratio: float = 0.1
    """cosine/linear decay ends at lr * min_lr_ratio"""
    epochs: int = 1
    """passes over the training data (ignored when --max-steps > 0)"""
    max_steps: int = 120
    """optimizer steps to run; 0 means --epochs full passes"""
    batch_size: int = 4
    """rows per micro-batch per process (packed rows of --max-len tokens, or examples when --no-packing)"""
    grad_accum: int = 1
    """micro-batches accumulated per optimizer step; global batch = batch_size * grad_accum * world_size rows"""
    max_len: int = 512
    """maximum tokens per example, and the token budget of a packed row"""
    overlong: Literal["truncate", "drop"] = "truncate"
    """what to do with examples longer than --max-len"""
    packing: bool = True
    """pack examples into rows of --max-len tokens (position_ids restart per example); off for native VLMs"""
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
    """module names LoRA wraps; default depends on the architecture (all attention and MLP projections for Llama)"""
    logprob_impl: Literal["fused", "naive"] = "fused"
    """fused: chunked kernel that never builds the logits; naive: log_softmax over full logits, for comparison"""
    eval_every: int = 40
    """eval loss every N steps (0: only at the end)"""
    ood_dataset: str | None = "data/arith/ood.jsonl"
    """an out-of-distribution held-out set, answered before and after training beside --eval-dataset's, with paired
    counts and a sign test (common/evaluation.py); the default, the bundled task's OOD split, only with its test split"""
    eval_samples: int = 100
    """held-out records answered by greedy generation before and after training to report accuracy (0 disables)"""
    max_new_tokens: int = 96
    """generation budget for the answer-accuracy eval"""
    save_every: int = 50
    """save a resumable checkpoint every N steps (0: only on preemption and at the end)"""
    keep_checkpoints: int = 2
    """how many recent checkpoints to keep"""
    resume: bool = False
    """continue from the newest complete checkpoint in <output-dir>/checkpoints"""
    export: bool = True
    """write a Hugging Face folder (safetensors, config, tokenizer) to <output-dir>/model at the end"""
    track: bool = False
    """log to Weights & Biases (offline mode when no account is configured; WANDB_PROJECT, WANDB_NAME name the run)"""


def sft_loss_sum(model, batch, impl: str) -> tuple[torch.Tensor, int]:
    """Sum of assistant-token NLL in this micro-batch, and how many tokens it covers. The batch's other tensors
    (position_ids, attention_mask, a VLM's pixel_values...) go to the model."""
    kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    token_logps = sequence_logprobs(model, batch["input_ids"], batch["labels"], impl=impl, **kwargs)  # [B, T]
    return -token_logps.sum(), int((batch["labels"][:, 1:] != IGNORE).sum())


def n_real_tokens(item) -> int:
    """Non-padding tokens of one row: a packed list of examples, or one example."""
    return sum(len(e["input_ids"]) for e in item) if isinstance(item, list) else len(item["input_ids"])


def main(args: Args):
    run = setup(args.seed, args.dtype, args.cpu_offload)

    # ---- data: the processor tokenises (a VLM's also reads the images), then rows are packed (or padded) ----
    processor = load_processor(args.model_path)
    packing = args.packing and processor.packable
    if packing != args.packing:
        run.print(
            "[note] a native VLM computes its own (M-RoPE) positions, which packed rows cannot restart: --no-packing"
        )

    def rows_of(examples):
        return [[examples[i] for i in pack] for pack in pack_examples(examples, args.max_len)] if packing else examples

    records, eval_records = load_data(
        args, total=args.dataset_records or None, eval_total=args.eval_dataset_records or None
    )
    examples, stats = build_sft_examples(records, processor, max_len=args.max_len, overlong=args.overlong,
                                         name=args.dataset)  # fmt: skip
    items, eval_items, answer_items = rows_of(examples), [], []
    if eval_records:
        eval_examples, _ = build_sft_examples(eval_records, processor, max_len=args.max_len, name="held-out")
        eval_items = rows_of(eval_examples)
        answer_items = [r for r in eval_records if "answer" in r][: args.eval_samples]
        answer_items = prompt_records(answer_items, processor, script="sft.py")  # image paths resolved
    held_out = held_out_sets(args, processor, answer_items, "sft.py")  # in-distribution and OOD answer prompts
    global_rows = args.batch_size * args.grad_accum * run.world_size
    steps_per_epoch = len(items) // global_rows
    if steps_per_epoch == 0:
        raise SystemExit(
            f"error: {len(items)} training rows is less than one global batch of {global_rows} "
            f"(--batch-size {args.batch_size} x --grad-accum {args.grad_accum} x {run.world_size} processes)"
        )
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
    run.print(
        f"[plan] model {args.model_path}{' (VLM)' if processor.image_token_id is not None else ''} | "
        f"{stats['n_examples']} examples -> {len(items)} rows "
        f"({'packed' if packing else 'padded'}, max {args.max_len} tokens) | eval {len(eval_items)} rows, "
        f"{len(answer_items)} answer prompts | {total_steps} steps x {global_rows} rows "
        f"({total_steps / steps_per_epoch:.2f} epochs) | world size {run.world_size} | {run.device} {run.dtype}"
    )
    if args.dry_run:
        run.print(f"[plan] {describe(args.model_path)}; dry run, exiting")
        return None

    # ---- model, answer accuracy before training, FSDP2, optimizer ----
    model = load_model(args.model_path, device=run.device, gradient_checkpointing=args.gradient_checkpointing,
                       lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                       meta=run.sharded and not run.main)  # fmt: skip
    if run.sharded:  # FSDP2: rank 0 read the weights, the other ranks built their model on the meta device
        full, fsdp = full_weights(model, run), fsdp_options(run, args.cpu_offload)
        for block in fsdp_blocks(model):  # decoder layers (and a VLM's vision blocks), then the root
            fully_shard(block, **fsdp)
        fully_shard(model, **fsdp)  # root: embeddings, final norm, LM head (a VLM's projector too)
        fill_shards(model, full, run)  # rank 0's weights into every rank's shards
    results, flags_before = {}, None
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
    autocast = run.autocast(model)

    # ---- training loop ----
    model.train()
    progress = tqdm(total=total_steps, initial=step, desc="sft", disable=not run.main, dynamic_ncols=True)
    while step < total_steps:
        t0 = time.time()
        epoch, position = divmod(step, steps_per_epoch)
        order = [i for batch in epoch_batches(len(items), global_rows, args.seed, epoch) for i in batch]
        per_rank = args.batch_size * args.grad_accum
        my_rows = order[position * global_rows + run.rank * per_rank :][:per_rank]
        micro_batches = [to_device(collate([items[i] for i in my_rows[m * args.batch_size : (m + 1) * args.batch_size]],
                                           processor, packing=packing, max_len=args.max_len), run.device)
                         for m in range(args.grad_accum)]  # fmt: skip
        # the loss is normalised by the target tokens of the whole global batch, known before any forward
        counts = all_reduce_sums({"targets": sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro_batches),
                                  "tokens": sum(n_real_tokens(items[i]) for i in my_rows),
                                  "slots": sum(mb["input_ids"].numel() for mb in micro_batches)}, run)  # fmt: skip
        nll_sum = 0.0
        for mb in micro_batches:
            with autocast:
                nll, _ = sft_loss_sum(model, mb, args.logprob_impl)
            # FSDP2 averages gradients over ranks; scaling by world_size turns that into the global-batch sum
            (nll * run.world_size / counts["targets"]).backward()
            nll_sum += float(nll.detach())
        lrs = scheduler.get_last_lr()  # this step's, one per param group
        grad_norm = optimizer_step(optimizer, scheduler, trainable, args.max_grad_norm)
        step += 1

        loss = all_reduce_sums({"nll": nll_sum}, run)["nll"] / counts["targets"]
        metrics = {"train/loss": loss, "train/lr": lrs[0], "train/grad_norm": grad_norm,
                   "train/epoch": step / steps_per_epoch, "train/tokens_per_s": counts["tokens"] / (time.time() - t0),
                   "train/padding_fraction": 1 - counts["tokens"] / counts["slots"]}  # fmt: skip
        if len(lrs) > 1:  # a VLM's parts
            metrics |= {f"train/lr_{group['name']}": lr for group, lr in zip(optimizer.param_groups, lrs)}
        if eval_items and ((args.eval_every and step % args.eval_every == 0) or step == total_steps):
            metrics["eval/loss"] = heldout_nll(model, eval_items, processor, packing=packing, max_len=args.max_len,
                                               batch_size=args.batch_size, impl=args.logprob_impl, run=run)  # fmt: skip
        logger.log(metrics, step)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}")
        if save_if_due(run, args, step, total_steps, model, optimizer, scheduler):
            return finish(run, logger, {"step": step, "preempted": True}, progress)
    progress.close()

    # ---- export and answer accuracy after training ----
    if args.export:
        out = export_model(model, processor, Path(args.output_dir) / "model", run, base_path=args.model_path)
        run.print(f"[export] {out}")
    evaluate(model, processor, held_out, run, results, "after", max_new_tokens=args.max_new_tokens, before=flags_before)
    if results:
        logger.log({f"eval/{k}": v for k, v in results.items()}, step)
    return finish(run, logger, {"step": step, **results})


if __name__ == "__main__":
    main(cli(Args))
