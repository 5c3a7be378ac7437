"""Reading, validating, tokenising, padding and packing training data.

Every script reads data through this module, so every data problem surfaces here, early, as a `DataError`
that names the file and line (the record's `_where`) and what was expected.

Pipeline for SFT: load_records -> detect_format -> to_messages -> tokenize_chat (assistant-only labels)
-> pad_collate or pack_examples + pack_collate. Labels are *unshifted* (-100 = no loss); the scripts shift.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

FORMATS = ("messages", "prompt_completion", "message_answer", "preference")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
IGNORE = -100  # label value that contributes no loss (torch cross_entropy's default ignore_index)


def log(message: str) -> None:
    """Print once per job: under torchrun only rank 0 speaks."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


class DataError(ValueError):
    """Bad input data; the message names the file:line and what was expected."""


# ----------------------------------------------------------------------------------------------- loading
def _read_file(path: Path) -> list[dict]:
    records: list[dict] = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: malformed JSON ({e}); expected one JSON object per line"
                    ) from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
                records.append({**obj, "_where": f"{path}:{lineno}"})
    else:
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e})") from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(
                    f'{path}: expected a JSON list of records or {{"data": [...]}}, got {type(data).__name__}'
                )
        else:  # parquet
            import pyarrow.parquet as pq

            data = pq.read_table(path).to_pylist()
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DataError(f"{path}[{i}]: expected a JSON object (record), got {type(obj).__name__}")
            records.append({**obj, "_where": f"{path}[{i}]"})
    if not records:
        raise DataError(f"{path}: empty file (no records)")
    base_dir = str(path.parent)
    for r in records:
        r["_dir"] = base_dir  # relative image paths resolve against the data file's folder
    return records


def load_records(source: str, split: str | None = None) -> list[dict]:
    """Records from a .jsonl/.json/.parquet file, a folder of them, `easy-vqa:<kind>` (the bundled easy-VQA shapes
    set; kind: captions-train, captions-test, train, test, pairs-train or pairs-test) or a `datasets` hub name."""
    if source.startswith("easy-vqa:"):
        from common.vision import easy_vqa_records  # lazy: only the vision scripts need it (it checks the kind)

        return easy_vqa_records(source.split(":", 1)[1])
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise DataError(f"{source}: folder has no {'/'.join(FILE_SUFFIXES)} files")
        return [r for p in files for r in _read_file(p)]
    if path.is_file() and path.suffix not in FILE_SUFFIXES:
        raise DataError(f"{source}: unsupported file type {path.suffix!r}; expected {', '.join(FILE_SUFFIXES)}")
    if path.suffix in FILE_SUFFIXES or source.startswith(("/", "./", "../", "~")) or source.endswith("/"):
        if not path.exists():
            raise DataError(f"{source}: no such file or folder")
        return _read_file(path)
    try:
        import datasets

        dataset = datasets.load_dataset(source, split=split or "train")
    except Exception as e:  # offline, unknown name, bad split...: all reported the same helpful way
        raise DataError(
            f"could not load {source!r} as a datasets hub name ({type(e).__name__}: {e}). Accepted sources: a "
            f".jsonl/.json/.parquet file, a folder of such files, or a hub dataset name (needs internet)"
        ) from None
    records = [
        {**row, "_where": f"{source}[{split or 'train'}][{i}]", "_dir": os.getcwd()} for i, row in enumerate(dataset)
    ]
    if not records:
        raise DataError(f"{source}: empty dataset (split {split or 'train'!r})")
    return records


def parse_source_spec(spec: str) -> tuple[str, float | None]:
    """`source[:weight]` -> (source, weight or None). The text after the LAST colon is a weight only if it parses as a
    number (so `easy-vqa:train` is a source). DataError naming the spec for a weight <= 0 or not finite, and for a
    non-number after a file or easy-vqa source (`a.jsonl:x7` is a mistyped weight, not a file name)."""
    head, _, tail = spec.rpartition(":")
    try:
        weight = float(tail) if head else None
    except ValueError:
        if Path(head).suffix in FILE_SUFFIXES or head.startswith("easy-vqa:"):
            raise DataError(
                f"dataset {spec!r}: weight {tail!r} is not a number; expected source[:weight], weight > 0"
            ) from None
        weight = None
    if weight is not None and not 0 < weight < float("inf"):
        raise DataError(f"dataset {spec!r}: weight must be a positive number, got {tail!r}")
    return (spec, None) if weight is None else (head, weight)


