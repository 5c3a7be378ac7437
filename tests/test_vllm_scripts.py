"""grpo.py --vllm and ppo.py --vllm end to end on smollm2-small (float32, CPU or GPU vLLM): the engine gets the policy's
weights after every optimizer step, so the second step's samples have the trainer's log-probs (a run whose weight sync
is stubbed out does not), in one process and under a 2-process torchrun. Each run is its own process (vLLM's engine
and its shutdown are process-wide). Needs the vLLM tier (README); skipped without it."""

import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

from common.run import read_metrics

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (README, 'vLLM tier')"),
]
GAP = "rollout/train_vs_sampler_abs_logp_diff_mean"


def run_script(script, out, arith_small, *extra, stale=False, nproc=1):
    """Runs `script --vllm` for 2 steps at a high lr (the weights move a lot), with the sync stubbed out if stale."""
    flags = ["--model-path", "smollm2-small", "--dataset", str(arith_small / "train.jsonl"), "--eval-samples", "0",
             "--max-steps", "2", "--max-new-tokens", "12", "--lr", "2e-2", "--dtype", "float32", "--vllm",
             "--rewards", "conftest:vowel_fraction", "--output-dir", str(out), "--no-export", *extra]  # fmt: skip
    patch = (
        f"import {script}; {script}.sync_weights = (lambda engine, tensors: None) if {stale} else {script}.sync_weights"
    )
    code = f"{patch}; from common.cli import cli; {script}.main(cli({script}.Args))"
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}", "--no-python", sys.executable]  # fmt: skip
    env = {**subprocess_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([*launcher, "-c", code, *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [r for r in read_metrics(out) if GAP in r]


@pytest.mark.parametrize("script", ["grpo", "ppo"])
def test_weights_reach_the_engine_after_every_step(script, arith_small, tmp_path):
    extra = ["--prompts-per-step", "4", "--group-size", "4", "--no-dynamic-sampling"] if script == "grpo" else \
        ["--prompts-per-step", "8", "--mini-batches", "1", "--mu", "1"]  # fmt: skip
    synced = run_script(script, tmp_path / "synced", arith_small, *extra)
    stale = run_script(script, tmp_path / "stale", arith_small, *extra, stale=True)
    assert [r["step"] for r in synced] == [1, 2]
    # step 1: the engine holds the start weights either way; step 2: only a synced engine samples the updated policy
    assert synced[0][GAP] < 1e-3 and stale[0][GAP] < 1e-3
    assert synced[1][GAP] < 1e-3, synced
    assert stale[1][GAP] > 10 * synced[1][GAP] and stale[1][GAP] > 1e-2, (synced, stale)


@pytest.mark.parametrize("script, lora", [("grpo", 0), ("ppo", 0), ("grpo", 8)])
def test_vllm_under_torchrun(script, lora, arith_small, tmp_path):
    """2 ranks, FSDP2, one engine each; with LoRA the engine gets the merged weights (W + s B A) after every step: the
    sampler's logprobs still equal the trainer's at step 2."""
    extra = ["--group-size", "2", "--no-dynamic-sampling"] if script == "grpo" else ["--mini-batches", "1"]
    extra += ["--lora-r", str(lora), "--lora-alpha", "32"] if lora else []
    rows = run_script(script, tmp_path, arith_small, "--prompts-per-step", "4", *extra, nproc=2)
    assert [r["step"] for r in rows] == [1, 2] and all(r[GAP] < 1e-3 for r in rows), rows
