"""Fused vs naive per-token logprobs: time and peak memory, side by side.

    python bench/logprob.py            # N in {2048, 8192, 16384} at V=49152, N=4096 at V=151936, H=576
    python bench/logprob.py --quick    # smaller sizes, a smoke run
    python bench/logprob.py --sweep    # fused chunk sizes at one N (how the defaults were picked)

Each (variant, size) runs in its own fresh subprocess so peak memory is clean. On CPU, peak memory is the
growth of the process's peak RSS (ru_maxrss) over its value once the inputs exist; on CUDA it is
torch.cuda.max_memory_allocated over the inputs, and Liger-Kernel's LigerFusedLinearCrossEntropyLoss is
added as a third column when importable. The "extra" memory excludes the V x H weight gradient (both
variants must produce it). Times are the best of --repeats runs of forward+backward of sum(logprobs).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.logprob import fused_linear_logprobs, naive_logprobs  # noqa: E402

HIDDEN = 576


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args):
    """One measurement in this (fresh) process; prints a JSON line."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    n, vocab, train = args.n, args.vocab, args.mode == "train"
    if args.variant == "fused":
        fn = lambda h, w, t: fused_linear_logprobs(h, w, t, **args.chunk_kw)  # noqa: E731
    elif args.variant == "naive":
        fn = naive_logprobs
    else:  # liger: returns the summed NLL, i.e. -sum(logprobs)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        fn = lambda h, w, t: -liger(w, h, t)  # noqa: E731

    def step(h, w, t):
        if train:
            fn(h, w, t).sum().backward()
        else:
            with torch.no_grad():
                fn(h, w, t).sum().item()

    # Warm up kernels/thread pools on a problem too small to move the peak-RSS high-water mark.
    step(
        torch.randn(64, HIDDEN, device=device, requires_grad=train),
        torch.randn(512, HIDDEN, device=device, requires_grad=train),
        torch.randint(0, 512, (64,), device=device),
    )
    hidden = (torch.randn(n, HIDDEN, device=device)).requires_grad_(train)  # [N, H]
    weight = torch.randn(vocab, HIDDEN, device=device).mul_(HIDDEN**-0.5).requires_grad_(train)  # [V, H]
    targets = torch.randint(0, vocab, (n,), device=device)  # [N]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss_bytes()
        assert peak_rss_bytes() - base < 16 * 2**20, "the memory baseline is not the high-water mark"
    times, cpu_times = [], []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        step(hidden, weight, targets)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()) - base
    weight_grad_bytes = vocab * HIDDEN * 4 if train else 0
    print(json.dumps(dict(seconds=min(times), cpu_seconds=min(cpu_times), extra_bytes=peak - weight_grad_bytes)))


def measure(variant, n, vocab, mode, repeats, chunk_kw=None):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        variant,
        "--n",
        str(n),
        "--vocab",
        str(vocab),
        "--mode",
        mode,
        "--repeats",
        str(repeats),
        "--chunk-kw",
        json.dumps(chunk_kw or {}),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc={proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(x):
    return f"{x / 2**20:8.0f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--sweep", action="store_true", help="time fused chunk sizes instead")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="train", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-kw", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant, args.chunk_kw = args.worker, json.loads(args.chunk_kw)
        args.repeats = args.repeats or 1
        return worker(args)

    variants = ["naive", "fused"]
    if torch.cuda.is_available():
        try:
            import liger_kernel.transformers  # noqa: F401

            variants.append("liger")
        except ImportError:
            pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {device}   H={HIDDEN}   load average at start: {os.getloadavg()[0]:.1f}")

    if args.sweep:
        n = 2048 if args.quick else 4096
        print(f"fused chunk sweep, N={n}, V=49152, forward+backward")
        print(f"{'chunk':>6} {'vocab_chunk':>12} {'seconds':>8} {'extra MiB':>10}")
        for chunk, vocab_chunk in [
            (256, 49152),
            (512, 8192),
            (1024, 4096),
            (1024, 8192),
            (1024, 16384),
            (2048, 4096),
            (2048, 8192),
            (1024, 49152),
        ]:
            r = measure(
                "fused", n, 49152, "train", args.repeats or 2, dict(chunk_size=chunk, vocab_chunk_size=vocab_chunk)
            )
            print(
                f"{chunk:>6} {vocab_chunk:>12} {r.get('seconds', float('nan')):8.2f} {mib(r.get('extra_bytes', 0)):>10}"
            )
        return

    if args.quick:
        rows = [(1024, 49152, "train"), (4096, 49152, "train"), (1024, 151936, "train"), (4096, 49152, "nograd")]
    else:
        rows = [
            (2048, 49152, "train"),
            (8192, 49152, "train"),
            (16384, 49152, "train"),
            (4096, 151936, "train"),
            (8192, 49152, "nograd"),
        ]
    results = {}
    header = f"{'N':>6} {'V':>7} {'mode':>7} | " + " | ".join(f"{v:>6} s {v:>6} MiB" for v in variants)
    print(header + " | time f/n | mem f/n")
    for n, vocab, mode in rows:
        repeats = args.repeats or (1 if args.quick or n * vocab > 4096 * 49152 else 2)
        r = {v: measure(v, n, vocab, mode, repeats) for v in variants}
        results[(n, vocab, mode)] = r
        cells = " | ".join(
            f"{r[v].get('seconds', float('nan')):8.2f} {mib(r[v].get('extra_bytes', 0)):>10}" for v in variants
        )
        fused, naive = r["fused"], r["naive"]
        if "error" in fused or "error" in naive:
            print(f"{n:>6} {vocab:>7} {mode:>7} | error: {fused.get('error') or naive.get('error')}")
            continue
        ratio_t = fused["seconds"] / naive["seconds"]
        ratio_m = fused["extra_bytes"] / max(naive["extra_bytes"], 1)
        print(f"{n:>6} {vocab:>7} {mode:>7} | {cells} | {ratio_t:8.2f} | {ratio_m:7.3f}", flush=True)

    train_rows = [k for k in rows if k[2] == "train" and k[1] == 49152]
    lo, hi = train_rows[0], train_rows[-1]
    print("\nsummary (fused / naive; extra memory excludes the V x H weight grad)")
    for (n, vocab, mode), r in results.items():
        if "error" not in r["fused"] and "error" not in r["naive"]:
            print(
                f"  {mode:>6} N={n:<6} V={vocab:<7} time {r['fused']['seconds'] / r['naive']['seconds']:.2f}x"
                f"   peak extra memory {r['fused']['extra_bytes'] / r['naive']['extra_bytes']:.3f}x"
            )
    if "error" not in results[lo]["fused"] and "error" not in results[hi]["fused"]:
        print(
            f"  memory flatness: fused extra peak N={hi[0]} / N={lo[0]} = "
            f"{results[hi]['fused']['extra_bytes'] / results[lo]['fused']['extra_bytes']:.2f}"
            f" (naive: {results[hi]['naive']['extra_bytes'] / results[lo]['naive']['extra_bytes']:.2f});"
            f" without the N x H hidden grad both must return: "
            f"{(results[hi]['fused']['extra_bytes'] - hi[0] * HIDDEN * 4) / (results[lo]['fused']['extra_bytes'] - lo[0] * HIDDEN * 4):.2f}"
        )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
