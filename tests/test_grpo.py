"""grpo.py: advantage estimators, policy-loss variants, aggregations and KL estimators against the written formulas
(computed here with plain Python on small hand-made tensors), accumulation invariance, and end-to-end runs on a tiny
random-init model (learning, dynamic sampling, failing rewards, rollouts file, resume)."""

import math
import os
import signal
import statistics
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, read_jsonl, subprocess_env

import grpo
from common.checkpoint import checkpoint_dirs
from common.run import RunLogger, read_metrics

# two groups of G=3; the second has all-equal rewards; uneven response lengths (3, 1, 2 | 2, 3, 0 tokens)
REWARDS = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0]
LENGTHS = [3, 1, 2, 2, 3, 0]
T = 4


def mask_from(lengths, width=T):
    return torch.tensor([[t < n for t in range(width)] for n in lengths])


def expected_group_adv(rewards, G, estimator):
    out = []
    for g in range(0, len(rewards), G):
        group = rewards[g : g + G]
        mean = sum(group) / G
        for r in group:
            if estimator == "grpo":
                out.append((r - mean) / (statistics.stdev(group) + 1e-6))
            elif estimator == "dr_grpo":
                out.append(r - mean)
            else:  # rloo
                out.append(r - (sum(group) - r) / (G - 1))
    return out


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_match_formula(estimator):
    adv = grpo.group_advantages(torch.tensor(REWARDS), mask_from(LENGTHS), 3, estimator)
    expected = expected_group_adv(REWARDS, 3, estimator)
    assert adv.shape == (6, T)
    for i, n in enumerate(LENGTHS):
        for t in range(T):
            assert adv[i, t].item() == pytest.approx(expected[i] if t < n else 0.0, abs=1e-6)
    assert adv[3:].abs().max() == 0  # the all-equal group teaches nothing


def test_reinforce_pp_whitens_over_response_tokens():
    adv = grpo.group_advantages(torch.tensor(REWARDS), mask_from(LENGTHS), 3, "reinforce_pp")
    tokens = [r for r, n in zip(REWARDS, LENGTHS) for _ in range(n)]  # one entry per response token
    mean, std = sum(tokens) / len(tokens), statistics.stdev(tokens)
    for i, n in enumerate(LENGTHS):
        for t in range(T):
            assert adv[i, t].item() == pytest.approx((REWARDS[i] - mean) / (std + 1e-6) if t < n else 0.0, abs=1e-6)
    assert adv[mask_from(LENGTHS)].mean().item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------- policy losses
def hand_batch():
    """logps / old logps for 3 sequences with uneven masks; advantages include a large negative one."""
    mask = mask_from([3, 1, 2])
    logps = torch.tensor([[-1.0, -0.5, -2.0, 0.0], [-0.1, 0.0, 0.0, 0.0], [-1.0, -1.2, 0.0, 0.0]])
    old = torch.tensor([[-1.5, -0.4, -1.0, -7.0], [-0.9, 0.0, 0.0, 0.0], [-3.0, -1.3, 0.0, 0.0]])
    seq_adv = [1.0, 0.5, -2.0]
    adv = torch.tensor(seq_adv)[:, None] * mask
    return logps, old, adv, mask, seq_adv


def agg_by_hand(token_losses, agg, norm_len=T):
    """token_losses: list (per sequence) of lists (per response token) of floats."""
    n_tok, n_seq = sum(len(s) for s in token_losses), len(token_losses)
    if agg == "token-mean":
        return sum(map(sum, token_losses)) / n_tok
    if agg == "seq-mean-token-mean":
        return sum(sum(s) / len(s) for s in token_losses) / n_seq
    if agg == "seq-mean-token-sum":
        return sum(map(sum, token_losses)) / n_seq
    return sum(map(sum, token_losses)) / (n_seq * norm_len)


AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def clip(x, lo, hi):
    return min(max(x, lo), hi)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip_low, clip_high, dual", [(0.2, 0.2, None), (0.2, 0.28, None), (0.2, 0.2, 3.0)])
def test_ppo_loss_matches_formula(agg, clip_low, clip_high, dual):
    logps, old, adv, mask, seq_adv = hand_batch()
    loss, stats = grpo.policy_loss(
        logps, old, adv, mask, variant="ppo", clip_low=clip_low, clip_high=clip_high, dual_clip=dual, agg=agg
    )
    token_losses, n_clipped = [], 0
    for i, n in enumerate([3, 1, 2]):
        row = []
        for t in range(n):
            a, r = seq_adv[i], math.exp(logps[i, t].item() - old[i, t].item())
            unclipped, clipped = -a * r, -a * clip(r, 1 - clip_low, 1 + clip_high)
            value = max(unclipped, clipped)
            hit = clipped > unclipped
            if dual is not None and a < 0 and -a * dual < value:
                value, hit = -a * dual, True
            row.append(value)
            n_clipped += hit
        token_losses.append(row)
    assert loss.item() == pytest.approx(agg_by_hand(token_losses, agg), rel=1e-5)
    assert stats["clip_fraction"].item() == pytest.approx(n_clipped / 6)
    assert n_clipped > 0  # the hand-made ratios do cross the clip range
    if (
        dual is not None
    ):  # sequence 2, token 0: ratio e^2 at A = -2 would cost 2 e^2 = 14.8; the dual clip caps it at 2c
        assert token_losses[2][0] == pytest.approx(2.0 * dual)


@pytest.mark.parametrize("agg", AGGS)
def test_gspo_loss_matches_formula(agg):
    logps, old, adv, mask, seq_adv = hand_batch()
    loss, stats = grpo.policy_loss(logps, old, adv, mask, variant="gspo", clip_low=0.1, clip_high=0.15, agg=agg)
    token_losses, n_clipped = [], 0
    for i, n in enumerate([3, 1, 2]):
        s = math.exp(sum(logps[i, t].item() - old[i, t].item() for t in range(n)) / n)  # geometric mean of ratios
        a = seq_adv[i]
        unclipped, clipped = -a * s, -a * clip(s, 0.9, 1.15)
        token_losses.append([max(unclipped, clipped)] * n)
        n_clipped += clipped > unclipped
    assert loss.item() == pytest.approx(agg_by_hand(token_losses, agg), rel=1e-5)
    assert stats["clip_fraction"].item() == pytest.approx(n_clipped / 3)


@pytest.mark.parametrize("agg", AGGS)
def test_gmpo_loss_matches_formula(agg):
    logps, old, adv, mask, seq_adv = hand_batch()
    loss, _ = grpo.policy_loss(logps, old, adv, mask, variant="gmpo", clip_low=0.4, clip_high=0.4, agg=agg)
    token_losses = []
    for i, n in enumerate([3, 1, 2]):
        a = seq_adv[i]
        sign = 1.0 if a > 0 else -1.0
        logs = []
        for t in range(n):
            lr = logps[i, t].item() - old[i, t].item()
            # pessimistic: for A > 0 take the smaller of log rho and its clip, for A < 0 the larger
            logs.append(sign * min(sign * lr, sign * clip(lr, -0.4, 0.4)))
        token_losses.append([-a * math.exp(sum(logs) / n)] * n)
    assert loss.item() == pytest.approx(agg_by_hand(token_losses, agg), rel=1e-5)


