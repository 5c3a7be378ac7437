"""pretrain_captioner.py: caption pretraining of a vision-language model (Molmo's first stage), in one file.

A vision encoder and a projector are put in front of a language model (common/vision.py's ComposedVLM):

    image --encoder--> patches --pixel shuffle + MLP projector--> image tokens --> LM --> caption

and trained on image-caption pairs with the mean NLL of the caption tokens of the whole global batch:

    loss = - sum_{t in caption tokens} log p(x_t | image, x_<t)  /  (caption tokens in the global batch)

Each part has its own learning rate: `--lr` (projector), `--lr-vision`, `--lr-lm`; 0 freezes a part (no gradients,
no optimizer state). The default is the offline pipeline's stage 1: a random-init `siglip-tiny` encoder + projector
trained under a frozen SmolLM2-135M-Instruct on the easy-VQA shape captions ("a red circle."), then

    python pretrain_captioner.py                                                # stage 1 (this file)
    python sft.py --model-path runs/captioner/model --dataset easy-vqa:train \
        --eval-dataset easy-vqa:test --output-dir runs/vqa_sft                  # stage 2: question answering
    python eval_vqa.py --model-path runs/vqa_sft/model                          # stage 3: VQA accuracy

Launch:
    python pretrain_captioner.py                                  # one CPU (bf16 autocast where the CPU has it)
    python pretrain_captioner.py --vision-encoder ./siglip-base --model-path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset caps.jsonl --lr-lm 2e-5                         # one GPU (picked up automatically)
    torchrun --nproc_per_node=8 pretrain_captioner.py --dataset a.jsonl:0.7 --dataset b.jsonl:0.3   # N GPUs, FSDP2
    python pretrain_captioner.py --model-path runs/captioner/model --resume   # continue a VLM folder / a checkpoint
    python pretrain_captioner.py --dry-run                        # check data, model and plan, then exit

Where this departs from Molmo (Deitke et al. 2024, "Molmo and PixMo"), whose stage 1 trains every part on dense,
long PixMo-Cap captions:
  * The LM is frozen by default (--lr-lm 0): the run stays cheap on a CPU (no LM weight gradients or optimizer state).
    Molmo trains all parts, with a higher learning rate and a shorter warmup for the connector; here the
    per-part learning rates share one warmup and one schedule.
  * The default encoder is random-init and tiny (offline), so it must train (--lr-vision > 0); Molmo starts from a
    pretrained CLIP ViT-L/14 and takes features of two of its inner layers, pooled 2x2 by attention. Here: the last
    layer's patches, pixel-shuffled 2x2 (Idefics3 / SmolVLM) into an MLP (LLaVA-1.5).
  * One 64x64 image per example: no multi-crop tiling and no length hints; captions are short templated sentences,
    so examples are packed into rows of --max-len tokens (position_ids restart per example, as in sft.py).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from tqdm import tqdm

from common.chat import IGNORE, collate, epoch_batches, heldout_nll, pack_examples
from common.checkpoint import export_model, resume, save_if_due
from common.cli import cli
from common.data import DataError, load_mixture
from common.datasets import load_data
from common.easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES
from common.logprob import sequence_logprobs
from common.metrics import exact_match, vqa_normalize
from common.models import build_vlm, fsdp_blocks
from common.rollout import generate
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
from common.vision import ComposedVLM, is_vlm, load_vlm, param_groups


@dataclass
class Args:
    model_path: str = "smollm2-135m"
    """the language model (alias, .gguf, local folder or hub id) to compose with --vision-encoder; or a VLM folder
    (a save_vlm output or a native HF VLM) to continue training"""
    vision_encoder: str = "siglip-tiny"
    """encoder of a new VLM: siglip-tiny, clip-tiny, dinov2-tiny (random init) or a local SigLIP/CLIP/DINOv2 folder"""
    image_size: int = 64
    """input resolution of a preset encoder (a local encoder folder keeps its own)"""
    projector: Literal["mlp", "linear"] = "mlp"
    """projector of a new VLM: 2-layer GELU MLP (LLaVA-1.5) or one linear layer"""
    pixel_shuffle: int = 2
    """merge f x f neighbouring patches into one image token (f^2 fewer tokens)"""
    dataset: str = "easy-vqa:captions-train"
    """image-caption records {"image": path relative to the file, "caption": text}: a .jsonl file, a folder,
    easy-vqa:captions-train, or a weighted mixture (repeat the flag: --dataset a.jsonl:0.7 --dataset b.jsonl:0.3)"""
    eval_dataset: str | None = "easy-vqa:captions-test"
    """held-out caption records for the eval loss and caption accuracy"""
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
    eval_size: int = 300
    """held-out records (the first N) the eval loss is computed on"""
    eval_samples: int = 100
    """held-out images captioned greedily for caption accuracy (0 disables)"""
    max_new_tokens: int = 16
    """generation budget of one caption"""
    output_dir: str = "runs/captioner"
    """checkpoints, metrics.jsonl and the exported VLM folder (`<output-dir>/model`, opened by load_vlm) go here"""
    config: str | None = None
    """a .yaml or .json file of field: value defaults; command-line flags override them"""
    dry_run: bool = False
    """validate arguments, read the data, build the model, print the plan and exit"""
    seed: int = 0
    """seed for initialisation, mixture sampling and data order"""
    lr: float = 2e-3
    """peak learning rate of the projector (AdamW)"""
    lr_vision: float = 1e-3
    """peak learning rate of the vision encoder; 0 freezes it"""
    lr_lm: float = 0.0
    """peak learning rate of the language model; 0 freezes it"""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)"""
    schedule: Literal["cosine", "linear", "inverse-sqrt"] = "cosine"
    """learning-rate decay after warmup"""
    warmup_steps: int = 20
    """linear warmup from 0 to the peak over this many steps"""
    min_lr_ratio: float = 0.1
    """cosine/linear decay ends at lr * min_lr_ratio"""
    epochs: int = 1
    """passes over the training data (ignored when --max-steps > 0)"""
    max_steps: int = 400
    """optimizer steps to run; 0 means --epochs full passes"""
    batch_size: int = 2
    """rows per micro-batch per process (packed rows of --max-len tokens, or examples when --no-packing)"""
    grad_accum: int = 1
    """micro-batches accumulated per optimizer step; global batch = batch_size * grad_accum * world_size rows"""
    max_len: int = 512
    """maximum tokens per example, and the token budget of a packed row"""
    overlong: Literal["truncate", "drop"] = "truncate"
    """what to do with examples longer than --max-len (truncation never cuts an image in half)"""
    packing: bool = True
    """pack examples into rows of --max-len tokens (composed VLMs only: native ones compute their own positions)"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (0 disables)"""
    dtype: str = "auto"
    """compute dtype: auto (bf16 where the hardware has it), float32 or bfloat16; master weights stay float32"""
    cpu_offload: bool = False
    """FSDP2's CPU offload: parameters, gradients and optimizer state stay on the CPU between uses (launch with torchrun;
    --nproc_per_node=1 for one device)"""
    logprob_impl: Literal["fused", "naive"] = "fused"
    """fused: chunked kernel that never builds the logits; naive: log_softmax over full logits, for comparison"""
    eval_every: int = 100
    """eval every N steps and before training (0: only at the end)"""
    save_every: int = 200
    """save a resumable checkpoint every N steps (0: only on preemption and at the end)"""
    keep_checkpoints: int = 1
    """how many recent checkpoints to keep"""
    resume: bool = False
    """continue from the newest complete checkpoint in <output-dir>/checkpoints"""
    export: bool = True
    """write the trained VLM with save_vlm to <output-dir>/model at the end"""
    track: bool = False
    """log to Weights & Biases (offline mode when no account is configured; WANDB_PROJECT, WANDB_NAME name the run)"""


