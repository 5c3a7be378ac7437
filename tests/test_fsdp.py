"""Memory features under FSDP2 (issue 16): sharded loading from the meta device, LoRA in the RL scripts, a reference
that is the base with adapters off, CPU offload, and bf16 mixed precision against one process."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, subprocess_env
from safetensors.torch import load_file

import grpo
import ppo
from common.run import bf16_supported, read_metrics


def torchrun(*args, extra_path=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    env = subprocess_env()
    if extra_path:
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'tests'}"
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def sft_flags(tiny_model_dir, arith_small, out, *extra):
    return ["--model-path", tiny_model_dir, "--dataset", arith_small / "train.jsonl", "--eval-samples", "0",
            "--max-steps", "4", "--lr", "1e-2", "--max-len", "256", "--save-every", "0", "--eval-every", "0",
            "--output-dir", out, *extra]  # fmt: skip


def losses(out, key="train/loss"):
    return [r[key] for r in read_metrics(out) if key in r]


@pytest.mark.slow
def test_sharded_loading_gives_the_same_weights(tiny_model_dir, vlm_dir, tmp_path):
    """Rank 1 builds every kind of model on the meta device (no weights in memory; the reference on rank 0 too: it
    copies the policy's shards); after fully_shard and fill_shards the gathered parameters and buffers equal today's
    plain load, bit for bit, on both ranks."""
    out = tmp_path / "report.json"
    torchrun(ROOT / "tests" / "dist_sharded_load.py", tiny_model_dir, vlm_dir, out)
    report = json.loads(out.read_text())
    kinds = {"causal_lm", "causal_lm_lora", "critic", "critic_lora", "reference_compute_dtype", "vlm", "vlm_critic"}
    assert set(report) == kinds
    for name, (rank0, rank1) in report.items():
        assert rank0["built_on_meta"] == (name == "reference_compute_dtype") and rank1["built_on_meta"], name
        assert rank0["mismatched"] == rank1["mismatched"] == [], name
        assert rank0["n_tensors"] == rank1["n_tensors"] > 0, name
    assert report["reference_compute_dtype"][1]["dtypes"] == ["torch.bfloat16"]  # the cheap reference's storage
    assert report["causal_lm_lora"][0]["n_tensors"] > report["causal_lm"][0]["n_tensors"]  # adapters were loaded


@pytest.mark.slow
def test_lora_under_fsdp2_and_cpu_offload_match_one_process(tiny_model_dir, arith_small, tmp_path):
    """sft.py with LoRA: 1 process (batch 2, grad-accum 2) == 2 ranks (batch 2 each) == 2 ranks with --cpu-offload
    (parameters, gradients and AdamW state on the CPU): the same loss curve and the same trained adapter."""
    lora = ["--lora-r", "4", "--dtype", "float32"]
    single = subprocess.run(
        [sys.executable, "sft.py", *sft_flags(tiny_model_dir, arith_small, tmp_path / "one", *lora,
                                               "--batch-size", "2", "--grad-accum", "2")],  # fmt: skip
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun("sft.py", *sft_flags(tiny_model_dir, arith_small, tmp_path / "two", *lora, "--batch-size", "2"))
    torchrun("sft.py", *sft_flags(tiny_model_dir, arith_small, tmp_path / "offload", *lora, "--batch-size", "2",
                                  "--cpu-offload"))  # fmt: skip
    one, two, offload = (losses(tmp_path / n) for n in ("one", "two", "offload"))
    assert len(one) == len(two) == len(offload) == 4 and one[-1] < one[0]
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4, (one, two)
    assert max(abs(a - b) for a, b in zip(one, offload)) < 1e-4, (one, offload)
    adapters = [load_file(tmp_path / n / "model" / "adapter" / "adapter_model.safetensors") for n in ("one", "two")]
    assert adapters[0].keys() == adapters[1].keys() and any("lora_B" in k for k in adapters[0])
    assert max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[0]) < 1e-4


@pytest.mark.slow
def test_grpo_lora_with_kl_under_fsdp2_uses_the_adapter_free_base_as_reference(tiny_model_dir, arith_small, tmp_path):
    """With LoRA there is no second model: the reference is the base with adapters off. LoRA's B starts at zero, so
    step 1's policy *is* the reference (KL exactly 0); after one update it is not. Exports: adapter + merged model."""
    from transformers import AutoModelForCausalLM

    torchrun("grpo.py", "--model-path", tiny_model_dir, "--dataset", arith_small / "train.jsonl", "--eval-samples", "0",
             "--max-steps", "2", "--prompts-per-step", "4", "--group-size", "2", "--max-new-tokens", "8",
             "--dtype", "float32", "--lr", "1e-2", "--kl-coef", "0.1", "--lora-r", "4", "--rewards", "math",
             "conftest:vowel_fraction", "--output-dir", tmp_path, extra_path=True)  # fmt: skip
    rows = [r for r in read_metrics(tmp_path) if "train/kl" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["train/kl"] == 0.0 and rows[1]["train/kl"] > 0.0
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    assert (tmp_path / "model" / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q]) and torch.equal(merged["model.norm.weight"], base["model.norm.weight"])


def test_ppo_lora_trains_actor_and_critic_adapters_and_exports_both(tiny_model_dir, arith_small, tmp_path):
    """ppo.py --lora-r: the actor and the critic train adapters (the critic's value head fully), the reference is the
    actor's base (KL 0 at step 1); the merged critic export loads as a value model whose head is the trained one."""
    from common.value import load_value_model

    ppo.main(ppo.Args(model_path=tiny_model_dir, dataset=str(arith_small / "train.jsonl"), eval_samples=0,
                      output_dir=str(tmp_path), max_steps=2, prompts_per_step=4, max_new_tokens=8, lr=1e-2,
                      critic_lr=1e-2, dtype="float32", rewards=("conftest:vowel_fraction",), micro_batch_size=8,
                      kl_coef=0.1, lora_r=4, export=True))  # fmt: skip
    rows = [r for r in read_metrics(tmp_path) if "train/kl" in r]
    assert rows[0]["train/kl"] == 0.0 and rows[1]["train/kl"] != 0.0  # ppo's default k1 estimate can be negative
    assert (tmp_path / "model" / "adapter" / "adapter_model.safetensors").exists()
    critic, _ = load_value_model(str(tmp_path / "critic"), device="cpu")
    head = [p for n, p in critic.named_parameters() if "score" in n or "value_head" in n]
    assert head and any(p.abs().sum() > 0 for p in head)  # the head starts at zero; training moved it
    plain, _ = load_value_model(tiny_model_dir, device="cpu")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(critic.state_dict()[q], plain.state_dict()[q])  # the critic's LoRA was merged in


def test_cpu_offload_without_torchrun_is_a_clear_error(tiny_model_dir, arith_small, tmp_path):
    with pytest.raises(SystemExit, match="--cpu-offload"):
        grpo.main(grpo.Args(model_path=tiny_model_dir, dataset=str(arith_small / "train.jsonl"), eval_samples=0,
                            output_dir=str(tmp_path), max_steps=1, dtype="float32", cpu_offload=True))  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not bf16_supported("cpu"), reason="this CPU has no bf16 instructions (AVX2 only): bf16 is emulated")
def test_bf16_fsdp2_matches_one_process_within_bf16_tolerance(tiny_model_dir, arith_small, tmp_path):
    """2 ranks with FSDP2's bf16 mixed-precision policy (bf16 parameters in compute, fp32 gradient reduction) against
    1 process with bf16 autocast: the same curve within bf16's resolution (8 mantissa bits: ~0.4% relative)."""
    full = ["--dtype", "bfloat16"]
    single = subprocess.run(
        [sys.executable, "sft.py", *sft_flags(tiny_model_dir, arith_small, tmp_path / "one", *full,
                                               "--batch-size", "2", "--grad-accum", "2")],  # fmt: skip
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun("sft.py", *sft_flags(tiny_model_dir, arith_small, tmp_path / "two", *full, "--batch-size", "2"))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) / abs(a) for a, b in zip(one, two)) < 0.03, (one, two)