def test_token_weights_scale_each_tokens_loss():
    """TIS: the weighted loss is the same clipped surrogate with each token's term multiplied by its weight."""
    logps, old, adv, mask, seq_adv = hand_batch()
    weights = torch.tensor([[0.5, 2.0, 1.0, 9.0], [1.5, 9.0, 9.0, 9.0], [0.1, 1.0, 9.0, 9.0]])  # 9: outside the mask
    loss, _ = grpo.policy_loss(logps, old, adv, mask, variant="ppo", token_weights=weights)
    total = 0.0
    for i, n in enumerate([3, 1, 2]):
        for t in range(n):
            a, r = seq_adv[i], math.exp(logps[i, t].item() - old[i, t].item())
            total += weights[i, t].item() * max(-a * r, -a * clip(r, 0.8, 1.2))
    assert loss.item() == pytest.approx(total / 6, rel=1e-5)


def test_ratio_one_gives_minus_advantage_and_policy_gradient():
    """At pi = pi_old every variant's loss is -mean(A) and its gradient the REINFORCE gradient -A d log pi."""
    _, _, adv, mask, _ = hand_batch()
    base = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, 0.0, 0.0, 0.0], [-1.1, -0.7, 0.0, 0.0]])
    for variant in ("ppo", "gspo", "gmpo"):
        logps = base.clone().requires_grad_(True)
        loss, stats = grpo.policy_loss(logps, base, adv, mask, variant=variant, agg="token-mean")
        loss.backward()
        assert loss.item() == pytest.approx(-(adv.sum() / mask.sum()).item(), rel=1e-6), variant
        assert stats["clip_fraction"].item() == 0.0
        if variant == "ppo":
            assert torch.allclose(logps.grad, -adv / mask.sum(), atol=1e-7)


def test_kl_estimators_match_formula_and_clamp():
    logps = torch.tensor([[-1.0, -0.2, -3.0], [-0.5, -40.0, -1.0]])
    ref = torch.tensor([[-1.5, -0.2, -1.0], [-0.4, -0.1, -45.0]])
    k1, k2, k3 = (grpo.kl_penalty(logps, ref, k) for k in ("k1", "k2", "k3"))
    for i in range(2):
        for t in range(3):
            d = logps[i, t].item() - ref[i, t].item()
            assert k1[i, t].item() == pytest.approx(d, rel=1e-6)
            assert k2[i, t].item() == pytest.approx(0.5 * d * d, rel=1e-6)
            log_r = clip(-d, -20, 20)  # log(pi_ref / pi), clamped before exp
            assert k3[i, t].item() == pytest.approx(min(math.exp(log_r) - 1 - log_r, 10.0), rel=1e-5, abs=1e-6)
    assert k3[0, 1].item() == 0.0 and (k3 >= 0).all() and torch.isfinite(k3).all()
    assert k3[1, 1].item() == 10.0  # log ratio -39.9: the clamp keeps the loss finite


def test_overlong_penalty():
    got = grpo.overlong_penalty([10, 12, 14, 16], max_len=16, buffer=4, penalty=1.0)
    assert got.tolist() == [0.0, 0.0, -0.5, -1.0]
    assert grpo.overlong_penalty([16], 16, 0, 1.0).tolist() == [0.0]


@pytest.mark.parametrize("variant", ["ppo", "gspo", "gmpo"])
@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_give_the_same_loss_and_gradient(variant, agg):
    """Global counts computed before the micro-batch loop: the sum of micro-batch losses (and gradients) equals the
    loss of the whole batch, whatever the split and the micro-batches' own padding widths."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 7, 2, 4]
    mask = mask_from(lengths, 7)
    old = -torch.rand(6, 7, generator=g) * 3
    start = old + torch.randn(6, 7, generator=g) * 0.3
    adv = torch.randn(6, generator=g)[:, None] * mask
    kw = dict(variant=variant, clip_low=0.1, clip_high=0.2, agg=agg, norm_len=7)

    full = start.clone().requires_grad_(True)
    loss_full, _ = grpo.policy_loss(full, old, adv, mask, **kw)
    loss_full.backward()

    accum = start.clone().requires_grad_(True)
    n_tok, n_seq = float(mask.sum()), 6.0
    total = 0.0
    for rows in ([0, 1], [2, 3, 4], [5]):
        width = max(lengths[r] for r in rows)  # each micro-batch trimmed to its own longest row
        loss, _ = grpo.policy_loss(
            accum[rows, :width],
            old[rows, :width],
            adv[rows, :width],
            mask[rows, :width],
            n_tokens=n_tok,
            n_seqs=n_seq,
            **kw,
        )
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(loss_full.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(accum.grad, full.grad, atol=1e-6)
    assert full.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- end to end
def prompt_parity(completions, prompts=None, answers=None, **kwargs):
    """Depends on the prompt only, so every group's rewards are equal."""
    return [float(int(a) % 2) for a in answers]


