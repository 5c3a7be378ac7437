"""The rollout engine of grpo.py and ppo.py (and the `generate` of every script's held-out evaluation): prompts from data,
encoded by the model's processor with one rule for images; Hugging Face `generate` with FIRE sampling, the sampler's
own log-probabilities, stop tokens and left padding; the training rows built from prompt + completion; the per-token
log-probabilities the losses use. The colocated vLLM engine lives in common/vllm_engine.py and returns the same
(completions, truncated, sampler logps) triple, so the scripts treat both alike.

Under FSDP2, `generate` first gathers the full weights once (`gathered`), decodes without any collective, and frees them
after: plain `generate` on a sharded model would all-gather every layer at every decoding step, and every rank would
have to step until the slowest is done (synced_gpus).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from common.chat import IGNORE
from common.data import DataError, content_text, has_images, load_mixture, prompt_messages
from common.datasets import detect_format
from common.logprob import sequence_logprobs
from common.run import all_reduce_sums, to_device


# ------------------------------------------------------------------------------------------------------ prompts
def prompt_records(source, processor, *, script="this script", seed=0) -> list[tuple[list[dict], object]]:
    """(prompt messages, reference answer or None) per record of a source (or of records already loaded): the prompt
    field, or the chat minus its final assistant turn(s), or a preference pair's prompt (common.datasets.USES).
    Relative image paths are resolved against the data file's folder here, so a prompt carries everything it needs.
    Answers stay as given (a VQA answer may be a list of annotators' answers). A text model's processor refuses image
    prompts here, naming the record, rather than at the first rollout."""
    records = load_mixture(source, seed=seed) if isinstance(source, str) else source  # file, folder, hub, mixture
    if not records:
        return []  # no held-out data
    fmt = detect_format(records, use="prompts", script=script)
    out = []
    for r in records:
        messages = prompt_messages(r, fmt)
        for m in messages:
            for part in m["content"] if isinstance(m.get("content"), list) else []:
                ref = part.get("image")
                if part.get("type") == "image" and isinstance(ref, str) and not ref.startswith(("data:", "/", "http")):
                    part["image"] = str(Path(r.get("_dir", "."), ref.removeprefix("file://")))
        if processor.image_token_id is None and has_images(messages):
            raise DataError(f"{r['_where']}: the prompt holds an image but --model-path is a text model; pass a VLM "
                            "folder (pretrain_captioner.py / sft.py export, or a native image-text-to-text model)")  # fmt: skip
        if messages:
            out.append((messages, r.get("answer")))
    return out


def render_prompt(tokenizer, messages) -> str:
    """The chat as text up to the assistant header, an image part shown as <image> (for rollouts.jsonl and logs)."""
    text_messages = [{"role": m["role"], "content": content_text(m.get("content")) if not isinstance(m.get("content"), list)
                      else "\n".join(p["text"] if p.get("type") == "text" else "<image>" for p in m["content"])}
                     for m in messages]  # fmt: skip
    return tokenizer.apply_chat_template(text_messages, add_generation_prompt=True, tokenize=False)


def stop_ids(tokenizer, model) -> list[int]:
    """Every token that ends a completion: the generation config's EOS ids and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids + [tokenizer.eos_token_id]) - {None})


# ---------------------------------------------------------------------------------------------- generation
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
    """The sampler's own log-probability of each token it samples: log_softmax(scores / temperature) at the drawn
    token (scores after the processors placed before this one, i.e. FIRE's rescaling, before top-p filtering).
    generate() hands processors the logits of step t before sampling token t, so each call reads the token drawn at the
    previous step from input_ids; `finish` reads the last one. Memory: one [B, V] row per step, not T x B x V."""

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


@contextlib.contextmanager
def gathered(model, enabled: bool = True):
    """Under FSDP2: all-gather every sharded block of `model` once, keep the full weights through all the forwards
    inside (the decoding steps), then free them; costs one unsharded copy of the model per rank while it lasts. Yields
    whether the ranks must decode in lockstep (synced_gpus): only when the model is sharded and enabled=False, so that
    each decoding step's per-layer all-gathers pair up across ranks."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules or not enabled:
        yield bool(modules)
        return
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    for m in modules:  # the same order on every rank: the all-gathers pair up
        m.unshard()
    try:
        yield False
    finally:
        for m in modules:
            m.reshard()
            # back to FSDP2's defaults: blocks reshard after forward, the root keeps embeddings and head gathered
            m.set_reshard_after_forward(m is not model, recurse=False)


@torch.no_grad()
def generate(model, processor, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False,
             fire_temperature=None, gather=True, num_beams=1):  # fmt: skip
    """Completions of encoded prompts (processor(..., add_generation_prompt=True) outputs): completion token lists
    (EOS kept, pads cut), truncated flags (no EOS within max_new_tokens) and the sampler's own logps of those tokens
    (lists; None when greedy; greedy with num_beams > 1 is beam search). Left-padded batch, KV cache; the caller's
    autocast applies. Under FSDP2 with gather=True
    the weights are gathered once for all decoding steps; with gather=False every step all-gathers and synced_gpus
    keeps the ranks in step."""
    from transformers import LogitsProcessorList

    from common.vision import vlm_generate

    tokenizer = processor.tokenizer
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(p["input_ids"]) for p in prompts)  # left-pad: generation appends on the right
    pad = [width - len(p["input_ids"]) for p in prompts]
    input_ids = torch.tensor([[tokenizer.pad_token_id] * n + p["input_ids"] for n, p in zip(pad, prompts)])  # [B, T]
    attention_mask = (torch.arange(width)[None] >= torch.tensor(pad)[:, None]).long()  # [B, T]
    eos = stop_ids(tokenizer, model)
    processors = LogitsProcessorList()
    if not greedy and fire_temperature:
        processors.append(FirstTokenTemperature(fire_temperature, temperature))
    recorder = None if greedy else SampledTokenLogprobs(temperature)
    if recorder is not None:
        processors.append(recorder)  # after FIRE: it records the distribution tokens were actually drawn from
    sampling = dict(num_beams=num_beams) if greedy else dict(temperature=temperature, top_p=top_p, top_k=0)
    with gathered(model, gather) as lockstep:
        options = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, use_cache=True, eos_token_id=eos,
                       pad_token_id=tokenizer.pad_token_id, logits_processor=processors, synced_gpus=lockstep,
                       **sampling)  # fmt: skip
        images = to_device(processor.image_inputs(prompts, input_ids), device)  # a VLM's, in row order
        new_tokens = vlm_generate(model, input_ids.to(device), attention_mask.to(device), **images, **options)
    model.train(was_training)
    sampler_logps = recorder.finish(new_tokens).tolist() if recorder is not None else None
    completions, truncated, rollout_logps = [], [], []
    for i, row in enumerate(new_tokens.tolist()):
        end = next((j for j, t in enumerate(row) if t in eos), None)
        completions.append(row if end is None else row[: end + 1])
        truncated.append(end is None)
        rollout_logps.append(None if sampler_logps is None else sampler_logps[i][: len(completions[-1])])
    return completions, truncated, rollout_logps


def sample_completions(model, processor, prompts, messages, *, n=1, engine=None, max_new_tokens, temperature=1.0,
                       top_p=1.0, fire_temperature=None, gather=True):  # fmt: skip
    """n completions per encoded prompt, prompt-major (prompt i's j-th at i * n + j): (completions, truncated, sampler
    logps), from the colocated vLLM engine when given (common/vllm_engine.py; its weights synced by the caller), else
    from Hugging Face `generate` on the training model. `messages`: the prompts' chats, whose image files a native VLM's
    engine reads itself (vLLM preprocesses images its own way)."""
    if engine is None:
        return generate(model, processor, [p for p in prompts for _ in range(n)], max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, fire_temperature=fire_temperature, gather=gather)  # fmt: skip
    from common.vllm_engine import generate as vllm_generate
    from common.vlm_processor import load_images

    images = [load_images(m) for m in messages] if processor.image_token_id is not None else None
    return vllm_generate(engine, [p["input_ids"] for p in prompts], images=images, temperature=temperature, top_p=top_p,
                         max_tokens=max_new_tokens, stop_token_ids=stop_ids(processor.tokenizer, model), n=n)  # fmt: skip


# ------------------------------------------------------------------------------------------ training rows
def build_batch(prompt_ids, completions, pad_id, rollout_logps=None) -> dict:
    """Right-padded training rows prompt + completion: input_ids, labels, attention_mask, position_ids [B, L] and
    response_mask [B, L], True at t when logps[:, t] (which scores token t+1) scores a completion token (a critic's
    value at t is the value of that same state, the prefix up to t); with the sampler's own logps (lists per
    completion), rollout_logps [B, L] on the same positions (0 elsewhere)."""
    rows = [p + c for p, c in zip(prompt_ids, completions)]
    L = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((len(rows), L), dtype=torch.long)  # [B, L]
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
        attention_mask[i, : len(p) + len(c)] = 1
    response_mask = torch.zeros((len(rows), L), dtype=torch.bool)  # [B, L]
    response_mask[:, :-1] = labels[:, 1:] != IGNORE
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # [B, L]
    batch = dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask, position_ids=position_ids,
                 response_mask=response_mask)  # fmt: skip
    if rollout_logps is not None and all(lp is not None for lp in rollout_logps):
        batch["rollout_logps"] = torch.zeros((len(rows), L))  # [B, L]
        for i, (p, lp) in enumerate(zip(prompt_ids, rollout_logps)):
            batch["rollout_logps"][i, len(p) - 1 : len(p) - 1 + len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return batch


def micro_batch(batch, rows, prompts, processor, device):
    """(tensors of `rows` of a build_batch batch, cut to their longest row, on device; their image inputs). `prompts`
    are the encoded prompts of the batch's rows (their images, in row order)."""
    mb = {k: v[rows] for k, v in batch.items()}
    width = int(mb["attention_mask"].sum(1).max())  # trim the right padding to this micro-batch's longest row
    mb = {k: v[:, :width].to(device) for k, v in mb.items()}
    images = processor.image_inputs([prompts[i] for i in rows.tolist()], mb["input_ids"])
    return mb, to_device(images, device)


