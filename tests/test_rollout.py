"""common/rollout.py: training rows aligned with the logps; the sampler's own logps equal the training forward's (and
FIRE changes exactly the first token's); the held-out check; generation under 2-process FSDP2 with the weights gathered
once gives the same completions as the per-step gathers (synced_gpus), and held-out accuracy under torchrun equals one
process's."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, subprocess_env

from common.evaluation import is_correct
from common.logprob import sequence_logprobs
from common.models import load_model, load_processor
from common.rollout import build_batch, generate, micro_batches, sampler_gap, tis_weights, token_logps


def test_build_batch_aligns_response_mask_with_logps():
    batch = build_batch([[5, 6, 7], [8]], [[10, 11], [12, 13, 14]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 10, 11], [8, 12, 13, 14, 0]]
    # logps[:, t] scores token t+1: the completion tokens are scored at t = len(prompt)-1 ... len(row)-2
    assert batch["response_mask"].tolist() == [[False, False, True, True, False], [True, True, True, False, False]]
    assert batch["position_ids"][1].tolist()[:4] == [0, 1, 2, 3]
    with_logps = build_batch([[5, 6, 7], [8]], [[10, 11], [12, 13, 14]], pad_id=0,
                             rollout_logps=[[-0.5, -1.5], [-1.0, -2.0, -3.0]])  # fmt: skip
    assert with_logps["rollout_logps"].tolist() == [[0, 0, -0.5, -1.5, 0], [-1.0, -2.0, -3.0, 0, 0]]
    assert (with_logps["rollout_logps"] != 0).eq(with_logps["response_mask"]).all()


def test_sampler_logps_equal_the_training_models_logps(sharper_tiny_model_dir):
    """The logps recorded while sampling (KV cache, left padding) = a fresh training forward on the same tokens (fp32),
    at the sampling temperature; with FIRE the first token's differ by exactly the temperature change."""
    processor, model = load_processor(sharper_tiny_model_dir), load_model(sharper_tiny_model_dir)
    prompts = [processor([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ("2+2?", "What is seven times eight?")]  # fmt: skip
    prompt_ids = [p["input_ids"] for p in prompts]
    for fire in (None, 3.0):
        torch.manual_seed(0)
        completions, _, sampler_logps = generate(model, processor, prompts, max_new_tokens=6, temperature=0.7,
                                                 fire_temperature=fire)  # fmt: skip
        batch = build_batch(prompt_ids, completions, processor.tokenizer.pad_token_id, sampler_logps)
        with torch.no_grad():
            train_logps = sequence_logprobs(model, batch["input_ids"], batch["labels"], temperature=0.7,
                                            position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])  # fmt: skip
        diff = (train_logps - batch["rollout_logps"])[batch["response_mask"]]
        assert diff.numel() == sum(len(c) for c in completions) > 0
        if fire is None:
            assert diff.abs().max() < 1e-4
        else:  # only each completion's first token was drawn at the FIRE temperature
            first = torch.tensor([len(p) - 1 for p in prompt_ids])
            first_diff = (train_logps - batch["rollout_logps"])[torch.arange(2), first]
            assert first_diff.abs().min() > 1e-3
            assert diff.abs().sort().values[:-2].max() < 1e-4


def test_is_correct_checks_numbers_as_math_and_words_by_exact_match():
    assert is_correct("3 + 4 = 7. #### 7", "7") and is_correct("so the answer is 1,000", 1000)
    assert not is_correct("#### 8", "7")
    assert is_correct(" Red.", "red") and is_correct("two", ["2", "3"])  # VQA normalisation: number words, lists
    assert not is_correct("a red circle", "red")  # a word answer must be the whole answer


DIST_SCRIPT = r"""
import json, os, sys
import torch
from torch.distributed.fsdp import fully_shard
from common.models import fsdp_blocks, load_model, load_processor
from common.evaluation import answer_accuracy
from common.rollout import generate
from common.run import setup

model_dir, out = sys.argv[1], sys.argv[2]
run = setup(0, "float32")
processor, model = load_processor(model_dir), load_model(model_dir)
for block in fsdp_blocks(model):
    fully_shard(block)
fully_shard(model)
prompts = [processor([{"role": "user", "content": f"What is {run.rank} + {k}?"}], add_generation_prompt=True)
           for k in range(3)]
result = {}
for gather in (True, False):
    torch.manual_seed(123 + run.rank)
    result[str(gather)] = generate(model, processor, prompts, max_new_tokens=12, temperature=1.0, gather=gather)[0]
items = [([{"role": "user", "content": f"What is {k} + 1?"}], str(k + 1)) for k in range(5)]
result["accuracy"] = answer_accuracy(model, processor, items, run, max_new_tokens=8, batch_size=2)
with open(f"{out}/rank{run.rank}.json", "w") as f:
    json.dump(result, f)
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_gathered_generation_equals_per_step_gathers_under_fsdp2(sharper_tiny_model_dir, tmp_path):
    """2 ranks, FSDP2: sampling with the weights gathered once gives the same tokens as the per-step all-gathers
    (synced_gpus), and the sharded held-out accuracy (each rank answers every other item) equals one process's."""
    script = tmp_path / "dist_generate.py"
    script.write_text(DIST_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           sharper_tiny_model_dir, str(tmp_path)]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["True"] == r["False"] and any(len(c) > 1 for c in r["True"])
    assert ranks[0]["True"] != ranks[1]["True"]  # different prompts and seeds: the ranks really decoded their own
    assert ranks[0]["accuracy"] == ranks[1]["accuracy"]
    from common.evaluation import answer_accuracy
    from common.run import Run

    processor, model = load_processor(sharper_tiny_model_dir), load_model(sharper_tiny_model_dir)
    items = [([{"role": "user", "content": f"What is {k} + 1?"}], str(k + 1)) for k in range(5)]
    one = answer_accuracy(model, processor, items, Run(0, 1, torch.device("cpu"), torch.float32), max_new_tokens=8)
    assert ranks[0]["accuracy"] == one
    assert os.environ.get("WORLD_SIZE") is None


def test_tis_weights_and_sampler_gap_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # w = min(pi_old / pi_sampler, cap): e^0.5 = 1.65 is cut to the cap 1.5; 0 outside the mask
    expected = [[1.5, math.exp(-1.0), 1.0], [1.0, math.exp(-3.0), 0.0]]
    assert torch.allclose(tis_weights(old, sampler, mask, cap=1.5), torch.tensor(expected))
    gap = sampler_gap(old, sampler, mask, cap=1.5)
    diffs = [0.5, -1.0, 0.0, 0.0, -3.0]  # log pi_old - log pi_sampler on the 5 masked tokens
    assert gap["gap_tokens"] == 5 and gap["tis_capped"] == 1
    assert gap["gap_abs"] == pytest.approx(sum(abs(d) for d in diffs))
    assert gap["gap_ratio"] == pytest.approx(sum(math.exp(d) for d in diffs))


def test_token_budget_micro_batches_give_the_padded_loss_and_gradients(tiny_model_dir):
    """Completions of skewed lengths: packing them into rows of at most 200 tokens (position_ids restarting per
    completion) gives the loss, the gradients and the critic's values of 2-row padded micro-batches."""
    from common.run import Run
    from common.value import load_value_model, token_values

    processor, model = load_processor(tiny_model_dir), load_model(tiny_model_dir)
    critic, _ = load_value_model(tiny_model_dir, device="cpu")
    torch.nn.init.normal_(critic.score.weight)  # a non-zero value head
    prompts = [
        processor([{"role": "user", "content": f"What is {k} + {k}?"}], add_generation_prompt=True) for k in range(6)
    ]
    completions = [list(range(100, 100 + n)) for n in (2, 30, 5, 60, 3, 12)]
    batch = build_batch([p["input_ids"] for p in prompts], completions, processor.tokenizer.pad_token_id)
    advantages = torch.randn(6, generator=torch.Generator().manual_seed(0))[:, None] * batch["response_mask"]
    by_length = torch.argsort(batch["attention_mask"].sum(1))
    run = Run(0, 1, torch.device("cpu"), torch.float32)

    def loss_grads_values(max_tokens):
        model.zero_grad()
        total, values, n_groups = 0.0, torch.zeros(batch["input_ids"].shape), 0
        for idx, mb, images in micro_batches(batch, by_length, prompts, processor, run, size=2, max_tokens=max_tokens):
            width, n_groups = mb["input_ids"].shape[1], n_groups + 1
            assert ("packed" in mb) == (max_tokens > 0)
            assert not max_tokens or mb["packed"]["input_ids"].numel() == mb["attention_mask"].sum() <= max_tokens
            logps = token_logps(model, mb, images)
            loss = -(logps * advantages[idx, :width] * mb["response_mask"]).sum() / batch["response_mask"].sum()
            loss.backward()
            total += loss.item()
            with torch.no_grad():
                values[idx, :width] = token_values(critic, mb, images)
        return total, [p.grad.clone() for p in model.parameters()], values * batch["response_mask"], n_groups

    padded, packed = loss_grads_values(0), loss_grads_values(200)
    assert padded[3] == 3 and packed[3] == 2  # 6 rows of 40-100 tokens (prompt + completion): in twos, or 2 packed
    assert packed[0] == pytest.approx(padded[0], rel=1e-5, abs=1e-7) and padded[0] != 0.0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(packed[1], padded[1]))
    assert torch.allclose(packed[2], padded[2], atol=1e-5) and packed[2].abs().sum() > 0
