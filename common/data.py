"""Reading training data: files, folders, easy-vqa, weighted mixtures; chat messages: validation, the chats of each
record shape (to_messages, prompt_messages, preference_parts), images. Which shape a dataset has, hub names and
`datasets` folders with splits and subsets, and the data flags every script shares: common/datasets.py.

Every script reads data through these two modules, so every data problem surfaces here, early, as a `DataError`
that names the file and line (the record's `_where`) and what was expected. Tokenising, padding and packing the
records is common/chat.py's job.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def log(message: str) -> None:
    """Print once per job: under torchrun only rank 0 speaks."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


class DataError(ValueError):
    """Bad input data; the message names the file:line and what was expected."""


# ----------------------------------------------------------------------------------------------- loading
def read_file(path: Path) -> list[dict]:
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


def load_records(source: str, split: str | None = None, config: str | None = None) -> list[dict]:
    """Records from a .jsonl/.json/.parquet file, a folder of them, `easy-vqa:<kind>` (the bundled easy-VQA shapes
    set; kind: captions-train, captions-test, train, test, pairs-train or pairs-test) or a `datasets` hub name. A split
    or config (subset) reads a hub name or a local `datasets` folder (common/datasets.py); a file has neither."""
    if source.startswith("easy-vqa:"):
        from common.easy_vqa import easy_vqa_records

        if split or config:
            raise DataError(f"{source}: an easy-vqa kind names its own split; --dataset-split, --dataset-config and "
                            "--eval-split are for hub names and folders")  # fmt: skip
        return easy_vqa_records(source.split(":", 1)[1])
    path = Path(source).expanduser()
    if path.is_dir() and not (split or config) and not _saved_dataset(path):
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise DataError(f"{source}: folder has no {'/'.join(FILE_SUFFIXES)} files")
        return [r for p in files for r in read_file(p)]
    if path.is_file() and path.suffix not in FILE_SUFFIXES:
        raise DataError(f"{source}: unsupported file type {path.suffix!r}; expected {', '.join(FILE_SUFFIXES)}")
    local = path.suffix in FILE_SUFFIXES or source.startswith(("/", "./", "../", "~")) or source.endswith("/")
    if not path.is_dir() and local:
        if not path.exists():
            raise DataError(f"{source}: no such file or folder")
        if split or config:
            raise DataError(f"{source} is one file, without splits or subsets: --dataset-split, --dataset-config and "
                            "--eval-split are for hub names and folders (hold out with --eval-fraction)")  # fmt: skip
        return read_file(path)
    from common.datasets import read_folder, read_hub

    return read_folder(path, split, config) if path.is_dir() else read_hub(source, split, config)


def _saved_dataset(path: Path) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


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


def mixture_specs(specs) -> list[tuple[str, float | None]]:
    """(source, weight or None) of each `source[:weight]` of a mixture: a sequence, or one comma-separated string."""
    if isinstance(specs, str):
        specs = [specs] if Path(specs).expanduser().exists() else specs.split(",")
    return [parse_source_spec(s.strip()) for s in specs if s.strip()]


def load_mixture(specs, seed: int = 0, total: int | None = None, read=load_records) -> list[dict]:
    """Records of `source[:weight]` specs (a sequence, or one comma-separated string), mixed by weight.

    No weights: the sources concatenated in order (one source: exactly load_records(source)). Weights (on all or none):
    `total` records (default: sum of source sizes) of which source i gives total * w_i / sum(w) (largest-remainder
    rounding): each of its records floor(n_i / size_i) times plus a seeded random subset for the rest, so a small source
    is upsampled and a big one subsampled; then shuffled with `seed`. Records keep `_where` (file:line in errors).
    `read(source)` reads one source (common/datasets.py passes one that applies the split and column flags)."""
    parsed = mixture_specs(specs)
    weights = [w for _, w in parsed]
    if not parsed or len({w is None for w in weights}) > 1:
        raise DataError(f"datasets {list(specs)}: give at least one source, and a weight to every source or to none")
    sources = [read(source) for source, _ in parsed]
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
        # a bare {"type": "image"} is filled from the record's `images` column (common/datasets.py), else refused later
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


def check_messages(messages, where: str, field: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: {field}: expected a non-empty list of {{'role', 'content'}} messages, got {messages!r:.80}"
        )
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or ("content" not in m and not calls):
            raise DataError(f"{where}: {field}[{i}]: expected a message {{'role': str, 'content': ...}}, got {m!r:.80}")
        for call in calls or ():  # OpenAI's {"type": "function", "function": {name, arguments}} or {name, arguments}
            function = call.get("function", call) if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise DataError(f"{where}: {field}[{i}].tool_calls: expected {{'function': {{'name': str, "
                                f"'arguments': ...}}}} per call, got {call!r:.80}")  # fmt: skip
        if not (calls and m.get("content") is None):  # a tool-call turn may have no content
            _check_content(m["content"], where, f"{field}[{i}].content")


def parse_message_field(record: dict) -> list[dict]:
    where, value = record["_where"], record.get("message")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: message: expected a JSON string of a messages list, JSON error: {e}") from None
    check_messages(value, where, "message")
    return value


