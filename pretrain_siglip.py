"""pretrain_siglip.py: contrastive image-text pretraining of a vision encoder (SigLIP), in one file.

Each (image, caption) combination of a global batch of B pairs is a binary classification, matched or not (Zhai et al.
2023, "Sigmoid Loss for Language Image Pre-Training"); with x, y the L2-normalised image and text embeddings,

    loss = -1/B sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)),   z_ij = 1 if i == j else -1,   t = exp(t')

t' and b learned, from log 10 and -10 (the paper's initialisation). The export `<output-dir>/model` (the encoder's
save_pretrained + preprocessor_config.json, common/encoders.save_encoder) is pretrain_captioner.py's --vision-encoder:
stage 0 of the offline VLM pipeline (scripts/vlm_pipeline.sh, docs/vlm_pipeline.md).

Launch:
    python pretrain_siglip.py                                   # one CPU: a random-init siglip-tiny on easy-VQA captions
    python pretrain_siglip.py --vision-encoder ./siglip-base --dataset caps.jsonl --batch-size 512   # one GPU
    torchrun --nproc_per_node=8 pretrain_siglip.py --dataset caps.jsonl --batch-size 512          # N GPUs, FSDP2
    python pretrain_siglip.py --resume                          # continue from the newest checkpoint
    python pretrain_siglip.py --dry-run                         # check data, model and plan, then exit

The text side: no text transformer. A caption's text features are the mean of its token embeddings in --model-path
(the LM the captioner will put behind this encoder, SmolLM2-135M by default), frozen and computed once per caption;
the trained text tower is a LayerNorm + linear head on them. Why: offline there is no pretrained text encoder to start
from, a text transformer trained from scratch would be a second model to train on a CPU budget (these features cost
one pass over the captions), and the captions here are short templated phrases ("a red circle.") whose meaning is
their words, which a bag of embeddings keeps (word order is lost: "a red circle on a blue square" would need a real
text tower).

Where this departs from SigLIP:
  * The text tower above, instead of a transformer trained with the image tower.
  * Image embedding: the mean of the encoder's last-layer patch features (what the captioner reads), not SigLIP's
    attention-pool head, which stays frozen (no patch feature depends on it). In two 128-pair runs on easy-VQA (lr 1e-3,
    200- and 300-step schedules), zero-shot shape accuracy at step 100 was 0.55 with the mean against 0.39 with the head
    (docs/vlm_pipeline.md).
  * Every rank all-gathers the global batch's embeddings and computes the whole B x B loss, not the paper's chunked
    exchange: the gradients are the single-process ones. No --grad-accum: micro-batches would change a loss coupling
    all pairs. Same-content pairs of a batch (easy-VQA has 24 colour-shape kinds) count as negatives, as in the paper.
  * Eval: the held-out loss, and zero-shot easy-VQA colour / shape / both accuracy: each held-out image's nearest of
    the 24 colour-shape captions (each the mean embedding of the 4 caption templates: CLIP's prompt ensembling).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from tqdm import tqdm

from common.chat import epoch_batches
from common.checkpoint import gather_unsharded, resume, save_if_due
from common.cli import cli
from common.data import DataError
from common.datasets import load_data
from common.easy_vqa import CAPTION_TEMPLATES, EASY_VQA_COLORS, EASY_VQA_SHAPES
from common.encoders import load_encoder, save_encoder
from common.models import load_model, load_tokenizer
from common.run import (
    RunLogger,
    derive_seed,
    fill_shards,
    finish,
    fsdp_options,
    full_weights,
    lr_lambda,
    optimizer_step,
    reshard,
    setup,
)
from common.vlm_processor import VLMProcessor, load_images


@dataclass
class Args:
    model_path: str = "smollm2-135m"
    """the LM whose tokenizer and frozen token embeddings make the text features (alias, .gguf, local folder or hub
    id): the captioner's LM"""
    vision_encoder: str = "siglip-tiny"
    """encoder to train: siglip-tiny, clip-tiny, dinov2-tiny (random init) or a local SigLIP/CLIP/DINOv2 folder"""
    image_size: int = 64
    """input resolution of a preset encoder (a local encoder folder keeps its own)"""
    dataset: str = "easy-vqa:captions-train"
    """image-caption records {"image": path relative to the file, "caption": text}: a .jsonl file, a folder,
    easy-vqa:captions-train, or a weighted mixture (repeat the flag: --dataset a.jsonl:0.7 --dataset b.jsonl:0.3)"""
    eval_dataset: str | None = "easy-vqa:captions-test"
    """held-out caption records for the eval loss and zero-shot colour/shape retrieval"""
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

    eval_samples: int = 1000
    """held-out records (the first N) scored at every eval (0 disables the eval)"""
    output_dir: str = "runs/siglip"
    """checkpoints, metrics.jsonl and the exported encoder folder (`<output-dir>/model`) go here"""
    config: str | None = None
    """a .yaml or .json file of field: value defaults; command-line flags override them"""
    dry_run: bool = False
    """validate arguments, read the data, build the model, print the plan and exit"""
    seed: int = 0
    """seed for initialisation, mixture sampling and data order"""
    lr: float = 1e-3
    """peak learning rate (AdamW) of every trained part: encoder, text head, t' and b"""
    weight_decay: float = 1e-4
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
    batch_size: int = 128
    """image-caption pairs per process; the loss's B is batch_size * world_size"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (0 disables)"""
    dtype: str = "auto"
    """compute dtype: auto (bf16 where the hardware has it), float32 or bfloat16; master weights stay float32"""
    cpu_offload: bool = False
    """FSDP2's CPU offload: parameters, gradients and optimizer state stay on the CPU between uses (launch with torchrun;
    --nproc_per_node=1 for one device)"""
    eval_every: int = 100
    """eval every N steps and before training (0: only at the end)"""
    save_every: int = 100
    """save a resumable checkpoint every N steps (0: only on preemption and at the end)"""
    keep_checkpoints: int = 1
    """how many recent checkpoints to keep"""
    resume: bool = False
    """continue from the newest complete checkpoint in <output-dir>/checkpoints"""
    export: bool = True
    """write the trained encoder (save_pretrained + preprocessor_config.json) to <output-dir>/model at the end"""
    track: bool = False
    """log to Weights & Biases (offline mode when no account is configured; WANDB_PROJECT, WANDB_NAME name the run)"""