def raise_on_odd_answer(completions, prompts=None, answers=None, **kwargs):
    if len(completions) > 1 or int(answers[0]) % 2:
        raise RuntimeError("reward service exploded")
    return [1.0]


def tiny_args(tiny_model_dir, arith_small, out, **overrides):
    base = dict(
        model_path=tiny_model_dir,
        dataset=str(arith_small / "train.jsonl"),
        eval_dataset=None,
        output_dir=str(out),
        max_steps=2,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=8,
        lr=1e-3,
        dtype="float32",
        rewards=("conftest:vowel_fraction",),
        export=False,
        micro_batch_size=8,
        dynamic_sampling=False,
    )
    return grpo.Args(**{**base, **overrides})


def test_tiny_model_learns_a_learnable_reward(sharper_tiny_model_dir, arith_small, tmp_path):
    grpo.main(
        tiny_args(
            sharper_tiny_model_dir,
            arith_small,
            tmp_path,
            max_steps=20,
            prompts_per_step=4,
            group_size=8,
            lr=1e-2,
            save_rollouts=True,
        )
    )
    curve = [r["reward/mean"] for r in read_metrics(tmp_path) if "reward/mean" in r]
    assert len(curve) == 20
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last > first + 0.25, curve  # measured: 0.37 -> 0.67 (first and last three steps; it rises from step 10)
    rows = read_metrics(tmp_path)
    for key in (
        "train/entropy",
        "train/clip_fraction",
        "train/approx_kl",
        "completion/length_mean",
        "time/rollout_share",
        "reward/conftest:vowel_fraction_std",
    ):
        assert key in rows[0], key
    # fp32, mu=1: the sampler's logps of the first step's rollouts are the training forward's (logged, not used)
    assert rows[0]["rollout/train_vs_sampler_ratio_mean"] == pytest.approx(1.0, abs=1e-3)
    assert rows[0]["rollout/train_vs_sampler_abs_logp_diff_mean"] < 1e-4
    # the rollouts file: G rows per prompt, advantages = the grpo formula on the logged rewards
    saved = [r for r in read_jsonl(tmp_path / "rollouts.jsonl") if r["step"] == 1]
    assert len(saved) == 32
    expected = expected_group_adv([r["reward"] for r in saved], 8, "grpo")
    assert [r["advantage"] for r in saved] == pytest.approx(expected, abs=1e-4)


def test_dynamic_sampling_drops_equal_groups_and_failing_rewards_are_counted(tiny_model_dir, arith_small, tmp_path):
    grpo.main(
        tiny_args(
            tiny_model_dir,
            arith_small,
            tmp_path / "ds",
            max_steps=1,
            dynamic_sampling=True,
            max_resample=1,
            rewards=("test_grpo:prompt_parity",),
        )
    )
    row = read_metrics(tmp_path / "ds")[0]
    assert row["rollout/filtered_group_fraction"] == 1.0  # 2 rounds x 4 groups, all degenerate
    assert row["train/loss"] == 0.0 and row["train/grad_norm"] == 0.0

    grpo.main(
        tiny_args(
            tiny_model_dir,
            arith_small,
            tmp_path / "fail",
            max_steps=1,
            rewards=("test_grpo:raise_on_odd_answer", "conftest:vowel_fraction"),
        )
    )
    row = read_metrics(tmp_path / "fail")[0]
    assert row["reward/test_grpo:raise_on_odd_answer_failures"] > 0  # counted, and the run went on
    assert row["reward/conftest:vowel_fraction_failures"] == 0
    assert math.isfinite(row["train/loss"]) and row["step"] == 1


