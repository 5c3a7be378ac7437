"""Peak resident memory per rank of `torchrun --nproc_per_node=2 grpo.py` with the KL reference on, side by side in one
run: before sharded loading (a git ref, checked out in a temporary worktree) vs this tree, and LoRA GRPO vs full GRPO.

    python bench/memory.py                                   # SmolLM2-135M, ~6 min on 2 CPU cores
    python bench/memory.py --before d72e8b5 --model smollm2-135m --max-steps 3

Arms (the same command line, flags the before-ref also has):
  before: every rank reads the full model and the full float32 reference before sharding them
  after:  rank 0 reads the weights, the other ranks build on the meta device and receive only their shards
          (fill_shards: set_model_state_dict with broadcast_from_rank0); the reference is stored in the compute dtype
  lora:   this tree with --lora-r 16: no reference model at all (the base with adapters off), AdamW state for the
          adapters only
The reward is `format` alone: the before-ref's math-verify totals could desynchronise 2-rank runs (fixed since).
Each rank's peak is the kernel's VmHWM (peak resident set), read by a runpy wrapper around the script when the
optimizer is created (the models are loaded and sharded by then: the loading phase) and at exit (the whole run); step
time is the mean of metrics.jsonl's time/step_s over the steps after the first. Prints each arm's per-rank peaks and
the ratios after/before and lora/full, on the max over ranks and on each rank.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = """
import json, os, runpy, sys, atexit
import torch
out, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
peaks = {}
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
adamw_init = torch.optim.AdamW.__init__
def at_optimizer(self, *args, **kwargs):  # the models are loaded and sharded by then: the loading phase's peak
    peaks.setdefault("load_kib", hwm())
    adamw_init(self, *args, **kwargs)
torch.optim.AdamW.__init__ = at_optimizer
def report():
    with open(f"{out}.rank{os.environ.get('RANK', '0')}", "w") as f:
        json.dump({**peaks, "peak_kib": hwm()}, f)
atexit.register(report)
runpy.run_path(script, run_name="__main__")
"""


def run_arm(name, tree, flags, workdir):
    wrapper = workdir / "peak_rss.py"
    wrapper.write_text(WRAPPER)
    out = workdir / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
           str(out), "grpo.py", *flags, "--output-dir", str(workdir / f"{name}-run")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(tree)}
    print(f"[{name}] {' '.join(cmd[4:])}  (in {tree})", flush=True)
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"[{name}] failed:\n{done.stderr[-3000:]}")
    reports = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]
    peaks, load = [r["peak_kib"] / 2**20 for r in reports], [r["load_kib"] / 2**20 for r in reports]
    rows = [json.loads(line) for line in (workdir / f"{name}-run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["time/step_s"] for r in rows if "time/step_s" in r][1:]
    step_s = sum(steps) / max(len(steps), 1)
    print(f"[{name}] peak RSS per rank: loading {', '.join(f'{p:.2f}' for p in load)} GiB, whole run "
          f"{', '.join(f'{p:.2f}' for p in peaks)} GiB; step {step_s:.1f} s", flush=True)  # fmt: skip
    return peaks, load, step_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="d72e8b5", help="git ref of the code before sharded loading")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-steps", type=int, default=3)
    args = parser.parse_args()
    flags = ["--model-path", args.model, "--max-steps", str(args.max_steps), "--prompts-per-step", "2",
             "--group-size", "2", "--max-new-tokens", "16", "--eval-samples", "0", "--kl-coef", "0.05", "--rewards", "format",
             "--dtype", "auto", "--no-export", "--save-every", "0"]  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    before_tree = workdir / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), args.before], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    try:
        before, load_before, t_before = run_arm("before", before_tree, flags, workdir)
        after, load_after, t_after = run_arm("after", ROOT, flags, workdir)
        lora, _, t_lora = run_arm("lora", ROOT, [*flags, "--lora-r", "16"], workdir)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nmodel {args.model}, 2 ranks, KL on ({args.max_steps} steps, 2 prompts x 2 completions, 16 tokens)")
    for label, a, b in (("loading phase", load_after, load_before), ("whole run", after, before)):
        print(f"after / before, {label}, max over ranks: {max(a) / max(b):.2f}x "
              f"(rank 0 {a[0] / b[0]:.2f}x, rank 1 {a[1] / b[1]:.2f}x)")  # fmt: skip
    print(f"lora / full (this tree), max over ranks: {max(lora) / max(after):.2f}x memory, "
          f"{t_lora / t_after:.2f}x step time ({t_lora:.1f} s vs {t_after:.1f} s; before's step {t_before:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
