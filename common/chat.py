"""Chats to tokens: chat templates with assistant-only labels, the text model's processor (the same interface as a
VLM's, common/vision.py), SFT examples, padding, packing and epoch order.

Pipeline for SFT: load_records -> detect_format -> to_messages -> processor(messages) (tokenize_chat for a text model)
-> pad_collate, or pack_examples + pack_collate. Labels are *unshifted* (-100 = no loss); the scripts shift. Raw text
(`text` records) skips the chat template: text_examples.

Tool calls: an assistant turn's `tool_calls` go to the chat template when it renders them; a template that drops them
(SmolLM2's) gets them written into the turn's content as Hermes-style JSON, one per call, so they are trained:
    <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>
A record's `tools` list goes to the template likewise, or else into the system turn as JSON between <tools> tags.
`tool` turns (the results) are never targets, like every non-assistant turn.
"""

from __future__ import annotations

import json
import math

import torch

from common.data import DataError, content_text, has_images, load_records, log, to_messages
from common.datasets import detect_format
from common.logprob import sequence_logprobs
from common.run import all_reduce_sums, derive_seed, to_device

IGNORE = -100  # label value that contributes no loss (torch cross_entropy's default ignore_index)


# -------------------------------------------------------------------------------------- tokenisation
_warned_unstable: set[str] = set()


_renders: dict = {}


def _template_renders(tokenizer, what: str) -> bool:
    """Whether the chat template renders tool calls (what="tool_calls") or a tools list ("tools"): a probe name shows."""
    key = (tokenizer.chat_template, what)
    if key not in _renders:
        name = "cleanpost_probe_fn"
        call = {"type": "function", "function": {"name": name, "arguments": {}}}
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
        tool = {"type": "function", "function": {"name": name, "description": "", "parameters": {"type": "object"}}}
        try:
            text = tokenizer.apply_chat_template(chat if what == "tool_calls" else chat[:1], tools=[tool] if what == "tools"
                                                 else None, tokenize=False)  # fmt: skip
        except Exception:  # a template that raises on them renders them no better
            text = ""
        _renders[key] = name in text
    return _renders[key]


def _tool_call_text(call: dict) -> str:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    try:  # OpenAI's wire format holds the arguments as a JSON string: written as the object it encodes
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        pass
    return "<tool_call>\n" + json.dumps({"name": function["name"], "arguments": arguments}) + "\n</tool_call>"


def template_messages(messages: list[dict], tokenizer, tools=None) -> tuple[list[dict], list | None]:
    """(messages, tools) as the chat template takes them: text content; tool calls and tools passed to the template
    when it renders them, else written into the text (see the module docstring)."""
    native_calls = _template_renders(tokenizer, "tool_calls")
    out = []
    for m in messages:
        text, calls = content_text(m.get("content")), m.get("tool_calls")
        if calls and not native_calls:
            text = "\n".join([text] * bool(text) + [_tool_call_text(call) for call in calls])
        rest = {k: v for k, v in m.items() if k not in ("content", "tool_calls")}  # role; a tool turn's name
        out.append(rest | {"content": text} | ({"tool_calls": calls} if calls and native_calls else {}))
    if tools and not _template_renders(tokenizer, "tools"):
        listed = "You can call these tools:\n<tools>\n" + "\n".join(json.dumps(t) for t in tools) + "\n</tools>"
        system = out[0]["content"] + "\n\n" if out and out[0]["role"] == "system" else ""
        out = [{"role": "system", "content": system + listed}] + out[1 if system else 0 :]
        tools = None
    return out, tools or None


def _assistant_spans(messages: list[dict], tokenizer, full: str, tools=None) -> list[tuple[int, int]]:
    """Character spans of every assistant turn (content + end-of-turn token) inside the rendered `full` text."""

    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen)

    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:  # prefix renders: the generation prompt ends where the answer starts, the turn ends where it ends
            start = render(messages[:i], gen=True) if i else ""
            end = render(messages[: i + 1])
            stable = full.startswith(start) and full.startswith(end) and cursor <= len(start) <= len(end)
        except Exception:
            stable = False
        if stable:
            # trailing whitespace after the end token (ChatML's "\n") is template, never generated
            span = (len(start), len(end.rstrip()))
        else:  # template is not prefix-stable (e.g. drops reasoning of earlier turns): find the content itself
            name = getattr(tokenizer, "name_or_path", "tokenizer")
            if name not in _warned_unstable:
                _warned_unstable.add(name)
                log(
                    f"[data] warning: chat template of {name} is not prefix-stable; locating assistant turns by content"
                )
            text = m["content"]
            k = full.find(text, cursor) if text else -1
            if k < 0:
                raise DataError(f"assistant turn {i} ({text[:60]!r}) not found in the chat-template rendering")
            stop = k + len(text)
            for special in sorted(tokenizer.all_special_tokens, key=len, reverse=True):
                if special and full.startswith(special, stop):
                    stop += len(special)  # the end-of-turn token, so the model learns to stop
                    break
            span = (k, stop)
        spans.append(span)
        cursor = span[1]
    return spans


