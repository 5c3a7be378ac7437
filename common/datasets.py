"""The dataset shapes researchers arrive with, and the data flags every script shares (`load_data`, one call each).

Shapes: Hugging Face's standard dataset types (as TRL documents them), each plain text or conversational (message
lists), plus cleanpost's message+answer RL prompts. A script detects them from the first record's fields, by what it
takes (USES: a record fitting two shapes of one precedence group is an error naming the flag that settles it), and
every record must have the same shape:

    shape              fields                                sft.py   dpo.py      reward_model.py   grpo.py, ppo.py
    text               text                                  x (raw)
    messages           messages                              x                                      prompt: the chat
    message_answer     message (JSON messages), answer       x                                      x
    prompt_completion  prompt, completion                    x                                      prompt
    prompt             prompt                                                                       x
    preference         chosen, rejected (prompt optional)             x           x                 prompt
    unpaired           prompt, completion, label (bool)               x (kto)                       prompt
    (a chat's RL prompt is the chat minus its final assistant turn; sft.py takes a pair's chosen side by --columns)

Precedence: a record with chosen/rejected and messages (HuggingFaceH4/ultrafeedback_binarized) is a preference pair
for dpo.py and reward_model.py and its messages chat for sft.py; a `prompt` field is the RL prompt before anything else.
An `answer` field is the verifiers' reference (grpo.py, ppo.py) and the held-out accuracy's, whatever the shape.

The data flags (the same in every script): --dataset-split and --dataset-config pick a split and subset of a hub name
or a local `datasets` folder; --eval-split (another split of --dataset) or --eval-fraction (a seeded share of
--dataset's records) replace --eval-dataset; --columns new=old copies fields (new= drops one); --answer-regex reads
the reference out of `answer` (gsm8k's "...#### 72"). Image columns (`images`, or `image`) fill bare
{"type": "image"} parts in order (TRL's vision shape).
"""

from __future__ import annotations

import io
import os
import random
import re
from pathlib import Path

from common.data import (
    FILE_SUFFIXES,
    DataError,
    check_field,
    check_messages,
    image_paths,
    implicit_prompt,
    load_mixture,
    load_records,
    log,
    mixture_specs,
    parse_message_field,
    preference_parts,
    read_file,
)
from common.run import derive_seed

SHAPES = {  # shape: the fields that make it
    "messages": ("messages",),
    "preference": ("chosen", "rejected"),  # prompt explicit or implicit (common.data.preference_parts)
    "unpaired": ("prompt", "completion", "label"),
    "message_answer": ("message", "answer"),
    "prompt_completion": ("prompt", "completion"),  # without a label (with one it is unpaired)
    "text": ("text",),
    "prompt": ("prompt",),
}
USES = {  # what a script takes: groups of shapes by precedence; a record fitting two shapes of one group is ambiguous
    "any": [(shape,) for shape in SHAPES],
    "sft": [("text", "messages", "message_answer", "prompt_completion")],
    "pairs": [("preference", "unpaired")],
    "prompts": [("message_answer", "prompt"), ("messages",), ("preference",)],
}
NEEDS = {
    "sft": "text, messages, message+answer or prompt+completion records",
    "pairs": "preference records (chosen, rejected; prompt optional) or unpaired ones (prompt, completion, label)",
    "prompts": "prompt, message+answer, messages or chosen+rejected records",
}
ADVICE = {  # (use, the record's shape for any script): how to turn it into what the script takes
    ("sft", "preference"): "to train on the chosen side: --columns completion=chosen (messages=chosen for chats)",
    ("sft", "unpaired"): "it is KTO data for dpo.py --loss-type kto (--columns label= trains on every completion)",
    ("sft", "prompt"): "prompt-only records are for grpo.py and ppo.py (name a completion: --columns completion=NAME)",
    ("prompts", "text"): "raw text has no prompt",
}


# ------------------------------------------------------------------------------------------------ shapes
def _fits(keys, shape: str) -> bool:
    return all(f in keys for f in SHAPES[shape]) and not (shape == "prompt_completion" and "label" in keys)