def load_mixture(specs, seed: int = 0, total: int | None = None) -> list[dict]:
    """Records of `source[:weight]` specs (a sequence, or one comma-separated string), mixed by weight.

    No weights: the sources concatenated in order (one source: exactly load_records(source)). Weights (on all or none):
    `total` records (default: sum of source sizes) of which source i gives total * w_i / sum(w) (largest-remainder
    rounding): each of its records floor(n_i / size_i) times plus a seeded random subset for the rest, so a small source
    is upsampled and a big one subsampled; then shuffled with `seed`. Records keep `_where` (file:line in errors)."""
    if isinstance(specs, str):
        specs = [specs] if Path(specs).expanduser().exists() else specs.split(",")
    parsed = [parse_source_spec(s.strip()) for s in specs if s.strip()]
    weights = [w for _, w in parsed]
    if not parsed or len({w is None for w in weights}) > 1:
        raise DataError(f"datasets {list(specs)}: give at least one source, and a weight to every source or to none")
    sources = [load_records(source) for source, _ in parsed]
    if weights[0] is None and total is None:
        return [r for records in sources for r in records]
    sizes = [len(records) for records in sources]
    weights, total = (sizes if weights[0] is None else weights), (sum(sizes) if total is None else total)
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]  # floors; the largest remainders get the records still missing
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    rng, mixture = random.Random(seed), []
    for records, n in zip(sources, counts):
        mixture += [dict(r) for r in records * (n // len(records)) + rng.sample(records, n % len(records))]
    rng.shuffle(mixture)
    log("[data] mixture: " + ", ".join(f"{s} {n} ({n / len(r):.2f}x)" for (s, _), n, r in zip(parsed, counts, sources)))
    return mixture


# ------------------------------------------------------------------------------------ format detection
def _check_content(content, where: str, field: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise DataError(f"{where}: {field}: expected a string or a list of typed parts, got {type(content).__name__}")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        # a bare {"type": "image"} is fine: hub datasets keep the images themselves in a separate column
        ok = (
            (kind == "text" and isinstance(part.get("text"), str))
            or kind == "image"
            or (
                kind == "image_url"
                and isinstance(part.get("image_url"), dict)
                and isinstance(part["image_url"].get("url"), str)
            )
        )
        if not ok:
            raise DataError(
                f"{where}: {field}[{j}]: expected {{'type': 'text', 'text': str}}, {{'type': 'image', "
                f"'image': path}} or {{'type': 'image_url', 'image_url': {{'url': str}}}}, got {part!r:.120}"
            )


def _check_messages(messages, where: str, field: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: {field}: expected a non-empty list of {{'role', 'content'}} messages, got {messages!r:.80}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise DataError(f"{where}: {field}[{i}]: expected a message {{'role': str, 'content': ...}}, got {m!r:.80}")
        _check_content(m["content"], where, f"{field}[{i}].content")


def _parse_message_field(record: dict) -> list[dict]:
    where, value = record["_where"], record.get("message")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: message: expected a JSON string of a messages list, JSON error: {e}") from None
    _check_messages(value, where, "message")
    return value


REQUIRED_FIELDS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "message_answer": ("message", "answer"),
    "preference": ("prompt", "chosen", "rejected"),
}


def _validate(record: dict, fmt: str) -> None:
    where = record["_where"]
    missing = [f for f in REQUIRED_FIELDS[fmt] if f not in record]
    if missing:
        raise DataError(
            f"{where}: missing field {missing[0]!r} (format {fmt!r} needs {', '.join(REQUIRED_FIELDS[fmt])})"
        )
    if fmt == "messages":
        _check_messages(record.get("messages"), where, "messages")
        messages = record["messages"]
    elif fmt == "message_answer":
        messages = _parse_message_field(record)
        if not isinstance(record["answer"], (str, int, float)):
            raise DataError(f"{where}: answer: expected a string or number, got {type(record['answer']).__name__}")
    else:
        fields = ("prompt", "completion") if fmt == "prompt_completion" else ("prompt", "chosen", "rejected")
        for field in fields:
            if not isinstance(record[field], (str, list)):
                raise DataError(
                    f"{where}: {field}: expected a string or a list of messages, got {type(record[field]).__name__}"
                )
            if isinstance(record[field], list):
                _check_messages(record[field], where, field)
        messages = [m for f in fields if isinstance(record[f], list) for m in record[f]]
    image_paths(messages, record.get("_dir", "."), where=where)  # fail now, not deep inside a collator


def detect_format(records: list[dict]) -> str:
    """One of FORMATS, from the first record's keys; then every record is validated against it."""
    if not records:
        raise DataError("empty dataset (no records)")
    keys = sorted(k for k in records[0] if not k.startswith("_"))
    if "messages" in keys:
        fmt = "messages"
    elif "chosen" in keys and "rejected" in keys:
        fmt = "preference"
    elif "message" in keys and "answer" in keys:
        fmt = "message_answer"
    elif "prompt" in keys and "completion" in keys:
        fmt = "prompt_completion"
    else:
        raise DataError(
            f"{records[0].get('_where', '?')}: unknown record format, keys found: {keys}. Accepted formats: "
            "messages (messages: [{role, content}]), prompt_completion (prompt, completion), "
            "message_answer (message: JSON string of messages, answer), preference (prompt, chosen, rejected)"
        )
    for record in records:
        _validate(record, fmt)
    log(f"[data] format: {fmt} ({len(records)} records)")
    return fmt


# ------------------------------------------------------------------------------------- normalisation
def _as_messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def to_messages(record: dict, fmt: str) -> list[dict]:
    """A non-preference record as a chat [{"role", "content"}]; content parts (images) are kept."""
    if fmt == "messages":
        return list(record["messages"])
    if fmt == "prompt_completion":
        return _as_messages(record["prompt"], "user") + _as_messages(record["completion"], "assistant")
    if fmt == "message_answer":
        return _parse_message_field(record) + [{"role": "assistant", "content": str(record["answer"])}]
    raise DataError(
        f"{record.get('_where', '?')}: to_messages needs a non-preference format, got {fmt!r} "
        "(use preference_messages for chosen/rejected pairs)"
    )


def preference_messages(record: dict) -> tuple[list[dict], list[dict]]:
    """(prompt + chosen, prompt + rejected) chats of a preference record."""
    prompt = _as_messages(record["prompt"], "user")
    return prompt + _as_messages(record["chosen"], "assistant"), prompt + _as_messages(record["rejected"], "assistant")


def content_text(content) -> str:
    """Text of a message content: the string itself, or its text parts joined (image parts dropped)."""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content if part.get("type") == "text")


def image_paths(messages: list[dict], base_dir: str, *, where: str = "?") -> list[str]:
    """Local image files referenced by content parts (relative to base_dir); DataError if one is missing."""
    paths = []
    for m in messages:
        for part in m["content"] if isinstance(m["content"], list) else []:
            ref = part.get("image") if part.get("type") == "image" else (part.get("image_url") or {}).get("url")
            if not isinstance(ref, str) or ref.startswith(("http://", "https://", "data:")):
                continue  # in-memory images (hub datasets), URLs and inline base64 are not local files
            path = Path(base_dir, ref.removeprefix("file://")).expanduser()
            if not path.is_file():
                raise DataError(f"{where}: image not found: {ref!r} (resolved to {path})")
            paths.append(str(path))
    return paths


# -------------------------------------------------------------------------------------- tokenisation
_warned_unstable: set[str] = set()


def _assistant_spans(messages: list[dict], tokenizer, full: str) -> list[tuple[int, int]]:
    """Character spans of every assistant turn (content + end-of-turn token) inside the rendered `full` text."""

    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

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


def tokenize_chat(messages: list[dict], tokenizer, *, max_len: int, overlong: str = "truncate") -> dict | None:
    """{"input_ids", "labels", "truncated"} with labels = input_ids on assistant-turn tokens only, -100 elsewhere.

    Over-long chats keep their first max_len tokens (overlong="truncate") or give None (overlong="drop").
    """
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')} has no chat template; use an instruct model's tokenizer"
        )
    text_messages = [{"role": m["role"], "content": content_text(m["content"])} for m in messages]
    full = tokenizer.apply_chat_template(text_messages, tokenize=False)
    spans = _assistant_spans(text_messages, tokenizer, full)
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


def build_sft_examples(
    source,
    tokenizer,
    *,
    max_len: int,
    overlong: str = "truncate",
    split: str | None = None,
    processor=None,
    name: str | None = None,
) -> tuple[list[dict], dict]:
    """load -> detect -> to_messages -> tokenize_chat; returns (examples, stats). `source`: a load_records source, or
    records already loaded (load_mixture), called `name` in messages. A VLM `processor` (common.vision) tokenises
    instead of tokenize_chat: its examples also carry their images, and image tokens count toward max_len."""
    records = load_records(source, split) if isinstance(source, str) else source
    source = source if isinstance(source, str) else name or "dataset"
    fmt = detect_format(records)
    if fmt == "preference":
        raise DataError(
            f"{source}: preference data (prompt/chosen/rejected) is for dpo.py; SFT needs "
            "messages, prompt_completion or message_answer records"
        )
    examples, n_truncated, n_dropped, n_no_target = [], 0, 0, 0
    for record in records:
        messages = to_messages(record, fmt)
        example = (
            tokenize_chat(messages, tokenizer, max_len=max_len, overlong=overlong)
            if processor is None
            else processor(messages, base_dir=record.get("_dir", "."), max_len=max_len, overlong=overlong)
        )
        if example is None:
            n_dropped += 1
            continue
        if all(label == IGNORE for label in example["labels"]):
            n_no_target += 1  # nothing to learn (no assistant turn, or it was cut off by truncation)
            continue
        n_truncated += example.pop("truncated")
        examples.append(example)
    stats = dict(
        format=fmt,
        n_records=len(records),
        n_examples=len(examples),
        n_truncated=n_truncated,
        n_dropped=n_dropped,
        n_no_target=n_no_target,
        n_tokens=sum(len(e["input_ids"]) for e in examples),
        n_target_tokens=sum(sum(label != IGNORE for label in e["labels"]) for e in examples),
    )
    log(
        f"[data] {source}: {fmt}, {len(records)} records -> {len(examples)} examples, {stats['n_tokens']} tokens "
        f"({stats['n_target_tokens']} targets); {n_truncated} truncated, {n_dropped} dropped as over-long, "
        f"{n_no_target} without assistant tokens"
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

    No attention_mask on purpose: transformers then derives the block-diagonal mask from position_ids
    (call the model with use_cache=False). cu_seqlens/max_seqlen describe the same segments for flash-attn varlen.
    """
    B = len(packs_of_examples)
    input_ids = torch.full((B, max_tokens), pad_id, dtype=torch.long)  # [B, max_tokens]
    labels = torch.full((B, max_tokens), IGNORE, dtype=torch.long)  # [B, max_tokens]
    position_ids = torch.zeros((B, max_tokens), dtype=torch.long)  # [B, max_tokens]
    seqlens = []
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
            seqlens.append(n)
            t += n
        if t < max_tokens:  # pad tail = its own segment, so it attends only to itself
            position_ids[row, t:] = torch.arange(max_tokens - t)
            seqlens.append(max_tokens - t)
    cu_seqlens = torch.zeros(len(seqlens) + 1, dtype=torch.int32)  # [n_segments + 1]
    cu_seqlens[1:] = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
    return dict(
        input_ids=input_ids, labels=labels, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max(seqlens)
    )


def epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Deterministic shuffled batches of indices for one epoch (last partial batch kept); exact resume."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_items, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n_items, batch_size)]