def caption_chat(record: dict, with_caption: bool = True) -> list[dict]:
    """The image as the user turn (no text), the caption as the assistant turn."""
    chat = [{"role": "user", "content": [{"type": "image", "image": record["image"]}]}]
    return chat + [{"role": "assistant", "content": record["caption"]}] if with_caption else chat


def load_caption_records(source, seed: int = 0) -> list[dict]:
    """Records of a source or weighted mixture (common.data.load_mixture), or records already loaded (load_data), each
    checked to be {image: path (or a hub dataset's PIL image), caption}."""
    records = load_mixture(source, seed=seed) if isinstance(source, str) else source
    for r in records:
        for field in ("image", "caption"):
            pil = field == "image" and hasattr(r.get(field), "convert")  # a hub dataset's image
            if not (pil or isinstance(r.get(field), str) and r[field].strip()):
                raise DataError(f"{r.get('_where', '?')}: {field}: expected a non-empty string (caption records are "
                                '{"image": path, "caption": text}; map other names with --columns)')  # fmt: skip
    return records


def caption_examples(records, processor, max_len: int, overlong: str) -> list[dict]:
    """processor(chat) per record: input_ids, labels (caption tokens only), images. Dropped overlong ones are left out."""
    examples = []
    for r in tqdm(records, desc="images + captions", leave=False, disable=int(os.environ.get("RANK", 0)) != 0):
        try:
            e = processor(caption_chat(r), base_dir=r.get("_dir", "."), max_len=max_len, overlong=overlong)
        except DataError as error:
            raise DataError(f"{r.get('_where', '?')}: {error}") from None
        if e is not None:
            examples.append(e)
    return examples