@pytest.mark.slow
def test_resume_is_exact(tiny_model_dir, arith_small, tmp_path, monkeypatch):
    """4 steps straight == 2 steps, SIGTERM (preemption), then --resume: same rollouts, rewards, losses, weights."""
    kw = dict(max_steps=4, export=True, mu=2, mini_batches=2, kl_coef=0.05)
    grpo.main(tiny_args(tiny_model_dir, arith_small, tmp_path / "straight", **kw))
    original_log = RunLogger.log

    def log_then_preempt(self, metrics, step):
        original_log(self, metrics, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunLogger, "log", log_then_preempt)
    assert grpo.main(tiny_args(tiny_model_dir, arith_small, tmp_path / "resumed", **kw)) == {
        "step": 2,
        "preempted": True,
    }
    monkeypatch.setattr(RunLogger, "log", original_log)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert grpo.main(tiny_args(tiny_model_dir, arith_small, tmp_path / "resumed", resume=True, **kw))["step"] == 4
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("reward/mean", "train/loss", "train/kl", "train/clip_fraction", "completion/length_mean"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-6), key
    assert any(r["train/clip_fraction"] > 0 or r["train/approx_kl"] > 0 for r in a)  # mu=2 really reused rollouts
    from safetensors.torch import load_file

    wa, wb = (
        load_file(tmp_path / "straight/model/model.safetensors"),
        load_file(tmp_path / "resumed/model/model.safetensors"),
    )
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_dry_run_prints_plan(tiny_model_dir, arith_small, tmp_path, capsys):
    assert grpo.main(tiny_args(tiny_model_dir, arith_small, tmp_path, dry_run=True)) is None
    assert "[plan]" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="group-size >= 2"):
        grpo.main(tiny_args(tiny_model_dir, arith_small, tmp_path, group_size=1))