def record_shape(record: dict, use: str = "any", script: str = "this script") -> str:
    """The shape of one record for a script's use (USES); DataError naming the record, its fields and the flag."""
    keys = sorted(k for k in record if not k.startswith("_"))
    where = record.get("_where", "?")
    for group in USES[use]:
        fits = [shape for shape in group if _fits(keys, shape)]
        if len(fits) > 1:
            drop = " or ".join(f"--columns {SHAPES[s][0]}=" for s in fits)
            raise DataError(f"{where}: ambiguous record for {script}: fields {keys} fit both {fits[0]} and {fits[1]}; "
                            f"drop the field not meant with {drop}")  # fmt: skip
        if fits:
            return fits[0]
    if use == "any":
        raise DataError(
            f"{where}: unknown record format, keys found: {keys}. Accepted formats: messages, preference (chosen, "
            "rejected, optional prompt), unpaired (prompt, completion, label), message_answer, prompt_completion, "
            "text, prompt; map other names with --columns new=old (e.g. --columns prompt=question)"
        )
    advice = next((ADVICE[use, s] for s in SHAPES if (use, s) in ADVICE and _fits(keys, s)), None)
    raise DataError(f"{where}: {script} needs {NEEDS[use]}, fields seen: {keys}; "
                    f"{advice or 'map yours with --columns new=old (e.g. --columns prompt=question)'}")  # fmt: skip


def _validate(record: dict, fmt: str) -> None:
    where = record["_where"]
    missing = [f for f in SHAPES[fmt] if f not in record]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r} (format {fmt!r} needs {', '.join(SHAPES[fmt])})")
    messages = []
    if fmt == "text" and not (isinstance(record["text"], str) and record["text"].strip()):
        raise DataError(f"{where}: text: expected a non-empty string, got {record['text']!r:.60}")
    if fmt == "messages":
        check_messages(record.get("messages"), where, "messages")
        messages = record["messages"]
    elif fmt == "message_answer":
        messages = parse_message_field(record)
        if not isinstance(record["answer"], (str, int, float)):
            raise DataError(f"{where}: answer: expected a string or number, got {type(record['answer']).__name__}")
    elif fmt == "preference":
        messages = [m for part in preference_parts(record) for m in part]
    elif fmt in ("prompt_completion", "unpaired", "prompt"):
        messages = [m for f in SHAPES[fmt] if f != "label" for m in check_field(record, f)]
    if fmt == "unpaired" and record["label"] not in (True, False):  # 0 and 1 compare equal to them
        raise DataError(
            f"{where}: label: expected true (desirable) or false (undesirable), got {record['label']!r:.40}"
        )
    image_paths(messages, record.get("_dir", "."), where=where)  # fail now, not deep inside a collator


def detect_format(records: list[dict], use: str = "any", script: str = "this script") -> str:
    """One of SHAPES, from the first record's fields and what the script takes (`use`, a key of USES); then every
    record is validated against it and must have the same shape. Logs the shape and the shape fields it ignores."""
    if not records:
        raise DataError("empty dataset (no records)")
    fmt = record_shape(records[0], use, script)
    for record in records:
        _validate(record, fmt)
        shape = record_shape(record, use, script)
        if shape != fmt:
            raise DataError(f"{record['_where']}: a {shape} record, but the first ({records[0]['_where']}) made the "
                            f"data {fmt}; drop or map fields with --columns so that every record has one shape")  # fmt: skip
    used = set(SHAPES[fmt]) | {"prompt", "answer"}  # the answer is the reference, whatever the shape
    ignored = sorted({f for fields in SHAPES.values() for f in fields} & set(records[0]) - used)
    implicit = sum(fmt == "preference" and implicit_prompt(r) for r in records)
    log(f"[data] format: {fmt} ({len(records)} records{f', {implicit} with an implicit prompt' if implicit else ''}"
        f"{'; ignored: ' + ', '.join(ignored) if ignored else ''})")  # fmt: skip
    return fmt


# ------------------------------------------------------------------------------- hub names, datasets folders
def _rows(dataset, name: str, base_dir: str) -> list[dict]:
    records = [{**row, "_where": f"{name}[{i}]", "_dir": base_dir} for i, row in enumerate(dataset)]
    if not records:
        raise DataError(f"{name}: empty dataset")
    return records