def tokenize_chat(
    messages: list[dict], tokenizer, *, max_len: int, overlong: str = "truncate", tools=None
) -> dict | None:
    """{"input_ids", "labels", "truncated"} with labels = input_ids on assistant-turn tokens only, -100 elsewhere.

    Over-long chats keep their first max_len tokens (overlong="truncate") or give None (overlong="drop").
    """
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')} has no chat template; use an instruct model's tokenizer"
        )
    text_messages, tools = template_messages(messages, tokenizer, tools)
    full = tokenizer.apply_chat_template(text_messages, tools=tools, tokenize=False)
    spans = _assistant_spans(text_messages, tokenizer, full, tools)
    enc = tokenizer(full, return_offsets_mapping=True, add_special_tokens=False)
    input_ids = list(enc["input_ids"])
    # a token is a target when it overlaps an assistant span (catches tokens merged across the span start)
    labels = [
        tid if any(a < e and b > s for s, e in spans) else IGNORE
        for tid, (a, b) in zip(input_ids, enc["offset_mapping"])
    ]
    truncated = len(input_ids) > max_len
    if truncated and overlong == "drop":
        return None
    return {"input_ids": input_ids[:max_len], "labels": labels[:max_len], "truncated": truncated}


class TextProcessor:
    """A text model's processor, with the call signature of common/vision.py's VLM processors, so that every script
    encodes chats one way whatever the model: processor(messages) -> {"input_ids", "labels" (assistant tokens only),
    "images": [], "truncated"}; with add_generation_prompt, the prompt up to the assistant header (no labels). Image
    parts are an error: a text model would silently train or answer without them."""

    image_token_id = None
    packable = True  # position_ids restart per packed example (a native VLM's M-RoPE positions can't)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, messages, *, base_dir=".", max_len=None, overlong="truncate", add_generation_prompt=False,
                 tools=None):  # fmt: skip
        if has_images(messages):
            raise DataError("the chat holds an image but --model-path is a text model; pass a VLM folder "
                            "(pretrain_captioner.py / sft.py export, or a native image-text-to-text model)")  # fmt: skip
        if add_generation_prompt:
            text_messages, tools = template_messages(messages, self.tokenizer, tools)
            text = self.tokenizer.apply_chat_template(text_messages, tools=tools, add_generation_prompt=True,
                                                      tokenize=False)  # fmt: skip
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ids, "labels": [IGNORE] * len(ids), "images": [], "truncated": False}
        example = tokenize_chat(messages, self.tokenizer, max_len=max_len or 1 << 30, overlong=overlong, tools=tools)
        return None if example is None else {**example, "images": []}

    def image_inputs(self, examples, input_ids=None) -> dict:
        return {}


def encode(processor, messages, record, **kwargs):
    """processor(messages) with the record's image folder (and its `tools` list, a JSON string or a list); a DataError
    names the record's file:line."""
    tools = record.get("tools")
    kwargs |= {"tools": json.loads(tools) if isinstance(tools, str) else tools} if tools else {}
    try:
        return processor(messages, base_dir=record.get("_dir", "."), **kwargs)
    except DataError as e:
        raise DataError(f"{record.get('_where', '?')}: {e}") from None


def text_examples(text: str, tokenizer, max_len: int) -> list[dict]:
    """Raw text for continued pretraining: no chat template, every token a target, EOS appended; a text longer than
    max_len is cut into max_len-token pieces (none dropped)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    ids += (
        [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id] else []
    )
    return [{"input_ids": ids[i : i + max_len], "labels": ids[i : i + max_len], "images": []}
            for i in range(0, len(ids), max_len)]  # fmt: skip


def build_sft_examples(source, processor, *, max_len: int, overlong="truncate", name=None) -> tuple[list, dict]:
    """load -> detect -> to_messages -> processor; returns (examples, stats). `source`: a load_records source, or
    records already loaded (load_mixture), called `name` in messages. A VLM's examples also carry their images, and
    image tokens count toward max_len. Raw `text` records: text_examples."""
    records = load_records(source) if isinstance(source, str) else source
    source = source if isinstance(source, str) else name or "dataset"
    fmt = detect_format(records, use="sft", script="sft.py")
    examples, n_truncated, n_dropped, n_no_target = [], 0, 0, 0
    for record in records:
        if fmt == "text":
            examples += text_examples(record["text"], processor.tokenizer, max_len)
            continue
        example = encode(processor, to_messages(record, fmt), record, max_len=max_len, overlong=overlong)
        if example is None:
            n_dropped += 1
            continue
        if all(label == IGNORE for label in example["labels"]):
            n_no_target += 1  # nothing to learn (no assistant turn, or it was cut off by truncation)
            continue
        n_truncated += example.pop("truncated")
        examples.append(example)
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    n_targets = sum(sum(label != IGNORE for label in e["labels"]) for e in examples)
    stats = dict(format=fmt, n_records=len(records), n_examples=len(examples), n_truncated=n_truncated,
                 n_dropped=n_dropped, n_no_target=n_no_target, n_tokens=n_tokens, n_target_tokens=n_targets)  # fmt: skip
    log(
        f"[data] {source}: {fmt}, {len(records)} records -> {len(examples)} examples, {n_tokens} tokens ({n_targets} "
        f"targets); {n_truncated} truncated, {n_dropped} dropped as over-long, {n_no_target} without assistant tokens"
    )
    if not examples:
        raise DataError(
            f"{source}: empty dataset after filtering ({len(records)} records, {n_dropped} dropped as "
            f"over-long: raise --max-len or use --overlong truncate; {n_no_target} had no assistant tokens)"
        )
    return examples, stats


# ----------------------------------------------------------------------------------- batching, packing
def pad_collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded batch: input_ids, labels (-100 on pad), attention_mask, position_ids, all [B, T]."""
    T = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)  # [B, T]
    position_ids = torch.zeros((len(examples), T), dtype=torch.long)  # [B, T]
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
        position_ids[row, :n] = torch.arange(n)
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask, position_ids=position_ids)


