"""eval_vqa.py: visual question answering accuracy of a vision-language model, in one file.

Every question gets one greedy (or beam-search) answer, scored against its reference answers; a metric's result is

    metric(dataset) = mean over questions of metric(prediction, reference answers)

Launch:
    python eval_vqa.py --model-path runs/vqa_sft/model       # one CPU: 1000 of the 9673 easy-vqa test questions
    python eval_vqa.py --model-path runs/vqa_sft/model --max-samples 0 --batch-size 64   # one GPU (picked up): all
    torchrun --nproc_per_node=8 eval_vqa.py --model-path my-qwen2-vl-folder --dataset vqa.jsonl --max-samples 0
                                                             # N GPUs: rank r answers questions r, r+N, ...; rank 0 writes
    python eval_vqa.py --dataset charts.jsonl --metrics relaxed_correctness anls --prompt-suffix " Answer with one word."

The model is a folder written by save_vlm (pretrain_captioner.py, sft.py: encoder + projector + LM) or a native Hugging
Face image-text-to-text folder (Qwen2-VL / Qwen2.5-VL tested); both load through common.vision.load_vlm.

Data (`--dataset`): `easy-vqa:test` (bundled), or .jsonl/.json/.parquet records, either chats
    {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Q?"}]},
                  {"role": "assistant", "content": "A"}], "answer": "A"}        (the assistant turn is dropped)
or flat  {"image": "a.png", "question": "Q?", "answers": ["A", ...]}  ("answer": "A" for one reference answer).
Image paths are relative to the data file. Multiple choice: "options": [...] and "answer_index": k; a flat record's
options are listed under its question as "A. ...", "B. ...".

Metrics (`--metrics`; implemented and cited in common/metrics.py):
    vqa_score            VQA v2 accuracy (Antol et al. 2015, official vqaEval.py): min(1, #annotators agreeing / 3),
                         averaged over leave-one-annotator-out subsets; with one reference answer, exact match
    exact_match          the VQA-normalised prediction equals one of the normalised reference answers
    anls                 DocVQA's Average Normalized Levenshtein Similarity (Biten et al. 2019), threshold 0.5
    relaxed_correctness  ChartQA relaxed accuracy (Masry et al. 2022): numbers within 5% relative error, else exact
    counting_accuracy    the first number in the prediction equals the (majority) answer (CountBench / TallyQA style)
    mc_accuracy          the option the answer picks (by letter or text, MMBench-style) is the right one; added
                         automatically when every record has options and answer_index
The table splits each metric by answer type (yes/no, number, other: VQA v2's split, or the records' "answer_type") and
by question type (the records' "question_type"; for easy-vqa: yes/no, color, shape).

Writes <output-dir>/predictions.jsonl (one row per question: question, answers, prediction, scores, image) and
<output-dir>/metrics.json (the means: overall and per type).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from common.chat import encode
from common.cli import cli
from common.data import DataError, content_text
from common.datasets import load_data
from common.metrics import answer_type, easy_vqa_question_type, format_table, score, summarise
from common.rollout import generate
from common.run import RunLogger, finish, setup
from common.vision import CONFIG_FILE, is_vlm, load_vlm

MetricName = Literal["vqa_score", "exact_match", "anls", "relaxed_correctness", "counting_accuracy", "mc_accuracy"]


@dataclass
class Args:
    model_path: str = "runs/vqa_sft/model"
    """VLM folder: written by save_vlm (pretrain_captioner.py, sft.py) or a native Hugging Face VLM (Qwen2-VL, ...)"""
    dataset: str = "easy-vqa:test"
    """questions: easy-vqa:test, or a .jsonl/.json/.parquet file of chat or {image, question, answers} records; several
    sources (--dataset a.jsonl --dataset b.jsonl) are evaluated together"""
    dataset_split: str | None = None
    """split of a hub dataset or of a local `datasets` folder (default: train); a file has none"""
    dataset_config: str | None = None
    """subset (config) of a hub dataset; of a local folder: its subfolder of that name"""
    columns: str | None = None
    """field names to map, new=old comma-separated (e.g. prompt=question,completion=answer; copies; new= drops one)"""
    answer_regex: str | None = None
    """the reference answer is the first group of this regex in the `answer` field (gsm8k: '#### (.*)')"""
    output_dir: str = "runs/eval_vqa"
    """predictions.jsonl and metrics.json go here"""
    config: str | None = None
    """a .yaml or .json file of field: value defaults; command-line flags override them"""
    metrics: tuple[MetricName, ...] = ("vqa_score", "exact_match")
    """answer metrics from common/metrics.py (mc_accuracy is added when every record has options and answer_index)"""
    max_samples: int = 1000
    """questions to answer, evenly spaced over the dataset; 0 answers all (1000 of easy-vqa's 9673: minutes on CPU)"""
    batch_size: int = 32
    """questions per generate call per process"""
    max_new_tokens: int = 10
    """generation budget per answer (VQA answers are a word or three)"""
    num_beams: int = 1
    """1: greedy decoding; > 1: beam search with this many beams"""
    prompt_suffix: str = ""
    """text appended to every question, e.g. ' Answer with one word.'"""
    dtype: str = "auto"
    """compute dtype under autocast: auto (bf16 where the hardware has it, CPU included), float32 or bfloat16"""
    track: bool = False
    """log the overall metrics to Weights & Biases (offline mode when no account is configured)"""


def add_suffix(message: dict, suffix: str) -> dict:
    """A copy of a user message with `suffix` appended to its last text part (a new text part if it has none)."""
    parts = (
        [{"type": "text", "text": message["content"]}]
        if isinstance(message["content"], str)
        else list(message["content"])
    )
    texts = [i for i, p in enumerate(parts) if p.get("type") == "text"]
    if texts:
        parts[texts[-1]] = {**parts[texts[-1]], "text": parts[texts[-1]]["text"] + suffix}
    else:
        parts.append({"type": "text", "text": suffix.strip()})
    return {**message, "content": parts}


def first_image_path(messages: list[dict], base_dir: str) -> str | None:
    """The first image part's file (resolved against base_dir), for the predictions file; None for in-memory images."""
    for m in messages:
        for p in m["content"] if isinstance(m["content"], list) else []:
            ref = p.get("image") if p.get("type") == "image" else (p.get("image_url") or {}).get("url")
            if p.get("type") in ("image", "image_url"):
                return (
                    str(Path(base_dir, ref)) if isinstance(ref, str) and not ref.startswith(("data:", "http")) else None
                )
    return None


def normalise_record(record: dict, prompt_suffix: str = "") -> dict:
    """A chat or flat VQA record as {"messages" (the prompt: user turns, image parts kept, suffix added), "question",
    "answers", "image", "answer_type", optional "question_type" / "options" / "answer_index", "_dir", "_where"}."""
    where, reference = record.get("_where", "?"), None
    if "messages" in record:
        messages = record["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and "content" in m for m in messages)
        ):
            raise DataError(f"{where}: messages: expected a non-empty list of {{role, content}} messages")
        if messages[-1].get("role") == "assistant":  # the reference answer, not part of the prompt
            messages, reference = messages[:-1], content_text(messages[-1]["content"])
    elif "image" in record and "question" in record:
        question = str(record["question"])
        if "options" in record:  # multiple choice: list the options the answer is matched against
            question += "".join(f"\n{chr(65 + i)}. {o}" for i, o in enumerate(record["options"]))
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": record["image"]}, {"type": "text", "text": question}],
            }
        ]
    else:
        raise DataError(
            f"{where}: expected a chat record (messages) or a flat one (image, question, answers); "
            f"got fields {', '.join(k for k in record if not k.startswith('_')) or 'none'}"
        )
    if "options" in record and "answer_index" in record:
        options, index = record["options"], record["answer_index"]
        if not isinstance(options, list) or not isinstance(index, int) or not 0 <= index < len(options):
            raise DataError(f"{where}: answer_index: expected an index into the options list, got {index!r}")
        reference = str(options[index])  # the right option's text is the reference answer of the other metrics
    answers = record.get("answers", record.get("answer", reference))
    answers = [str(answers)] if isinstance(answers, (str, int, float)) else answers
    if not answers or not isinstance(answers, list):
        raise DataError(
            f'{where}: answers: expected a reference answer (answers: [...], answer: "..." or a final '
            f"assistant turn), got {answers!r:.80}"
        )
    answers = [str(a) for a in answers]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise DataError(f"{where}: messages: no user turn to hold the question")
    messages = list(messages)
    question = content_text(messages[users[-1]]["content"])
    if prompt_suffix:
        messages[users[-1]] = add_suffix(messages[users[-1]], prompt_suffix)
    base_dir = record.get("_dir", ".")
    out = {
        "messages": messages,
        "question": question,
        "answers": answers,
        "image": first_image_path(messages, base_dir),
        "answer_type": record.get("answer_type") or answer_type(answers),
        "_dir": base_dir,
        "_where": where,
    }
    if "question_type" in record:
        out["question_type"] = record["question_type"]
    elif where.startswith("easy-vqa:"):
        out["question_type"] = easy_vqa_question_type(answers[0])
    if "options" in record and "answer_index" in record:
        out["options"], out["answer_index"] = [str(o) for o in record["options"]], record["answer_index"]
    return out