def caption_loss_sum(model, batch: dict, impl: str) -> tuple[torch.Tensor, int]:
    """Sum of caption-token NLL in this micro-batch, and how many tokens it covers."""
    kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}  # positions, mask, pixel_values
    token_logps = sequence_logprobs(model, batch["input_ids"], batch["labels"], impl=impl, **kwargs)  # [B, T]
    return -token_logps.sum(), int((batch["labels"][:, 1:] != IGNORE).sum())


def caption_correct(prediction: str, reference: str) -> bool:
    """Colour and shape both right: for each easy-VQA word list (colours, shapes) the reference names, the prediction
    names exactly the same words. The phrasing is free: the caption template varies per image and can't be read off
    it, and a reference may leave a part unnamed ("a red shape."). References naming neither need an exact match."""
    pred, ref = (set(re.findall(r"[a-z]+", text.lower())) for text in (prediction, reference))
    named = [vocab for vocab in (set(EASY_VQA_COLORS), set(EASY_VQA_SHAPES)) if ref & vocab]
    if not named:
        return vqa_normalize(prediction) == vqa_normalize(reference)
    return all(pred & vocab == ref & vocab for vocab in named)


@torch.no_grad()
def caption_accuracy(model, processor, prompts, references, max_new_tokens, run, batch_size=50) -> dict:
    """Greedy captions of held-out images: colour-and-shape accuracy, exact-match accuracy (both over every rank's
    share of the images) and a few of rank 0's captions."""
    mine = list(range(run.rank, len(prompts), run.world_size))
    texts = []
    with run.autocast(model):
        for lo in range(0, len(mine), batch_size):
            chunk = [prompts[i] for i in mine[lo : lo + batch_size]]
            completions, _, _ = generate(model, processor, chunk, max_new_tokens=max_new_tokens, greedy=True)
            texts += [t.strip() for t in processor.tokenizer.batch_decode(completions, skip_special_tokens=True)]
    refs = [references[i] for i in mine]
    sums = all_reduce_sums({"right": sum(caption_correct(t, r) for t, r in zip(texts, refs)),
                            "exact": sum(exact_match(t, r) for t, r in zip(texts, refs))}, run)  # fmt: skip
    n = max(1, len(prompts))
    return {"caption_accuracy": sums["right"] / n, "caption_exact_match": sums["exact"] / n,
            "samples": list(zip(texts[:3], refs[:3]))}  # fmt: skip


def build_model(args, device, meta=False):
    """(model, processor): the VLM folder in --model-path, or --model-path's LM composed with --vision-encoder (on the
    meta device with meta=True: FSDP2's sharded loading)."""
    if is_vlm(args.model_path):
        return load_vlm(args.model_path, dtype=torch.float32, device=device, meta=meta)
    return build_vlm(args.model_path, args.vision_encoder, image_size=args.image_size, projector=args.projector,
                     pixel_shuffle=args.pixel_shuffle, dtype=torch.float32, device=device, seed=args.seed, meta=meta)  # fmt: skip