def pack_examples(examples: list[dict], max_tokens: int) -> list[list[int]]:
    """Example indices grouped into packs of total length <= max_tokens (first-fit decreasing, deterministic)."""
    lengths = [len(e["input_ids"]) for e in examples]
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    assert not too_long, (
        f"{len(too_long)} examples longer than max_tokens={max_tokens} (e.g. #{too_long[0]}: "
        f"{lengths[too_long[0]]} tokens); tokenise with max_len <= max_tokens"
    )
    packs: list[list[int]] = []
    room: list[int] = []  # free tokens left in each pack
    for i in sorted(range(len(examples)), key=lambda i: (-lengths[i], i)):
        for p, free in enumerate(room):
            if lengths[i] <= free:
                packs[p].append(i)
                room[p] -= lengths[i]
                break
        else:
            packs.append([i])
            room.append(max_tokens - lengths[i])
    return packs


def pack_collate(packs_of_examples: list[list[dict]], pad_id: int, max_tokens: int) -> dict:
    """Each pack -> one row of exactly max_tokens tokens; examples are isolated by restarting position_ids.

    No attention_mask on purpose: transformers then derives the block-diagonal mask (and flash-attn's varlen segments)
    from position_ids (call the model with use_cache=False).
    """
    B = len(packs_of_examples)
    input_ids = torch.full((B, max_tokens), pad_id, dtype=torch.long)  # [B, max_tokens]
    labels = torch.full((B, max_tokens), IGNORE, dtype=torch.long)  # [B, max_tokens]
    position_ids = torch.zeros((B, max_tokens), dtype=torch.long)  # [B, max_tokens]
    for row, pack in enumerate(packs_of_examples):
        t = 0
        for e in pack:
            n = len(e["input_ids"])
            assert t + n <= max_tokens, (
                f"pack of {sum(len(x['input_ids']) for x in pack)} tokens > max_tokens={max_tokens}"
            )
            input_ids[row, t : t + n] = torch.tensor(e["input_ids"])
            labels[row, t : t + n] = torch.tensor(e["labels"])
            labels[row, t] = IGNORE  # the previous example's last token must never learn to predict this one
            position_ids[row, t : t + n] = torch.arange(n)
            t += n
        if t < max_tokens:  # pad tail = its own segment, so it attends only to itself
            position_ids[row, t:] = torch.arange(max_tokens - t)
    return dict(input_ids=input_ids, labels=labels, position_ids=position_ids)


def collate(items, processor, *, packing: bool, max_len: int) -> dict:
    """One micro-batch: packed rows (items are lists of examples: pack_collate) or right-padded examples
    (pad_collate), plus a VLM's image inputs in the order their tokens appear row by row."""
    pad_id = processor.tokenizer.pad_token_id
    batch = pack_collate(items, pad_id, max_len) if packing else pad_collate(items, pad_id)
    return batch | processor.image_inputs([e for pack in items for e in pack] if packing else items, batch["input_ids"])


@torch.no_grad()
def heldout_nll(model, items, processor, *, packing: bool, max_len: int, batch_size: int, impl: str, run) -> float:
    """Mean NLL of the labelled tokens of held-out rows (collate's items), over all ranks. Every rank runs as many
    forwards (FSDP2's collectives must pair up): a rank with nothing left runs a dummy row and ignores it."""
    model.eval()
    totals = {"nll": 0.0, "targets": 0.0}
    for b in range(math.ceil(len(items) / (batch_size * run.world_size))):
        chunk = items[(b * run.world_size + run.rank) * batch_size :][:batch_size]
        batch = to_device(collate(chunk or items[:1], processor, packing=packing, max_len=max_len), run.device)
        kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
        with run.autocast(model):
            token_logps = sequence_logprobs(model, batch["input_ids"], batch["labels"], impl=impl, **kwargs)
        if chunk:
            totals["nll"] -= token_logps.sum().item()
            totals["targets"] += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train()
    totals = all_reduce_sums(totals, run)
    return totals["nll"] / max(totals["targets"], 1.0)


def epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Deterministic shuffled batches of indices for one epoch (last partial batch kept); exact resume."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, "order"))
    order = torch.randperm(n_items, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n_items, batch_size)]