def siglip_loss(image_emb, text_emb, log_temperature, bias) -> torch.Tensor:
    """SigLIP's loss of B matched pairs: -1/B sum_ij log sigmoid(z_ij (exp(t') x_i . y_j + b)), z_ij = 1 on the
    diagonal (image i with its own caption), -1 elsewhere. image_emb, text_emb [B, D] L2-normalised; t', b [1]."""
    logits = image_emb @ text_emb.T * log_temperature.exp() + bias  # [B, B]
    z = 2 * torch.eye(len(logits), device=logits.device) - 1
    return -F.logsigmoid(z * logits).sum() / len(logits)


class SigLIP(torch.nn.Module):
    """Vision encoder (mean of its patch features), text head (LayerNorm + linear over text features), t' and b."""

    def __init__(self, vision, text_width: int):
        super().__init__()
        self.vision, self.patches = vision, (vision.config.image_size // vision.config.patch_size) ** 2
        width = vision.config.hidden_size
        self.text_head = torch.nn.Sequential(torch.nn.LayerNorm(text_width), torch.nn.Linear(text_width, width))
        self.log_temperature, self.bias = (torch.nn.Parameter(torch.tensor([v])) for v in (math.log(10.0), -10.0))

    def forward(self, pixel_values=None, text_features=None):
        """(L2-normalised image [N, D] and text [M, D] embeddings or None, t', b): all inside forward, for FSDP2."""
        images = texts = None
        dtype = self.text_head[1].weight.dtype
        if pixel_values is not None:
            hidden = self.vision(pixel_values=pixel_values.to(dtype)).last_hidden_state
            images = F.normalize(hidden[:, -self.patches :].mean(1).float(), dim=-1)  # CLS / registers dropped
        if text_features is not None:
            texts = F.normalize(self.text_head(text_features.to(dtype)).float(), dim=-1)
        return images, texts, self.log_temperature.clone(), self.bias.clone()


def freeze_unused(model: SigLIP) -> list[str]:
    """Freezes encoder parameters no patch feature depends on (SigLIP's attention-pool head, CLIP's post-layernorm):
    they would never get a gradient, so AdamW would hold no state for them and a checkpoint would not match the
    optimizer state a resume expects. Works on the meta device too (FSDP2's sharded loading)."""
    size, params = model.vision.config.image_size, dict(model.vision.named_parameters())
    device = next(iter(params.values())).device
    out = model.vision(pixel_values=torch.zeros(1, 3, size, size, device=device)).last_hidden_state
    grads = torch.autograd.grad(out[:, -model.patches :].sum(), list(params.values()), allow_unused=True)
    unused = [name for (name, p), g in zip(params.items(), grads) if g is None]
    for name in unused:
        params[name].requires_grad_(False)
    return unused


def text_features(texts: list[str], tokenizer, token_embeddings) -> torch.Tensor:
    """The text tower's frozen part: the mean of each text's token embeddings (no special tokens), [N, H]."""
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    mask = batch["attention_mask"][..., None].float()  # [N, L, 1]
    return (F.embedding(batch["input_ids"], token_embeddings) * mask).sum(1) / mask.sum(1)


def load_pairs(records: list[dict], name: str, processor, embed) -> dict:
    """Every record's image preprocessed once (as pretrain_captioner.py does it) and its caption's text features:
    {"pixels" [N, 3, S, S], "text" [N, H] (embed(captions)), "captions"}; every record is checked before any image."""
    for r, field in ((r, f) for r in records for f in ("image", "caption")):
        if not isinstance(r.get(field), str) or not r[field].strip():
            raise DataError(f"{r.get('_where', name)}: {field}: expected a non-empty string (records: image, caption; "
                            "map other names with --columns)")  # fmt: skip
    pixels = []
    for r in tqdm(records, desc="images", leave=False, disable=int(os.environ.get("RANK", 0)) != 0):
        try:
            chat = [{"role": "user", "content": [{"type": "image", "image": r["image"]}]}]
            pixels.append(processor.preprocess(load_images(chat, r.get("_dir", "."))[0]))
        except DataError as error:
            raise DataError(f"{r.get('_where', name)}: {error}") from None
    captions = [r["caption"] for r in records]
    return {"pixels": torch.stack(pixels), "text": embed(captions), "captions": captions}


@torch.no_grad()
def evaluate(model, data, prompts, batch_size: int, run) -> dict:
    """Held-out loss (mean over consecutive batches of batch_size pairs) and zero-shot easy-VQA colour, shape and both
    accuracy of the images whose caption names a colour and a shape: each image's nearest of the 24 colour-shape
    captions, `prompts` the text features of every kind x template. Every rank runs the same forwards (FSDP2)."""
    model.eval()
    kinds = [(c, s) for c in EASY_VQA_COLORS for s in EASY_VQA_SHAPES]
    with run.autocast(model):
        outs = [model(data["pixels"][i : i + 256].to(run.device), data["text"][i : i + 256].to(run.device))
                for i in range(0, len(data["text"]), 256)]  # fmt: skip
        candidates = model(None, prompts.to(run.device))[1]  # [24 * templates, D]
    images, texts, log_t, bias = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), *outs[0][2:]
    losses = [siglip_loss(images[i : i + batch_size], texts[i : i + batch_size], log_t, bias).item()
              for i in range(0, len(images) // batch_size * batch_size, batch_size)]  # fmt: skip
    out = {"eval/loss": sum(losses) / len(losses)} if losses else {}
    candidates = F.normalize(candidates.view(len(kinds), len(CAPTION_TEMPLATES), -1).mean(1), dim=-1)  # [24, D]
    truth = [next((k for k in kinds if set(k) <= set(re.findall(r"\w+", c.lower()))), None) for c in data["captions"]]
    scored = [i for i, k in enumerate(truth) if k]
    if scored:
        guess = [kinds[k] for k in (images[scored] @ candidates.T).argmax(1).tolist()]
        hits = torch.tensor([(g[0] == truth[i][0], g[1] == truth[i][1]) for g, i in zip(guess, scored)]).float()
        out |= {"eval/colour_accuracy": hits[:, 0].mean().item(), "eval/shape_accuracy": hits[:, 1].mean().item(),
                "eval/both_accuracy": hits.prod(1).mean().item()}  # fmt: skip
    reshard(model)
    model.train()
    run.print("\n[eval] " + ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in out.items()))
    return out


def build_model(args, text_width: int, device="cpu", meta: bool = False):
    """(SigLIP, image mean, image std): --vision-encoder with a fresh text head, seeded from --seed (on the meta device
    with meta=True: FSDP2's sharded loading, rank 0's weights fill the shards)."""
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(args.seed, "init"))
        vision, mean, std = load_encoder(args.vision_encoder, args.image_size, meta=meta)
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = SigLIP(vision, text_width)
    freeze_unused(model)
    return model if meta else model.to(device), mean, std