@pytest.mark.slow
def test_torchrun_fsdp2_two_processes(tiny_model_dir, arith_small, vowel_reward_model_dir, tmp_path):
    """2 ranks under FSDP2: generation with synced_gpus, global normalisation, KL reference, a sharded reward model
    (its scores equal one process's), checkpoint and export."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "grpo.py",
        "--model-path",
        tiny_model_dir,
        "--dataset",
        str(arith_small / "train.jsonl"),
        "--eval-dataset",
        str(arith_small / "test.jsonl"),
        "--eval-samples",
        "4",
        "--max-steps",
        "2",
        "--prompts-per-step",
        "4",
        "--group-size",
        "2",
        "--max-new-tokens",
        "8",
        "--dtype",
        "float32",
        "--kl-coef",
        "0.1",
        "--rewards",
        "math",
        "conftest:vowel_fraction",
        "--reward-model",
        vowel_reward_model_dir,
        "--save-rollouts",
        "--output-dir",
        str(tmp_path),
    ]
    env = {**subprocess_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path) if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) and r["train/kl"] >= 0 for r in rows)
    assert rows[0]["train/kl"] == 0.0  # the reference's shards are a copy of the policy's: step 1 equal
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_0000002"]
    assert "accuracy after training" in run.stdout
    # rank 0's rollouts, scored again by the unsharded reward model in this process: the same scores
    from common.models import load_processor
    from common.rollout import prompt_records, render_prompt
    from common.run import Run
    from common.value import load_value_model, score_chats

    processor = load_processor(tiny_model_dir)
    by_text = {
        render_prompt(processor.tokenizer, m): m for m, _ in prompt_records(str(arith_small / "train.jsonl"), processor)
    }
    saved = read_jsonl(tmp_path / "rollouts.jsonl")
    chats = [(by_text[r["prompt"]] + [{"role": "assistant", "content": r["completion"]}], ".") for r in saved]
    rm, rm_processor = load_value_model(vowel_reward_model_dir, device="cpu", zero_new_head=False)
    scores = score_chats(rm, rm_processor, chats, Run(0, 1, torch.device("cpu"), torch.float32), batch_size=4)
    assert [r["rewards"]["reward_model"] for r in saved] == pytest.approx(scores.tolist(), abs=1e-5)


def test_tis_cap_weights_the_loss_by_the_capped_sampler_ratio(tiny_model_dir, arith_small, tmp_path):
    """fp32: the sampler's logps equal the trainer's, so the TIS weight min(pi_old / pi_sampler, C) is 1 (C = 2: the
    loss is unchanged, nothing capped) or exactly C (C = 0.5: the first step's loss halves, every token capped)."""
    first = {}
    for name, cap in (("off", None), ("two", 2.0), ("half", 0.5)):
        grpo.main(tiny_args(tiny_model_dir, arith_small, tmp_path / name, max_steps=1, tis_cap=cap))
        first[name] = read_metrics(tmp_path / name)[0]
    assert first["two"]["train/loss"] == pytest.approx(first["off"]["train/loss"], rel=1e-4, abs=1e-7)
    assert first["two"]["rollout/tis_capped_fraction"] == 0.0 and "rollout/tis_capped_fraction" not in first["off"]
    assert first["half"]["train/loss"] == pytest.approx(0.5 * first["off"]["train/loss"], rel=1e-4, abs=1e-7)
    assert first["half"]["rollout/tis_capped_fraction"] == 1.0
    assert first["off"]["train/loss"] != 0.0


def test_token_budget_micro_batches_change_no_number(tiny_model_dir, arith_small, tmp_path):
    """--max-tokens-per-micro-batch packs completions into rows of at most that many tokens; the losses (mu 2 x 2
    mini-batches, so the old-logp pass and the reference pass are packed too) equal the padded micro-batches'."""
    curves = {}
    for name, budget in (("padded", 0), ("packed", 300)):
        grpo.main(tiny_args(tiny_model_dir, arith_small, tmp_path / name, max_steps=2, mu=2, mini_batches=2,
                            kl_coef=0.1, max_tokens_per_micro_batch=budget))  # fmt: skip
        curves[name] = [(r["train/loss"], r["train/kl"], r["reward/mean"]) for r in read_metrics(tmp_path / name)]
    assert len(curves["packed"]) == 2
    for a, b in zip(curves["padded"], curves["packed"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_all_reduced_names_do_not_depend_on_what_a_rank_saw(tiny_model_dir, arith_small, tmp_path, monkeypatch):
    """Ranks all-reduce their step totals as one vector, in name order: a name only some ranks have (a math-verify
    outcome one rank met, say) shifts every value after it and desynchronises the collectives (it crashed 2-rank runs
    on SmolLM2-135M). Here a run that starts with verifier counts left over must reduce exactly the same names."""
    from common.rewards import VERIFY_STATS

    calls = []

    def recording(values, run, op="sum"):
        calls[-1].append(list(values))
        return {k: float(v) for k, v in values.items()}

    monkeypatch.setattr(grpo, "all_reduce_sums", recording)
    for name, leftover in (("clean", {}), ("leftover", {"timeout": 3, "error": 1})):
        VERIFY_STATS.clear()
        VERIFY_STATS.update(leftover)
        calls.append([])
        grpo.main(tiny_args(tiny_model_dir, arith_small, tmp_path / name, max_steps=1, rewards=("math",)))
    assert calls[0] == calls[1] and any("verify_timeout" in names for names in calls[0])


@pytest.fixture(scope="module")
def vowel_reward_model_dir(tmp_path_factory):
    """A reward model built by hand to prefer vowels. Each token's embedding is (f, 1 - f, 0, ...), f the share of
    vowels among its letters; one layer whose attention is uniform (zero queries and keys, identity values and output)
    puts the mean of the chat's normalised embeddings at the last position, and the score head reads dimension 0: the
    score rises with the share of vowel-heavy tokens in the chat. conftest.vowel_fraction measures the same preference
    on the text, independently of the model."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from common.models import load_tokenizer

    tokenizer, H = load_tokenizer("smollm2-135m"), 16
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=H, intermediate_size=4, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=H, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForSequenceClassification(config)
    vowels = torch.tensor([conftest_vowel_fraction(tokenizer.decode([i])) for i in range(len(tokenizer))])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm,
                     model.model.norm):  # fmt: skip
            norm.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, 0], model.model.embed_tokens.weight[:, 1] = vowels, 1 - vowels
        model.model.layers[0].self_attn.v_proj.weight.copy_(torch.eye(H))
        model.model.layers[0].self_attn.o_proj.weight.copy_(torch.eye(H))
        model.score.weight[0, 0] = 1.0
    folder = tmp_path_factory.mktemp("vowel-rm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def conftest_vowel_fraction(text):
    from conftest import vowel_fraction

    return vowel_fraction([text])[0]


def test_reward_model_scores_a_vowel_heavy_chat_higher(vowel_reward_model_dir):
    from common.run import Run
    from common.value import load_value_model, score_chats

    model, processor = load_value_model(vowel_reward_model_dir, device="cpu", zero_new_head=False)
    prompt = [{"role": "user", "content": "Say something."}]
    chats = [(prompt + [{"role": "assistant", "content": text}], ".") for text in ("rhythm strength", "aiea eau ou")]
    scores = score_chats(model, processor, chats, Run(0, 1, torch.device("cpu"), torch.float32), batch_size=2)
    assert scores[1] > scores[0] + 0.1, scores


def test_reward_model_is_one_more_reward_that_the_policy_learns(
    sharper_tiny_model_dir, arith_small, vowel_reward_model_dir, tmp_path
):
    """--reward-model alone drives the policy (the vowel reward has weight 0: logged, not trained on), and the policy
    learns what the reward model prefers: its score rises, and so does the vowel share that the text itself shows."""
    grpo.main(tiny_args(sharper_tiny_model_dir, arith_small, tmp_path, max_steps=20, group_size=8, lr=1e-2,
                        reward_model=vowel_reward_model_dir, reward_weights=(0.0, 1.0)))  # fmt: skip
    rows = [r for r in read_metrics(tmp_path) if "reward/mean" in r]
    assert len(rows) == 20
    for r in rows:  # the step's reward is the reward model's score alone
        assert r["reward/mean"] == pytest.approx(r["reward/reward_model_mean"], abs=1e-5)
        assert r["reward/reward_model_failures"] == 0 and r["reward/reward_model_std"] > 0

    def rise(key):
        curve = [r[key] for r in rows]
        return sum(curve[-3:]) / 3 - sum(curve[:3]) / 3, curve

    # measured (the first three steps' mean and the last three's): score 1.28 -> 1.44, vowel share 0.37 -> 0.67; both
    # rise from step 10 on (the score is the reward model's, so less steep than the share it learned to read)
    assert rise("reward/reward_model_mean")[0] > 0.1, rise("reward/reward_model_mean")
    assert rise("reward/conftest:vowel_fraction_mean")[0] > 0.15, rise("reward/conftest:vowel_fraction_mean")


def test_reward_model_weights_count_is_checked(tiny_model_dir, arith_small, vowel_reward_model_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"2 rewards \(conftest:vowel_fraction, reward_model\) but 1 weights"):
        grpo.main(tiny_args(tiny_model_dir, arith_small, tmp_path, reward_model=vowel_reward_model_dir,
                            reward_weights=(1.0,)))  # fmt: skip