def check_field(record: dict, field: str) -> list[dict]:
    value = record[field]
    if not isinstance(value, (str, list)):
        raise DataError(
            f"{record['_where']}: {field}: expected a string or a list of messages, got {type(value).__name__}"
        )
    if isinstance(value, list):
        check_messages(value, record["_where"], field)
    return value if isinstance(value, list) else []


# ------------------------------------------------------------------------------------- normalisation
def _as_messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def to_messages(record: dict, fmt: str) -> list[dict]:
    """A non-preference record as a chat [{"role", "content"}]; content parts (images) are kept."""
    if fmt == "messages":
        return list(record["messages"])
    if fmt in ("prompt_completion", "unpaired", "prompt"):
        completion = _as_messages(record["completion"], "assistant") if fmt != "prompt" else []
        return _as_messages(record["prompt"], "user") + completion
    if fmt == "message_answer":
        return parse_message_field(record) + [{"role": "assistant", "content": str(record["answer"])}]
    raise DataError(
        f"{record.get('_where', '?')}: to_messages needs a non-preference chat format, got {fmt!r} "
        "(use preference_parts for chosen/rejected pairs; text records are not chats)"
    )


def prompt_messages(record: dict, fmt: str) -> list[dict]:
    """The prompt of a record: a preference record's (explicit or implicit), else its chat minus the final assistant
    turn(s)."""
    messages = preference_parts(record)[0] if fmt == "preference" else to_messages(record, fmt)
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return messages


def implicit_prompt(record: dict) -> bool:
    """Whether a preference record's prompt is implicit: no prompt field, or a plain-text one beside chats (the shape of
    HuggingFaceH4/ultrafeedback_binarized, whose chosen/rejected repeat the prompt turn: TRL's maybe_extract_prompt)."""
    return "prompt" not in record or (isinstance(record["prompt"], str) and isinstance(record["chosen"], list))


def preference_parts(record: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen answer, rejected answer) message lists of a preference record. An implicit prompt is the longest
    common prefix of chosen and rejected: of their turns for chats; of their characters for plain text, moved back to
    a word start."""
    for field in ("prompt", "chosen", "rejected") if "prompt" in record else ("chosen", "rejected"):
        check_field(record, field)
    chosen, rejected, where = record["chosen"], record["rejected"], record.get("_where", "?")
    if not implicit_prompt(record):
        prompt = _as_messages(record["prompt"], "user")
        return prompt, _as_messages(chosen, "assistant"), _as_messages(rejected, "assistant")
    if type(chosen) is not type(rejected):
        raise DataError(f"{where}: implicit prompt: chosen and rejected must both be text or both chats")
    n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if isinstance(chosen, str) and chosen[n - 1 : n].isalnum() and (chosen[n : n + 1] + rejected[n : n + 1]).isalnum():
        n -= len(re.search(r"\w*$", chosen[:n]).group())  # don't cut a word in two between prompt and answer
    if n == 0 or n == len(chosen) or n == len(rejected):
        problem = "share no beginning" if n == 0 else "leave no answer after their common beginning"
        raise DataError(f"{where}: implicit prompt: chosen and rejected {problem}; give the prompt as a field "
                        "(--columns prompt=NAME)")  # fmt: skip
    if isinstance(chosen, str):
        prompt = [{"role": "user", "content": chosen[:n].rstrip()}]
        return prompt, _as_messages(chosen[n:], "assistant"), _as_messages(rejected[n:], "assistant")
    return chosen[:n], chosen[n:], rejected[n:]


def preference_messages(record: dict) -> tuple[list[dict], list[dict]]:
    """(prompt + chosen, prompt + rejected) chats of a preference record."""
    prompt, chosen, rejected = preference_parts(record)
    return prompt + chosen, prompt + rejected


def content_text(content) -> str:
    """Text of a message content: the string itself, or its text parts joined (image parts dropped); None (a tool-call
    turn without text) is empty."""
    if isinstance(content, str) or content is None:
        return content or ""
    return "\n".join(part["text"] for part in content if part.get("type") == "text")


def has_images(messages: list[dict]) -> bool:
    """Whether any message holds an image part."""
    return any(isinstance(m.get("content"), list) and any(p.get("type") in ("image", "image_url") for p in m["content"])
               for m in messages)  # fmt: skip


def image_paths(messages: list[dict], base_dir: str, *, where: str = "?") -> list[str]:
    """Local image files referenced by content parts (relative to base_dir); DataError if one is missing, or if a
    bare image part was left without an image (no `images` column to fill it from)."""
    paths = []
    for m in messages:
        for part in m.get("content") if isinstance(m.get("content"), list) else []:
            if part.get("type") not in ("image", "image_url"):
                continue
            ref = part.get("image") if part["type"] == "image" else part["image_url"]["url"]
            if ref is None:
                raise DataError(f"{where}: a bare image part {{'type': 'image'}} but no image for it: give the "
                                "images in an `images` column (or `image`), in the order of the parts")  # fmt: skip
            if not isinstance(ref, str) or ref.startswith(("http://", "https://", "data:")):
                continue  # in-memory images (hub datasets), URLs and inline base64 are not local files
            path = Path(base_dir, ref.removeprefix("file://")).expanduser()
            if not path.is_file():
                raise DataError(f"{where}: image not found: {ref!r} (resolved to {path})")
            paths.append(str(path))
    return paths