def freeze_unused_vision_params(model) -> list[str]:
    """Freezes encoder parameters no image feature depends on (SigLIP's attention-pool head, CLIP's post-layernorm:
    ComposedVLM reads the patch tokens). They would never get a gradient, so AdamW would hold no state for them and
    a checkpoint would not match the optimizer state a resume expects."""
    if not isinstance(model, ComposedVLM):
        return []
    size = model.vision_encoder.config.image_size
    device = next(model.parameters()).device
    model.image_features(torch.zeros(1, 3, size, size, device=device)).sum().backward()
    unused = [
        n for n, p in model.named_parameters() if n.startswith("vision_encoder.") and p.requires_grad and p.grad is None
    ]
    for name, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(p.requires_grad and name not in unused)
    return unused


def evaluate(model, eval_items, captions, processor, packing, args, run) -> dict:
    """Held-out caption loss (every rank's share) and, when held-out images are captioned, caption accuracy."""
    out = {"eval/loss": heldout_nll(model, eval_items, processor, packing=packing, max_len=args.max_len,
                                    batch_size=args.batch_size, impl=args.logprob_impl, run=run)}  # fmt: skip
    if captions[0]:
        acc = caption_accuracy(model, processor, *captions, args.max_new_tokens, run)
        out |= {
            "eval/caption_accuracy": acc["caption_accuracy"],
            "eval/caption_exact_match": acc["caption_exact_match"],
        }
        run.print(
            f"\n[eval] loss {out['eval/loss']:.4f}, colour+shape right {acc['caption_accuracy']:.3f}, e.g. "
            + " | ".join(f"{t!r} (ref {r!r})" for t, r in acc["samples"])
        )
    return out