def read_hub(source: str, split: str | None, config: str | None) -> list[dict]:
    """Rows of a `datasets` hub name: split (default train) of subset `config`."""
    try:
        import datasets

        dataset = datasets.load_dataset(source, name=config, split=split or "train")
    except Exception as e:  # offline, unknown name, bad split...: all reported the same helpful way
        raise DataError(
            f"could not load {source!r} as a datasets hub name ({type(e).__name__}: {e}). Accepted sources: a "
            f".jsonl/.json/.parquet file, a folder of such files, or a hub dataset name (needs internet)"
        ) from None
    return _rows(dataset, f"{source}{f'/{config}' if config else ''}[{split or 'train'}]", os.getcwd())


def read_folder(path: Path, split: str | None, config: str | None) -> list[dict]:
    """A local `datasets` folder: its subfolder `config`, then a save_to_disk folder's split, or else the data files at
    any depth whose path names the split as datasets does (train.jsonl, train-00000-of-00001.parquet, data/train/...).
    The split defaults to train."""
    split = split or "train"
    if config:
        if not (path / config).is_dir():
            subsets = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise DataError(f"{path}: no subset {config!r} (--dataset-config) in this folder; subfolders: {subsets}")
        path = path / config
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        import datasets

        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DataError(f"{path}: no split {split!r}; it has {sorted(dataset)}")
            dataset = dataset[split]
        return _rows(dataset, f"{path}[{split}]", str(path))
    names = re.compile(rf"(^|[/._\-\d]){re.escape(split)}([/._\-\d]|$)")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts)
                   and names.search(str(p.relative_to(path))))  # fmt: skip
    if not files:
        raise DataError(f"{path}: no {'/'.join(FILE_SUFFIXES)} file names the split {split!r} (train.jsonl, "
                        f"{split}-00000-of-00001.parquet, data/{split}/...); pick one with --dataset-split")  # fmt: skip
    return [r for p in files for r in read_file(p)]


# ------------------------------------------------------------------------------- columns, answers, images
def parse_columns(spec: str | None) -> dict[str, str | None]:
    """--columns "prompt=question,completion=answer" -> {"prompt": "question", ...}; "text=" -> {"text": None}."""
    columns = {}
    for item in (spec or "").split(","):
        new, eq, old = (x.strip() for x in item.partition("="))
        if not item.strip():
            continue
        if not (eq and new):
            raise DataError(f"--columns {spec!r}: expected new=old pairs separated by commas (new= drops a field), "
                            f"got {item.strip()!r}")  # fmt: skip
        columns[new] = old or None
    return columns