def micro_batches(batch, rows, prompts, processor, run, *, size, max_tokens=0):
    """(row indices, micro-batch, image inputs) for consecutive groups of `rows` (a mini-batch sorted by length, so
    neighbours are alike): `size` rows padded to their longest; or, with max_tokens > 0, groups of at most max_tokens
    real tokens, each run as one packed row (position_ids restarting per row, as SFT packs: no padding is computed;
    mb["packed"], which token_logps and common.value.token_values read). The loss still sees the padded layout, so
    its normalisation is unchanged. Every rank gets as many groups (FSDP2's forwards are collective): the greedy
    packing's largest count over ranks, reached by halving a rank's largest groups. A native VLM (M-RoPE) pads."""
    if not (max_tokens and processor.packable):
        groups = [rows[i : i + size] for i in range(0, len(rows), size)]
    else:
        lengths, groups, used = batch["attention_mask"][rows].sum(1).tolist(), [[]], 0
        for row, n in zip(rows.tolist(), lengths):
            if groups[-1] and used + n > max_tokens:
                groups.append([])
                used = 0
            groups[-1].append(row)
            used += n
        target = all_reduce_sums({"n": len(groups)}, run, op="max")["n"]
        while len(groups) < target:
            k = max(range(len(groups)), key=lambda i: len(groups[i]))
            groups[k : k + 1] = [groups[k][: len(groups[k]) // 2], groups[k][len(groups[k]) // 2 :]]
        groups = [torch.tensor(g) for g in groups]
    for idx in groups:
        mb, images = micro_batch(batch, idx, prompts, processor, run.device)
        if max_tokens and processor.packable:
            real = mb["attention_mask"].flatten().nonzero().squeeze(1)  # [N] positions of real tokens, row-major
            mb["packed"] = {
                "index": real,
                **{k: mb[k].flatten()[real][None] for k in ("input_ids", "labels", "position_ids")},
            }
        yield idx, mb, images


def unpack(values, mb):
    """Per-token values of the packed row [1, N] back into the micro-batch's padded layout [B, W] (0 at padding)."""
    out = values.new_zeros(mb["input_ids"].numel())
    return out.index_copy(0, mb["packed"]["index"], values[0]).view(mb["input_ids"].shape)


def token_logps(model, mb, images, *, impl="fused", temperature=1.0, entropy=False):
    """log pi(completion tokens) [B, L] at the sampling temperature (and entropy [B, L]), via common/logprob.py; from
    one packed row when the micro-batch has one (micro_batches). images: the rows' image inputs (they may override
    position_ids, as Qwen-VL's do)."""
    rows = mb.get("packed", mb)
    kwargs = {"position_ids": rows["position_ids"], "attention_mask": rows.get("attention_mask"), **images}
    out = sequence_logprobs(model, rows["input_ids"], rows["labels"], impl=impl, temperature=temperature,
                            return_entropy=entropy, **kwargs)  # fmt: skip
    if "packed" not in mb:
        return out
    return tuple(unpack(x, mb) for x in out) if entropy else unpack(out, mb)


# -------------------------------------------------------------------------------------- sampler vs trainer
def tis_weights(old_logps, sampler_logps, response_mask, cap: float):
    """Truncated importance sampling [B, T] for the sampler/trainer mismatch (Yao et al. 2025, "Your Efficient RL
    Framework Secretly Brings You Off-Policy RL Training"; verl's rollout importance sampling): the sampler (vLLM, or
    generate with its KV cache and batching) and the training forward disagree slightly about the policy that drew
    the tokens, so each token's policy-gradient term is weighted by w_t = min(pi_old(y_t) / pi_sampler(y_t), cap),
    detached; 0 outside the mask."""
    return (torch.exp(old_logps - sampler_logps).clamp(max=cap) * response_mask).detach()


def sampler_gap(old_logps, sampler_logps, response_mask, cap=None) -> dict:
    """Sums for the logged sampler-vs-trainer gap over the masked tokens: |log pi_old - log pi_sampler|, the ratio
    pi_old / pi_sampler and, with a TIS cap, the tokens whose weight it cut."""
    diff = (old_logps - sampler_logps).float()[response_mask.bool()]
    sums = {"gap_tokens": diff.numel(), "gap_abs": float(diff.abs().sum()), "gap_ratio": float(diff.exp().sum())}
    if cap is not None:
        sums["tis_capped"] = float((diff.exp() > cap).sum())
    return sums
