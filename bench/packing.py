"""Packing vs padding: real (non-pad) target tokens trained per second, side by side in one run.

    python bench/packing.py                          # tiny random-init Llama (hidden 64), ~3 min on 2 idle CPU cores
    python bench/packing.py --model smollm2-135m --n-examples 64 --batch-size 4

Synthetic SFT data with skewed lengths like real chat data (lognormal, clipped to [16, 512] tokens; the first
20-60% of each example is prompt, label -100). Both arms see the same slot budget per step:
  padded: `--batch-size` rows, each padded to the longest example of its batch (pad_collate + attention_mask)
  packed: `--batch-size` rows of exactly `--max-tokens` tokens (pack_examples + pack_collate, position_ids only)
Each arm runs whole epochs of fwd + bwd + AdamW steps over the same examples; the arms' steps are interleaved so
both see the same machine conditions. Prints target tokens/s for each arm and the ratio packed/padded.
"""

import argparse
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.chat import epoch_batches, pack_collate, pack_examples
from common.data import pad_collate  # noqa: E402
from common.models import load_model, tiny_model  # noqa: E402


def synthetic_examples(n, vocab_size, min_len, max_len, seed):
    """Random-token examples with lognormal lengths (median ~100 tokens, long tail) and prompt tokens masked."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = int(min(max(rng.lognormvariate(math.log(100), 0.8), min_len), max_len))
        ids = [rng.randrange(3, vocab_size) for _ in range(length)]
        prompt_len = int(length * rng.uniform(0.2, 0.6))
        examples.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
    return examples


def train_step(model, optimizer, batch, device):
    batch = {
        k: v.to(device) for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask", "position_ids")
    }
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits  # [B, T, V]
    # unshifted labels: position t predicts labels[t + 1]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (labels[:, 1:] != -100).sum().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (random-init Llama, hidden 64) or smollm2-135m")
    parser.add_argument("--n-examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step in both arms")
    parser.add_argument("--max-tokens", type=int, default=512, help="packed row length = longest example")
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="epochs per arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    if args.model == "tiny":
        model = tiny_model(hidden_size=64).to(args.device)
    else:
        model = load_model(args.model, device=args.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab_size = model.config.vocab_size
    examples = synthetic_examples(args.n_examples, vocab_size, args.min_len, args.max_tokens, args.seed)
    lengths = sorted(len(e["input_ids"]) for e in examples)
    pad_id = 0

    packs = pack_examples(examples, args.max_tokens)
    packed_batches = [
        pack_collate([[examples[i] for i in p] for p in packs[s : s + args.batch_size]], pad_id, args.max_tokens)
        for s in range(0, len(packs), args.batch_size)
    ]

    def padded_batches(epoch):  # shuffled like a real run; padding waste depends on who shares a batch
        return [
            pad_collate([examples[i] for i in b], pad_id)
            for b in epoch_batches(len(examples), args.batch_size, args.seed, epoch)
        ]

    def slots(batches):
        return sum(b["input_ids"].numel() for b in batches)

    n_tokens = sum(lengths)
    print(
        f"model {args.model} on {args.device}; {len(examples)} examples, lengths min/median/p90/max = "
        f"{lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[int(0.9 * len(lengths))]}/{lengths[-1]}, {n_tokens} tokens"
    )
    print(
        f"padded: {math.ceil(len(examples) / args.batch_size)} steps/epoch, {n_tokens / slots(padded_batches(0)):.0%} "
        f"of slots are real tokens | packed: {len(packed_batches)} steps/epoch of {args.batch_size}x{args.max_tokens}, "
        f"{len(packs)} rows, {n_tokens / slots(packed_batches):.0%} real"
    )

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for batch in (padded_batches(0)[0], packed_batches[0]):  # warm-up: allocator, kernels, optimizer state
        train_step(model, optimizer, batch, args.device)
    totals = {"padded": [0, 0.0], "packed": [0, 0.0]}  # arm -> [target tokens, seconds]
    for epoch in range(args.rounds):
        # interleave the arms step by step (whichever is less far through its epoch goes next), so load from
        # other processes on a shared machine hits both arms alike
        queues = {"padded": padded_batches(epoch), "packed": list(packed_batches)}
        n_steps = {arm: len(q) for arm, q in queues.items()}
        done = {arm: 0 for arm in queues}
        while any(done[arm] < n_steps[arm] for arm in queues):
            arm = min((a for a in queues if done[a] < n_steps[a]), key=lambda a: done[a] / n_steps[a])
            sync()
            start = time.perf_counter()
            totals[arm][0] += train_step(model, optimizer, queues[arm][done[arm]], args.device)
            sync()
            totals[arm][1] += time.perf_counter() - start
            done[arm] += 1
        print(
            f"  epoch {epoch}: " + ", ".join(f"{arm} {t[0]} target tokens in {t[1]:.1f} s" for arm, t in totals.items())
        )
    rate = {arm: tokens / seconds for arm, (tokens, seconds) in totals.items()}
    print(
        f"target tokens/s  padded {rate['padded']:.0f}  packed {rate['packed']:.0f}  "
        f"ratio packed/padded {rate['packed'] / rate['padded']:.2f}x"
    )


if __name__ == "__main__":
    main()
