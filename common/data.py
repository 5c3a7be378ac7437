"""Reading and validating training data: files, folders, hub datasets, easy-vqa, weighted mixtures; record formats.

Every script reads data through this module, so every data problem surfaces here, early, as a `DataError`
that names the file and line (the record's `_where`) and what was expected. Tokenising, padding and packing the
records is common/chat.py's job.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

FORMATS = ("messages", "prompt_completion", "message_answer", "preference")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


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
        from common.easy_vqa import easy_vqa_records

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


def has_images(messages: list[dict]) -> bool:
    """Whether any message holds an image part."""
    return any(isinstance(m["content"], list) and any(p.get("type") in ("image", "image_url") for p in m["content"])
               for m in messages)  # fmt: skip


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