def _image(value, where: str):
    """An image column's entry as a content part's image: a path (relative to the data file) or a PIL image; the
    {"bytes", "path"} structs that datasets writes to parquet are decoded."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        from PIL import Image

        return Image.open(io.BytesIO(value["bytes"]))
    value = value.get("path") if isinstance(value, dict) else value
    if isinstance(value, str) or hasattr(value, "convert"):  # a path or a PIL image
        return value
    raise DataError(f"{where}: images: expected paths, PIL images or {{'bytes', 'path'}} entries, got {value!r:.60}")


def _bare(part) -> bool:
    """An image part without its image (parquet gives every part every key: {"type": "image", "text": None})."""
    return isinstance(part, dict) and part.get("type") == "image" and part.get("image") is None


def _fill(messages: list[dict], images: list, k: int, where: str) -> tuple[list[dict], int]:
    """The messages with bare image parts given images[k], images[k+1], ... in order; and the next k."""
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(_bare(p) for p in content):
            parts = []
            for p in content:
                if _bare(p):
                    if k >= len(images):
                        raise DataError(f"{where}: more bare image parts than the {len(images)} images of the record")
                    p, k = {**p, "image": _image(images[k], where)}, k + 1
                parts.append(p)
            m = {**m, "content": parts}
        out.append(m)
    return out, k


def fill_images(record: dict) -> dict:
    """TRL's vision shape: bare {"type": "image"} parts take the record's `images` (or `image`) in order: the prompt's
    (or the chat's, or prompt then completion), and the same ones again in chosen and in rejected (two alternatives)."""
    key = "images" if "images" in record else "image"
    images, where = record.get(key), record.get("_where", "?")
    if images is None:
        return record
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    out, k = dict(record), 0
    for field in ("messages", "prompt", "completion"):
        if isinstance(record.get(field), list):
            out[field], k = _fill(record[field], images, k, where)
    ends = {k}
    for field in ("chosen", "rejected"):
        if isinstance(record.get(field), list):
            out[field], end = _fill(record[field], images, k, where)
            ends.add(end)
    if ends != {0} and ends != {len(images)}:
        raise DataError(f"{where}: {len(images)} images in `{key}` but {max(ends)} bare image parts to fill")
    if ends == {0} and key == "image":  # a flat record's image (captions, VQA), decoded if parquet holds its bytes
        out["image"] = _image(record["image"], where)
    return out


def prepare(records: list[dict], source: str, columns: dict, answer_regex: str | None) -> list[dict]:
    """The records of one source with --columns applied (copies, so the original field stays; new= drops a field),
    the reference answer read with --answer-regex, and bare image parts filled from the image column."""
    for new, old in columns.items():
        if old is not None and not any(old in r for r in records):
            fields = sorted(k for k in records[0] if not k.startswith("_"))
            raise DataError(f"{records[0]['_where']}: --columns {new}={old}: no record of {source} has a field {old!r} "
                            f"(fields: {fields})")  # fmt: skip
    pattern = re.compile(answer_regex) if answer_regex else None
    out = []
    for record in records:
        r = {k: v for k, v in record.items() if columns.get(k, k) is not None}
        r |= {new: record[old] for new, old in columns.items() if old is not None and old in record}
        if pattern is not None and "answer" in r:
            match = pattern.search(str(r["answer"]))
            if match is None:
                raise DataError(f"{r['_where']}: answer {str(r['answer'])[-60:]!r} does not match --answer-regex "
                                f"{answer_regex!r}")  # fmt: skip
            r["answer"] = (match.group(1) if pattern.groups else match.group(0)).strip()
        out.append(fill_images(r))
    return out


# ------------------------------------------------------------------------------------------- the one call
def hold_out(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(kept, held out): a seeded random `fraction` of the records held out (at least one, never all), order kept."""
    n = min(len(records) - 1, max(1, round(fraction * len(records))))
    held = set(random.Random(seed).sample(range(len(records)), n))
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def load_data(args, *, total=None, eval_total=None, with_eval=True) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records) of a script's data flags: args.dataset (a source or weighted mixture),
    dataset_split, dataset_config, columns, answer_regex, seed; the held-out ones from eval_split (that split of every
    source of --dataset), else eval_fraction (a seeded share of each source, taken out of training), else
    eval_dataset. `total`/`eval_total`: records to draw (common.data.load_mixture); with_eval=False: no held-out."""
    eval_split, fraction = getattr(args, "eval_split", None), getattr(args, "eval_fraction", 0.0)
    seed, columns, cache = getattr(args, "seed", 0), parse_columns(args.columns), {}
    if eval_split and fraction:
        raise DataError("--eval-split and --eval-fraction both pick the held-out records: give one of them")
    if not 0 <= fraction < 1:
        raise DataError(f"--eval-fraction must be in [0, 1), got {fraction}")
    split = args.dataset_split or ("train" if eval_split else None)  # a whole folder would hold the held-out split too

    def read(source, split=split, config=args.dataset_config, part=0):
        if (source, split, config) not in cache:  # read once: the training and held-out records of one draw
            records = prepare(load_records(source, split, config), source, columns, args.answer_regex)
            held_out_seed = derive_seed(seed, "held-out", source)
            cache[source, split, config] = (
                hold_out(records, fraction, held_out_seed) if fraction else (records, records)
            )
        return cache[source, split, config][part]

    records = load_mixture(args.dataset, seed=seed, total=total, read=read)
    if not with_eval:
        return records, []
    if eval_split or fraction:
        held_out = [r for source, _ in mixture_specs(args.dataset) for r in read(source, eval_split or split, part=1)]
        log(f"[data] held-out: {f'split {eval_split!r}' if eval_split else f'{fraction:.0%}'} of {args.dataset} "
            f"({len(held_out)} records; --eval-dataset unused)")  # fmt: skip
        return records, held_out
    if not getattr(args, "eval_dataset", None):
        return records, []
    # --eval-dataset: its own default split and subset, the same columns and answers
    read_eval = lambda source: prepare(load_records(source), source, columns, args.answer_regex)
    return records, load_mixture(args.eval_dataset, seed=seed, total=eval_total, read=read_eval)