def main(args: Args):
    run = setup(args.seed, args.dtype, args.cpu_offload)

    # ---- text features (frozen, computed once), images preprocessed once, the model ----
    tokenizer = load_tokenizer(args.model_path)
    token_embeddings = load_model(args.model_path).get_input_embeddings().weight.detach()  # [V, H]; the LM is dropped
    embed = lambda texts: text_features(texts, tokenizer, token_embeddings)
    model, mean, std = build_model(args, token_embeddings.shape[1], run.device, meta=run.sharded and not run.main)
    processor = VLMProcessor(tokenizer, model.vision.config.image_size, mean, std, 0)  # the captioner's preprocessing
    records, eval_records = load_data(args)
    data = load_pairs(records, args.dataset, processor, embed)
    eval_data = load_pairs(eval_records[: args.eval_samples], "held-out", processor, embed) \
        if eval_records and args.eval_samples else None  # fmt: skip
    prompts = embed([t.format(f"{c} {s}") for c in EASY_VQA_COLORS for s in EASY_VQA_SHAPES for t in CAPTION_TEMPLATES])
    global_batch = args.batch_size * run.world_size
    steps_per_epoch = len(data["text"]) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(data['text'])} training pairs is less than one global batch of {global_batch}")
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    run.print(f"[plan] {args.vision_encoder} ({processor.image_size}px) + a text head on {args.model_path}'s token "
              f"embeddings | {len(data['text'])} pairs, eval {len(eval_data['text']) if eval_data else 0} | "
              f"{total_steps} steps x {global_batch} pairs ({total_steps / steps_per_epoch:.1f} epochs) | trains "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M | world size {run.world_size} | {run.device} {run.dtype}")  # fmt: skip
    if args.dry_run:
        run.print("[plan] dry run, exiting")
        return None

    # ---- FSDP2: each encoder block, then the root (embeddings, pooling head, text head, t', b); optimizer ----
    if run.sharded:  # rank 0 built the weights, the other ranks their model on the meta device
        full, fsdp = full_weights(model, run), fsdp_options(run, args.cpu_offload)
        for block in next(m for m in model.vision.modules() if isinstance(m, torch.nn.ModuleList)):
            fully_shard(block, **fsdp)  # SigLIP/CLIP encoder.layers, DINOv2 encoder.layer
        fully_shard(model, **fsdp)
        fill_shards(model, full, run)
        params = [p for p in model.parameters() if p.requires_grad]  # sharding replaced them; frozen stay frozen
    no_decay = [p for p in params if p.dim() < 2]  # t', b, biases and norm gains
    groups = [{"params": [p for p in params if p.dim() >= 2]}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, args.warmup_steps, total_steps, args.schedule, args.min_lr_ratio))  # fmt: skip
    step = resume(run, args.output_dir, model, optimizer, scheduler) if args.resume else 0
    logger = RunLogger(args.output_dir, asdict(args), run, track=args.track,
                       resume_step=step if args.resume else None)  # fmt: skip
    autocast = run.autocast(model)

    # ---- training loop ----
    model.train()
    metrics = {}
    if eval_data and args.eval_every and step == 0:
        logger.log(evaluate(model, eval_data, prompts, global_batch, run), 0)
    progress = tqdm(total=total_steps, initial=step, desc="siglip", disable=not run.main, dynamic_ncols=True)
    while step < total_steps:
        t0 = time.time()
        epoch, position = divmod(step, steps_per_epoch)
        order = [i for batch in epoch_batches(len(data["text"]), global_batch, args.seed, epoch) for i in batch]
        mine = order[position * global_batch + run.rank * args.batch_size :][: args.batch_size]  # this rank's pairs
        with autocast:
            images, texts, log_t, bias = model(data["pixels"][mine].to(run.device), data["text"][mine].to(run.device))
        if run.sharded:  # the global batch's embeddings in rank order; the gather's backward sends each rank its rows
            from torch.distributed.nn.functional import all_gather

            images, texts = torch.cat(all_gather(images)), torch.cat(all_gather(texts))
        # every rank computes the same global loss: the gather's backward sums the ranks' copies, FSDP2 averages them
        loss = siglip_loss(images, texts, log_t, bias)
        loss.backward()
        lr = scheduler.get_last_lr()[0]
        grad_norm = optimizer_step(optimizer, scheduler, params, args.max_grad_norm)
        step += 1

        metrics = {"train/loss": loss.item(), "train/lr": lr, "train/grad_norm": grad_norm,
                   "train/temperature": log_t.exp().item(), "train/bias": bias.item(),
                   "train/epoch": step / steps_per_epoch, "train/pairs_per_s": global_batch / (time.time() - t0)}  # fmt: skip
        if eval_data and ((args.eval_every and step % args.eval_every == 0) or step == total_steps):
            metrics |= evaluate(model, eval_data, prompts, global_batch, run)
        logger.log(metrics, step)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['train/loss']:.4f}")
        if save_if_due(run, args, step, total_steps, model, optimizer, scheduler):
            return finish(run, logger, {"step": step, "preempted": True}, progress)
    progress.close()

    # ---- export: the encoder alone, the folder pretrain_captioner.py --vision-encoder loads ----
    if args.export:
        plain = gather_unsharded(model, lambda: build_model(args, token_embeddings.shape[1])[0], run)
        if plain is not None:
            out = save_encoder(plain.vision, processor.image_size, mean, std, Path(args.output_dir) / "model")
            run.print(f"[export] encoder folder (pretrain_captioner.py --vision-encoder): {out}")
    results = {"step": step, **{k.split("/")[1]: v for k, v in metrics.items() if k.startswith("eval/")}}
    return finish(run, logger, {**results, "loss": metrics.get("train/loss")})


if __name__ == "__main__":
    main(cli(Args))
