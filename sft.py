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

from common.data import (
    build_sft_examples,
    epoch_batches,
    load_mixture,
    pack_collate,
    pack_examples,
    pad_collate,
    to_messages,
)
from common.logprob import sequence_logprobs
from common.metrics import RunLogger, cli, exact_match
from common.models import (
    barrier,
    checkpoint_dirs,
    load_checkpoint,
    load_model,
    load_tokenizer,
    pick_dtype,
    prepare_model,
    replace_dir,
    resolve_model_path,
    save_checkpoint,
)
from common.rewards import answer_correct
from common.vision import ComposedVLM, checkpoint_vlm, export_vlm, is_vlm, load_vlm, param_groups, vlm_generate


@dataclass
class Args:
    model_path: str = "smollm2-135m"
    """model to fine-tune: an alias (smollm2-135m), a .gguf file, a local HF folder or a hub id; or a VLM folder
    (common/vision.py's save_vlm, or a native HF VLM such as Qwen2-VL): then records may hold images"""
    dataset: str = "data/arith/train.jsonl"
    """training data: a .jsonl/.json/.parquet file, a folder of them, easy-vqa:<kind> or a datasets hub name; a
    mixture as source:weight, repeated or comma-separated (--dataset a.jsonl:0.7 --dataset b.jsonl:0.3)"""
    dataset_records: int = 0
    """use this many training records: a seeded sample that keeps the mixture weights (0: every record once)"""
    eval_dataset: str | None = "data/arith/test.jsonl"
    """held-out data for the eval loss (and answer accuracy when its records carry an `answer` field)"""
    eval_dataset_records: int = 0
    """use this many held-out records, a seeded sample (0: all, in order)"""
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
    """log to Weights & Biases (offline mode when no account is configured)"""
    wandb_project: str = "cleanpost"
    """wandb project name"""
    run_name: str | None = None
    """wandb run name"""


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step`: linear warmup, then cosine/linear decay to min_ratio, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def sft_loss_sum(model, batch, impl: str) -> tuple[torch.Tensor, int]:
    """Sum of assistant-token NLL in this micro-batch, and how many tokens it covers. The batch's other tensors
    (position_ids, attention_mask, a VLM's pixel_values...) go to the model."""
    kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "cu_seqlens", "max_seqlen")}
    token_logps = sequence_logprobs(
        model, batch["input_ids"], batch["labels"], impl=impl, **kwargs
    )  # [B, T], 0 off-target
    return -token_logps.sum(), int((batch["labels"][:, 1:] != -100).sum())


@torch.no_grad()
def answer_accuracy(model, tokenizer, records, fmt, max_new_tokens, dtype, batch_size=25) -> float:
    """Greedy answers to held-out prompts, checked against each record's `answer` (common/rewards.py)."""
    model.eval()
    tokenizer.padding_side = "left"  # generation appends on the right
    device, correct = next(model.parameters()).device, 0
    for i in tqdm(range(0, len(records), batch_size), desc="answer accuracy", leave=False):
        chunk = records[i : i + batch_size]
        prompts = [
            tokenizer.apply_chat_template(to_messages(r, fmt)[:-1], add_generation_prompt=True, tokenize=False)
            for r in chunk
        ]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(answer_correct(t, str(r["answer"])) for t, r in zip(texts, chunk))
    tokenizer.padding_side = "right"
    model.train()
    return correct / max(1, len(records))


@torch.no_grad()
def vlm_answer_accuracy(model, processor, records, fmt, max_new_tokens, dtype, batch_size=25) -> float:
    """Greedy answers of a VLM to held-out image prompts, scored by exact match (common/metrics.py) against `answer`."""
    model.eval()
    device, pad, correct = next(model.parameters()).device, processor.tokenizer.pad_token_id, 0
    for i in tqdm(range(0, len(records), batch_size), desc="answer accuracy", leave=False):
        chunk = records[i : i + batch_size]
        prompts = [
            processor(to_messages(r, fmt)[:-1], base_dir=r.get("_dir", "."), add_generation_prompt=True) for r in chunk
        ]
        width = max(len(p["input_ids"]) for p in prompts)  # left-pad: generation appends on the right
        ids = torch.tensor(
            [[pad] * (width - len(p["input_ids"])) + p["input_ids"] for p in prompts], device=device
        )  # [B, T]
        mask = torch.tensor(
            [[0] * (width - len(p["input_ids"])) + [1] * len(p["input_ids"]) for p in prompts], device=device
        )
        images = {k: v.to(device) if torch.is_tensor(v) else v for k, v in processor.image_inputs(prompts, ids).items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            new = vlm_generate(
                model, ids, mask, **images, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
            )  # [B, n_new]
        texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        correct += sum(exact_match(t.strip(), str(r["answer"])) for t, r in zip(texts, chunk))
    model.train()
    return correct / max(1, len(records))


def collate(items, packing, pad_id, max_len, device, processor=None):
    batch = pack_collate(items, pad_id, max_len) if packing else pad_collate(items, pad_id)
    if processor is not None:  # VLM: the images, in the order their tokens appear row by row
        batch |= processor.image_inputs([e for pack in items for e in pack] if packing else items, batch["input_ids"])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def n_real_tokens(item) -> int:
    """Non-padding tokens of one row: a packed list of examples, or one example."""
    return sum(len(e["input_ids"]) for e in item) if isinstance(item, list) else len(item["input_ids"])


def export_hf(args, model, tokenizer, rank) -> Path | None:
    """Gathers the full state dict and writes a Hugging Face folder: a plain model on the meta device takes the
    gathered tensors by assignment (no second copy in memory); LoRA also writes its adapter and merges."""
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
    if args.lora_r > 0:
        plain = prepare_model(plain, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets)
        plain.load_state_dict(full_sd, assign=True)
        plain.save_pretrained(tmp / "adapter")
        plain = plain.merge_and_unload()
    else:
        plain.load_state_dict(full_sd, assign=True)
    plain.tie_weights()
    plain.config.use_cache = True  # for serving
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return replace_dir(tmp, out)


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

    # ---- data: tokenise (a VLM's processor also reads the images), then pack (or not) into the items a batch draws from ----
    vlm = is_vlm(args.model_path)
    if vlm and args.lora_r > 0:
        raise SystemExit(
            "error: --lora-r is for text models; a VLM trains full weights (--lr-projector/--lr-vision/--lr-lm)"
        )
    model, processor = load_vlm(args.model_path, device=device) if vlm else (None, None)  # master weights float32
    tokenizer = processor.tokenizer if vlm else load_tokenizer(args.model_path)
    packing = args.packing and not (vlm and not isinstance(model, ComposedVLM))
    if packing != args.packing:
        say("[note] a native VLM computes its own (M-RoPE) positions, which packed rows cannot restart: --no-packing")
    records = load_mixture(args.dataset, seed=args.seed, total=args.dataset_records or None)
    examples, stats = build_sft_examples(
        records, tokenizer, max_len=args.max_len, overlong=args.overlong, processor=processor, name=args.dataset
    )
    items = [[examples[i] for i in pack] for pack in pack_examples(examples, args.max_len)] if packing else examples
    eval_items, eval_records = [], []
    if args.eval_dataset:
        records = load_mixture(args.eval_dataset, seed=args.seed, total=args.eval_dataset_records or None)
        eval_examples, eval_stats = build_sft_examples(
            records, tokenizer, max_len=args.max_len, overlong="truncate", processor=processor, name=args.eval_dataset
        )
        eval_items = (
            [[eval_examples[i] for i in p] for p in pack_examples(eval_examples, args.max_len)]
            if packing
            else eval_examples
        )
        eval_fmt = eval_stats["format"]
        eval_records = [r for r in records if "answer" in r][: args.eval_samples]
    global_rows = args.batch_size * args.grad_accum * world_size
    steps_per_epoch = len(items) // global_rows
    if steps_per_epoch == 0:
        raise SystemExit(
            f"error: {len(items)} training rows is less than one global batch of {global_rows} "
            f"(--batch-size {args.batch_size} x --grad-accum {args.grad_accum} x {world_size} processes)"
        )
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
    say(
        f"[plan] model {args.model_path}{' (VLM)' if vlm else ''} | {stats['n_examples']} examples -> {len(items)} rows "
        f"({'packed' if packing else 'padded'}, max {args.max_len} tokens) | eval {len(eval_items)} rows, "
        f"{len(eval_records)} answer prompts | {total_steps} steps x {global_rows} rows "
        f"({total_steps / steps_per_epoch:.2f} epochs) | world size {world_size} | {device} {compute_dtype}"
    )
    if args.dry_run:
        from transformers import AutoConfig

        config = model.config if vlm else AutoConfig.from_pretrained(resolve_model_path(args.model_path))
        config = getattr(config, "text_config", config)  # a native VLM's LM
        say(
            f"[plan] {config.model_type}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"vocab {config.vocab_size}; dry run, exiting"
        )
        return None

    # ---- model, answer accuracy before training, FSDP2 ----
    if not vlm:
        model = load_model(
            args.model_path,
            device=device,
            gradient_checkpointing=args.gradient_checkpointing,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_targets=list(args.lora_targets) if args.lora_targets else None,
        )
    elif args.gradient_checkpointing:
        checkpoint_vlm(model)
    accuracy, reader = (vlm_answer_accuracy, processor) if vlm else (answer_accuracy, tokenizer)
    results = {}
    if eval_records and not args.resume:
        if rank == 0:
            results["accuracy_before"] = accuracy(
                model, reader, eval_records, eval_fmt, args.max_new_tokens, compute_dtype
            )
            say(f"[eval] held-out answer accuracy before training: {results['accuracy_before']:.3f}")
        barrier()
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world_size,))
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        # a VLM's vision encoder blocks too: the first ModuleList under vision/visual (SigLIP/CLIP encoder.layers,
        # DINOv2 encoder.layer, Qwen-VL visual.blocks)
        blocks = [
            m for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and re.search("vision|visual", n)
        ]
        for layer in [*model.get_decoder().layers, *(blocks[0] if vlm and blocks else [])]:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)  # root: embeddings, final norm, LM head (a VLM's projector too)
        autocast = nullcontext()  # FSDP2's mixed-precision policy casts instead
    if vlm:  # one lr per module (projector, vision, LM); a module at lr 0 is frozen and left out
        groups = param_groups(model, args.lr, args.lr_projector, args.lr_vision, args.lr_lm, args.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        groups if vlm else trainable, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, args.warmup_steps, total_steps, args.schedule, args.min_lr_ratio)
    )

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

    stop_signal = []  # set by SIGTERM/SIGUSR1 (cluster preemption): save at the end of the step and exit cleanly
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    def run_eval():
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # [nll sum, target tokens]
        model.eval()
        n_batches = math.ceil(len(eval_items) / (args.batch_size * world_size))
        with torch.no_grad():
            for b in range(n_batches):
                lo = (b * world_size + rank) * args.batch_size
                chunk = eval_items[lo : lo + args.batch_size] or eval_items[:1]  # ranks run equal forwards for FSDP
                with autocast:
                    batch = collate(chunk, packing, tokenizer.pad_token_id, args.max_len, device, processor)
                    nll, n = sft_loss_sum(model, batch, args.logprob_impl)
                if eval_items[lo : lo + args.batch_size]:
                    totals += torch.tensor([nll.item(), n], dtype=torch.float64, device=device)
        model.train()
        if dist.is_initialized():
            dist.all_reduce(totals)
        return (totals[0] / totals[1].clamp(min=1)).item()

    # ---- training loop ----
    model.train()
    progress = tqdm(total=total_steps, initial=step, desc="sft", disable=rank != 0, dynamic_ncols=True)
    while step < total_steps:
        t0 = time.time()
        epoch, position = divmod(step, steps_per_epoch)
        order = [i for batch in epoch_batches(len(items), global_rows, args.seed, epoch) for i in batch]
        global_batch = order[position * global_rows : (position + 1) * global_rows]
        my_rows = global_batch[
            rank * args.batch_size * args.grad_accum : (rank + 1) * args.batch_size * args.grad_accum
        ]
        micro_batches = [
            collate(
                [items[i] for i in my_rows[m * args.batch_size : (m + 1) * args.batch_size]],
                packing,
                tokenizer.pad_token_id,
                args.max_len,
                device,
                processor,
            )
            for m in range(args.grad_accum)
        ]
        # normalise by the target tokens of the whole global batch, known before any forward
        counts = torch.tensor(
            [
                sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches),
                sum(n_real_tokens(items[i]) for i in my_rows),
                sum(mb["input_ids"].numel() for mb in micro_batches),
            ],
            dtype=torch.float64,
            device=device,
        )
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(counts)
        n_target = counts[0].item()
        for mb in micro_batches:
            with autocast:
                nll, _ = sft_loss_sum(model, mb, args.logprob_impl)
            # FSDP2 averages gradients over ranks; scaling by world_size turns that into the global-batch sum
            (nll * world_size / n_target).backward()
            loss_sum += nll.detach().double()
        if dist.is_initialized():
            dist.all_reduce(loss_sum)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            trainable, args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
        )
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lrs = scheduler.get_last_lr()  # one per param group
        lr = lrs[0]
        scheduler.step()
        step += 1

        loss = (loss_sum / n_target).item()
        metrics = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm.item(),
            "train/epoch": step / steps_per_epoch,
            "train/tokens_per_s": counts[1].item() / (time.time() - t0),
            "train/padding_fraction": 1 - counts[1].item() / counts[2].item(),
        }
        metrics |= (
            {f"train/lr_{group['name']}": group_lr for group, group_lr in zip(optimizer.param_groups, lrs)}
            if vlm
            else {}
        )
        if (args.eval_every and step % args.eval_every == 0) or step == total_steps:
            if eval_items:
                metrics["eval/loss"] = run_eval()
        logger.log(metrics, step)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

        preempted = torch.tensor(float(bool(stop_signal)), device=device)
        if dist.is_initialized():
            dist.all_reduce(preempted)  # every rank must agree to save, or the collective save hangs
        if preempted.item() or (args.save_every and step % args.save_every == 0) or step == total_steps:
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
        if rank == 0:
            say(f"[export] {'VLM' if vlm else 'Hugging Face'} folder: {out}")
            if eval_records:
                from transformers import AutoModelForCausalLM

                exported = (
                    load_vlm(out, device=device)[0]
                    if vlm
                    else AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device)
                )
                results["accuracy_after"] = accuracy(
                    exported, reader, eval_records, eval_fmt, args.max_new_tokens, compute_dtype
                )
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
