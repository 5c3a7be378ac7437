"""RL training pass with token-budget micro-batches vs padded micro-batches: response tokens trained per second on
completions of skewed lengths, side by side in one run.

    python bench/rl_packing.py                                 # SmolLM2-135M, ~4 min on 2 CPU cores (float32)
    python bench/rl_packing.py --model tiny --repeats 5        # the tiny random-init model, seconds

What is timed is grpo.py's and ppo.py's policy-gradient pass exactly as they run it: common/rollout.micro_batches over
a mini-batch sorted by length, token_logps, a token-mean policy-gradient loss, backward. The batch: the bundled
arithmetic prompts, `--group-size` completions each, with lognormal lengths (median `--median-len` tokens, clipped to
[4, `--max-len`]: most completions short, a few long, as RL completions are). Arms:
  arrival: `--micro-batch-size` rows per forward/backward in rollout order, padded to their longest (grpo.py before
           the token budget: one long completion makes its whole micro-batch pay)
  padded: the same, the mini-batch sorted by length first (grpo.py's default now: neighbours are alike)
  packed: `--max-tokens-per-micro-batch` real tokens per forward/backward, packed into one row with restarting
          position_ids (grpo.py --max-tokens-per-micro-batch)
The arms alternate, repeat by repeat, so all see the same machine; the first repeat of each is a warm-up. Prints
tokens/s of each arm, the ratios packed/padded and packed/arrival, and each pass's loss (they agree).
"""

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.models import load_model, load_processor, load_tokenizer, tiny_model  # noqa: E402
from common.rollout import build_batch, micro_batches, token_logps  # noqa: E402
from common.run import Run, pick_dtype  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="an alias, a folder, or `tiny` (random init)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--median-len", type=int, default=48)
    parser.add_argument("--max-len", type=int, default=384)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-tokens-per-micro-batch", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model == "tiny":
        model, folder = tiny_model("smollm2-135m", hidden_size=256, num_layers=4, intermediate_size=512), "/tmp/tiny"
        model.save_pretrained(folder)
        load_tokenizer("smollm2-135m").save_pretrained(folder)
    else:
        folder = args.model
    processor, model = load_processor(folder), load_model(folder)
    run = Run(0, 1, torch.device("cpu"), pick_dtype(args.dtype, "cpu"))
    records = [json.loads(line) for line in open("data/arith/train.jsonl")][: args.prompts]
    prompts = [
        processor(r["messages"][:1], add_generation_prompt=True) for r in records for _ in range(args.group_size)
    ]
    rng = random.Random(0)
    lengths = [int(min(max(rng.lognormvariate(math.log(args.median_len), 1.0), 4), args.max_len)) for _ in prompts]
    completions = [[rng.randrange(100, 40000) for _ in range(n)] for n in lengths]
    batch = build_batch([p["input_ids"] for p in prompts], completions, processor.tokenizer.pad_token_id)
    advantages = torch.randn(len(prompts), generator=torch.Generator().manual_seed(0))[:, None] * batch["response_mask"]
    by_length = torch.argsort(batch["attention_mask"].sum(1))
    n_tokens = int(batch["response_mask"].sum())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every repeat trains the same weights

    def training_pass(order, max_tokens):
        t0, total, passes = time.perf_counter(), 0.0, 0
        for idx, mb, images in micro_batches(batch, order, prompts, processor, run,
                                             size=args.micro_batch_size, max_tokens=max_tokens):  # fmt: skip
            width = mb["input_ids"].shape[1]
            with run.autocast(model):
                logps = token_logps(model, mb, images)
            loss = -(logps.float() * advantages[idx, :width] * mb["response_mask"]).sum() / n_tokens
            loss.backward()
            total, passes = total + loss.item(), passes + 1
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - t0, total, passes

    print(f"model {args.model} ({run.dtype}); {len(prompts)} completions, {n_tokens} response tokens, lengths "
          f"min {min(lengths)} / median {sorted(lengths)[len(lengths) // 2]} / max {max(lengths)}")  # fmt: skip
    arms = {"arrival": (torch.arange(len(prompts)), 0), "padded": (by_length, 0),
            "packed": (by_length, args.max_tokens_per_micro_batch)}  # fmt: skip
    times = {name: [] for name in arms}
    for repeat in range(args.repeats + 1):
        for name, (order, budget) in arms.items():
            seconds, loss, passes = training_pass(order, budget)
            print(f"  repeat {repeat} {name}: {seconds:.2f} s, {passes} forward/backward passes, loss {loss:.6f}")
            if repeat:
                times[name].append(seconds)
    rate = {name: n_tokens * len(t) / sum(t) for name, t in times.items()}
    print(f"tokens/s: arrival order {rate['arrival']:.0f}, sorted padded ({args.micro_batch_size} rows) "
          f"{rate['padded']:.0f}, packed ({args.max_tokens_per_micro_batch} tokens) {rate['packed']:.0f}; packed / "
          f"padded = {rate['packed'] / rate['padded']:.2f}x, packed / arrival = {rate['packed'] / rate['arrival']:.2f}x, "
          f"padded / arrival = {rate['padded'] / rate['arrival']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
