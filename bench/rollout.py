"""Rollout throughput, side by side in one run, same model, prompts, group size, completion budget and sampling:

  1. the colocated vLLM engine (common/vllm_engine.py) vs Hugging Face `generate` as grpo.py runs it
     (common/rollout.generate: one left-padded batch of prompts x group rows, KV cache, the sampler-logprob recorder);
  2. 2-process FSDP2 `generate` (torchrun, gloo on CPU / NCCL on GPU): the weights gathered once per generate call
     (grpo.py's default) vs gathered layer by layer at every decoding step (--no-unshard-for-generation, synced_gpus).

    python bench/rollout.py                            # smollm2-135m, 16 prompts x 8 completions x 64 tokens
    python bench/rollout.py --model smollm2-small --prompts 4 --repeats 1 --max-new-tokens 16   # a smoke run

Part 1 needs vllm (the vLLM tier, README) and is skipped without it. Prompts: the first --prompts problems of
data/arith/test.jsonl. Each arm runs --repeats times, alternating, and the best counts (a shared machine makes single
timings noisy); vLLM's start-up is timed apart. Completions stop at EOS, so completions/s and tokens/s are both printed.
float32 by default (bf16 is emulated, ~24x slower, on CPUs without bf16 instructions).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.models import load_model, load_processor, resolve_model_path  # noqa: E402
from common.rollout import generate, stop_ids  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def prompts_of(processor, n):
    records = [json.loads(line) for line in (ROOT / "data" / "arith" / "test.jsonl").read_text().splitlines()[:n]]
    return [processor(r["messages"][:1], add_generation_prompt=True) for r in records]


def best_of(arms: dict, repeats: int) -> dict:
    """{name: (seconds, completions, tokens)} of each arm's fastest run, the arms alternating."""
    best = {}
    for _ in range(repeats):
        for name, fn in arms.items():
            torch.manual_seed(0)
            t0 = time.perf_counter()
            completions = fn()
            run = (time.perf_counter() - t0, len(completions), sum(len(c) for c in completions))
            best[name] = min(best.get(name, run), run)
    return best


def report(best: dict, label: str):
    """Prints each arm's rates and the first arm's completions/s over the second's."""
    rates = []
    for name, (seconds, n, tokens) in best.items():
        print(f"  {name:24s} {seconds:7.2f} s  {n / seconds:7.2f} completions/s  {tokens / seconds:8.1f} tokens/s")
        rates.append(n / seconds)
    print(f"  ratio {label}: {rates[0] / rates[1]:.2f}x")


def vllm_vs_hf(args):
    from common.vllm_engine import generate as vllm_generate
    from common.vllm_engine import start_engine, stop_engine

    path, dtype = resolve_model_path(args.model), getattr(torch, args.dtype)
    processor, model = load_processor(path), load_model(path, dtype=dtype)
    prompts = prompts_of(processor, args.prompts)
    rows = [p for p in prompts for _ in range(args.group)]
    t0 = time.perf_counter()
    llm = start_engine(path, max_model_len=1024, dtype=dtype, seed=0)
    startup = time.perf_counter() - t0
    kw = dict(temperature=args.temperature, top_p=args.top_p)
    arms = {
        "vllm": lambda: vllm_generate(llm, [p["input_ids"] for p in prompts], max_tokens=args.max_new_tokens,
                                      stop_token_ids=stop_ids(processor.tokenizer, model), n=args.group, **kw)[0],
        "hf_generate": lambda: generate(model, processor, rows, max_new_tokens=args.max_new_tokens, **kw)[0],
    }  # fmt: skip
    for fn in arms.values():  # warm-up
        fn()
    best = best_of(arms, args.repeats)
    stop_engine(llm)
    print(f"1. vLLM vs Hugging Face generate (vLLM start-up {startup:.1f} s, not timed):")
    report(best, "vLLM / HF completions/s")


FSDP_WORKER = r"""
import json, sys, time
import torch
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
from common.models import fsdp_blocks, load_model, load_processor, resolve_model_path
from common.rollout import generate
from common.run import setup

root, model_name, out, n_prompts, group, max_new, repeats, dtype = sys.argv[1:9]
run = setup(0, dtype)
path = resolve_model_path(model_name)
processor, model = load_processor(path), load_model(path)
for block in fsdp_blocks(model):
    fully_shard(block)
fully_shard(model)
records = [json.loads(l) for l in open(f"{root}/data/arith/test.jsonl").read().splitlines()]
mine = records[run.rank::run.world_size][: int(n_prompts) // run.world_size]
rows = [processor(r["messages"][:1], add_generation_prompt=True) for r in mine for _ in range(int(group))]
best = {}
for _ in range(int(repeats) + 1):  # the first round warms up
    for name, gather in (("gathered_once", True), ("per_step_gathers", False)):
        torch.manual_seed(run.rank)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        completions = generate(model, processor, rows, max_new_tokens=int(max_new), gather=gather)[0]
        torch.distributed.barrier()  # a step of the slowest rank is everyone's step
        run_ = (time.perf_counter() - t0, len(completions) * run.world_size, sum(map(len, completions)) * run.world_size)
        best[name] = run_ if _ == 0 else min(best.get(name, run_), run_)
if run.rank == 0:
    json.dump(best, open(out, "w"))
torch.distributed.destroy_process_group()
"""


def fsdp_gather(args):
    with tempfile.TemporaryDirectory() as tmp:
        worker, out = Path(tmp) / "worker.py", Path(tmp) / "best.json"
        worker.write_text(FSDP_WORKER)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
               str(ROOT), args.model, str(out), str(args.prompts), str(args.group), str(args.max_new_tokens),
               str(args.repeats), args.dtype]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        best = {k: tuple(v) for k, v in json.loads(out.read_text()).items()}
    print("2. 2-process FSDP2 generate: weights gathered once per call vs at every decoding step:")
    report(best, "gathered once / per-step gathers completions/s")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"model {args.model} ({args.dtype}), {args.prompts} prompts x {args.group} completions x <= "
          f"{args.max_new_tokens} new tokens, T={args.temperature} top_p={args.top_p}, best of {args.repeats}; "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU ' + cpu_name()}, "
          f"{os.cpu_count()} cores")  # fmt: skip
    try:
        import vllm  # noqa: F401

        vllm_vs_hf(args)
    except ImportError:
        print("1. vLLM vs Hugging Face generate: skipped, vllm is not installed (README, 'vLLM tier')")
    fsdp_gather(args)


if __name__ == "__main__":
    main()