def main(args: Args):
    run = setup(args.seed, args.dtype, args.cpu_offload)

    # ---- data and model: read and check the records first, then preprocess every image and caption once, pack ----
    records, eval_records = (load_caption_records(r) for r in load_data(args))
    model, processor = build_model(args, run.device, meta=run.sharded and not run.main)
    packing = args.packing and processor.packable
    examples = caption_examples(records, processor, args.max_len, args.overlong)
    eval_examples = caption_examples(eval_records[: args.eval_size], processor, args.max_len, "truncate")
    items, eval_items = (
        [[e[i] for i in pack] for pack in pack_examples(e, args.max_len)] if packing else e
        for e in (examples, eval_examples))  # fmt: skip
    captions = ([processor(caption_chat(r, with_caption=False), base_dir=r.get("_dir", "."), add_generation_prompt=True)
                 for r in eval_records[: args.eval_samples]], [r["caption"] for r in eval_records[: args.eval_samples]])  # fmt: skip
    global_rows = args.batch_size * args.grad_accum * run.world_size
    steps_per_epoch = len(items) // global_rows
    if steps_per_epoch == 0:
        raise SystemExit(
            f"error: {len(items)} training rows is less than one global batch of {global_rows} "
            f"(--batch-size {args.batch_size} x --grad-accum {args.grad_accum} x {run.world_size} processes)"
        )
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
    freeze_unused_vision_params(model)
    groups = param_groups(model, args.lr, lr_vision=args.lr_vision, lr_lm=args.lr_lm, weight_decay=args.weight_decay)
    if not groups:
        raise SystemExit("error: --lr, --lr-vision and --lr-lm are all 0: nothing to train")
    sizes = {g["name"]: 0 for g in groups}  # trainable parameters per part
    for g in groups:
        sizes[g["name"]] += sum(p.numel() for p in g["params"])
    run.print(f"[plan] {args.model_path}{'' if is_vlm(args.model_path) else f' + {args.vision_encoder}'} | {len(records)} "
              f"records -> {len(examples)} examples -> {len(items)} rows ({'packed' if packing else 'padded'}, max "
              f"{args.max_len} tokens) | eval {len(eval_items)} rows, {len(captions[0])} images captioned | {total_steps} "
              f"steps x {global_rows} rows ({total_steps / steps_per_epoch:.2f} epochs) | trains "
              + ", ".join(f"{name} {n / 1e6:.2f}M" for name, n in sizes.items())
              + f" | world size {run.world_size} | {run.device} {run.dtype}")  # fmt: skip
    if args.dry_run:
        run.print("[plan] dry run, exiting")
        return None

    # ---- FSDP2: each encoder and LM block, then the root (embeddings, projector, norms, LM head); optimizer ----
    if run.sharded:  # FSDP2: rank 0 built the weights, the other ranks their model on the meta device
        full, fsdp = full_weights(model, run), fsdp_options(run, args.cpu_offload)
        for block in fsdp_blocks(model):  # the encoder's and the LM's blocks, then the root
            fully_shard(block, **fsdp)
        fully_shard(model, **fsdp)  # root: embeddings, projector, norms, LM head
        fill_shards(model, full, run)  # rank 0's weights into every rank's shards
        if isinstance(model, ComposedVLM):  # its generate bypasses forward: make it gather the root's weights too
            register_fsdp_forward_method(model, "generate")
        # sharding replaced the parameters; frozen parts stay frozen (requires_grad was set before)
        groups = param_groups(
            model, args.lr, lr_vision=args.lr_vision, lr_lm=args.lr_lm, weight_decay=args.weight_decay
        )
    trainable = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, args.warmup_steps, total_steps, args.schedule, args.min_lr_ratio))  # fmt: skip
    step = resume(run, args.output_dir, model, optimizer, scheduler) if args.resume else 0
    logger = RunLogger(args.output_dir, asdict(args), run, track=args.track,
                       resume_step=step if args.resume else None)  # fmt: skip
    autocast = run.autocast(model)

    # ---- training loop ----
    model.train()
    metrics = {}
    if eval_items and args.eval_every and step == 0:
        logger.log(evaluate(model, eval_items, captions, processor, packing, args, run), 0)
    progress = tqdm(total=total_steps, initial=step, desc="captioner", disable=not run.main, dynamic_ncols=True)
    while step < total_steps:
        t0 = time.time()
        epoch, position = divmod(step, steps_per_epoch)
        order = [i for batch in epoch_batches(len(items), global_rows, args.seed, epoch) for i in batch]
        per_rank = args.batch_size * args.grad_accum
        my_rows = order[position * global_rows + run.rank * per_rank :][:per_rank]
        micro_batches = [to_device(collate([items[i] for i in my_rows[m * args.batch_size : (m + 1) * args.batch_size]],
                                           processor, packing=packing, max_len=args.max_len), run.device)
                         for m in range(args.grad_accum)]  # fmt: skip
        # the loss is normalised by the caption tokens of the whole global batch, known before any forward
        counts = all_reduce_sums({"targets": sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro_batches),
                                  "tokens": sum(len(e["input_ids"]) for i in my_rows
                                                for e in (items[i] if packing else [items[i]])),
                                  "slots": sum(mb["input_ids"].numel() for mb in micro_batches)}, run)  # fmt: skip
        nll_sum = 0.0
        for mb in micro_batches:
            with autocast:
                nll, _ = caption_loss_sum(model, mb, args.logprob_impl)
            # FSDP2 averages gradients over ranks; scaling by world_size turns that into the global-batch sum
            (nll * run.world_size / counts["targets"]).backward()
            nll_sum += float(nll.detach())
        lrs = {f"train/lr_{g['name']}": lr for g, lr in zip(optimizer.param_groups, scheduler.get_last_lr())}
        grad_norm = optimizer_step(optimizer, scheduler, trainable, args.max_grad_norm)
        step += 1

        loss = all_reduce_sums({"nll": nll_sum}, run)["nll"] / counts["targets"]
        metrics = {"train/loss": loss, **lrs, "train/grad_norm": grad_norm, "train/epoch": step / steps_per_epoch,
                   "train/tokens_per_s": counts["tokens"] / (time.time() - t0),
                   "train/padding_fraction": 1 - counts["tokens"] / counts["slots"]}  # fmt: skip
        if eval_items and ((args.eval_every and step % args.eval_every == 0) or step == total_steps):
            metrics |= evaluate(model, eval_items, captions, processor, packing, args, run)
        logger.log(metrics, step)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        if save_if_due(run, args, step, total_steps, model, optimizer, scheduler):
            return finish(run, logger, {"step": step, "preempted": True}, progress)
    progress.close()

    # ---- export ----
    if args.export:
        out = export_model(model, processor, Path(args.output_dir) / "model", run, base_path=args.model_path,
                           fresh=lambda: build_model(args, "cpu")[0])  # fmt: skip
        run.print(f"[export] VLM folder (load_vlm opens it): {out}")
    results = {"step": step, **{k.split("/")[1]: v for k, v in metrics.items() if k.startswith("eval/")}}
    return finish(run, logger, results)


if __name__ == "__main__":
    main(cli(Args))