def check_model_path(path: str) -> Path:
    """The folder load_vlm will read, or SystemExit with one line saying what is wrong with it."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SystemExit(
            f"error: model folder '{path}' does not exist; expected a VLM folder written by save_vlm "
            f"(pretrain_captioner.py, sft.py) or a local native Hugging Face VLM folder"
        )
    if not is_vlm(folder):
        config = folder / "config.json"
        found = (
            f"config.json says model_type {json.loads(config.read_text()).get('model_type')!r}, a text-only model"
            if config.exists()
            else f"no {CONFIG_FILE} and no config.json"
        )
        raise SystemExit(
            f"error: '{path}' is not a vision-language model ({found}); pass a folder written by "
            f"save_vlm or a native image-text-to-text model (Qwen2-VL, ...)"
        )
    return folder


@torch.no_grad()
def answer_batch(model, processor, chunk, args, run) -> list[str]:
    """Greedy / beam answers to a batch of normalised records."""
    prompts = [encode(processor, r["messages"], r, add_generation_prompt=True) for r in chunk]
    with run.autocast(model):
        completions, _, _ = generate(model, processor, prompts, max_new_tokens=args.max_new_tokens, greedy=True,
                                     num_beams=args.num_beams)  # fmt: skip
    return [t.strip() for t in processor.tokenizer.batch_decode(completions, skip_special_tokens=True)]


def main(args: Args):
    if args.num_beams < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise SystemExit("error: --num-beams, --batch-size and --max-new-tokens must be at least 1")
    run = setup(0, args.dtype)

    # ---- data: an evenly spaced subset, normalised; each rank takes every world_size-th question ----
    model_dir = check_model_path(args.model_path)
    records, _ = load_data(args, with_eval=False)
    if 0 < args.max_samples < len(records):
        records = [records[i * len(records) // args.max_samples] for i in range(args.max_samples)]
    records = [normalise_record(r, args.prompt_suffix) for r in records]
    metrics = list(dict.fromkeys(args.metrics))
    not_mc = next((r for r in records if "options" not in r), None)
    if "mc_accuracy" in metrics and not_mc:
        raise DataError(f"{not_mc['_where']}: mc_accuracy needs options and answer_index in every record")
    if not not_mc and "mc_accuracy" not in metrics:
        metrics.append("mc_accuracy")
    mine = list(range(run.rank, len(records), run.world_size))
    run.print(f"[plan] model {args.model_path} | {len(records)} questions from {args.dataset} | metrics "
              f"{', '.join(metrics)} | {'greedy' if args.num_beams == 1 else f'beam search x{args.num_beams}'}, <= "
              f"{args.max_new_tokens} new tokens | world size {run.world_size} | {run.device} {run.dtype}")  # fmt: skip

    # ---- answer this rank's share, then gather every rank's rows ----
    model, processor = load_vlm(model_dir, device=run.device)
    rows, t0 = [], time.time()
    for lo in tqdm(range(0, len(mine), args.batch_size), desc="eval_vqa", disable=not run.main, dynamic_ncols=True):
        chunk = [records[i] for i in mine[lo : lo + args.batch_size]]
        for i, r, prediction in zip(
            mine[lo : lo + args.batch_size], chunk, answer_batch(model, processor, chunk, args, run)
        ):
            row = {"index": i, "question": r["question"], "answers": r["answers"], "prediction": prediction,
                   "scores": {m: score(m, prediction, r) for m in metrics}, "image": r["image"],
                   "answer_type": r["answer_type"], "where": r["_where"]}  # fmt: skip
            rows.append(row | {k: r[k] for k in ("question_type", "options", "answer_index") if k in r})
    if dist.is_initialized():
        gathered = [None] * run.world_size
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    rows.sort(key=lambda row: row["index"])
    seconds = time.time() - t0

    # ---- rank 0 writes predictions, metrics and the table ----
    summary = {**summarise(rows, metrics), "model_path": args.model_path, "dataset": args.dataset}
    out = Path(args.output_dir)
    logger = RunLogger(out, asdict(args), run, track=args.track)
    logger.log({f"eval/{m}": v for m, v in summary["overall"].items() if m != "n"}, step=0)
    if run.main:
        with open(out / "predictions.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    run.print(format_table(summary, metrics))
    run.print(f"[done] {len(rows)} questions in {seconds:.1f} s ({len(rows) / max(seconds, 1e-9):.1f}/s over "
              f"{run.world_size} process{'es' if run.world_size > 1 else ''}) -> {out / 'predictions.jsonl'}, "
              f"{out / 'metrics.json'}")  # fmt: skip
    return finish(run, logger, summary)


if __name__ == "__main__":
    main(cli(Args))
