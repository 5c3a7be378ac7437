"""ppo.py: GAE, whitening, value clipping, the PPO loss and the adaptive KL controller against plain-Python formulas on
small hand-made tensors; end-to-end runs on a tiny random-init model (learning, critic warm-up, torchrun FSDP2 with a
reward model and a critic started from it, exact resume)."""

import math
import os
import signal
import statistics
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, subprocess_env

import ppo
from common.checkpoint import checkpoint_dirs
from common.models import load_tokenizer
from common.run import RunLogger, read_metrics

# uneven masks: a gap inside row 0 (skipped, not a break), row 1 runs to the last column, row 2 is empty
MASK = torch.tensor(
    [
        [False, True, True, False, True, False],
        [False, False, True, True, True, True],
        [False, False, False, False, False, False],
        [True, False, False, False, False, False],
    ]
)
REWARDS = torch.tensor(
    [
        [9.0, 0.1, -0.2, 9.0, 1.0, 9.0],  # 9.0 sits at masked positions and must be ignored
        [9.0, 9.0, 0.0, 0.3, 0.0, 2.0],
        [9.0, 9.0, 9.0, 9.0, 9.0, 9.0],
        [0.7, 9.0, 9.0, 9.0, 9.0, 9.0],
    ]
)
VALUES = torch.tensor(
    [
        [5.0, 0.5, 0.2, 5.0, 0.9, 5.0],
        [5.0, 5.0, 0.4, -0.1, 0.6, 1.5],
        [5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
        [0.3, 5.0, 5.0, 5.0, 5.0, 5.0],
    ]
)


def gae_by_hand(rewards, values, mask, gamma, lam):
    """The textbook backward recursion over each row's response positions only, in plain Python."""
    adv = [[0.0] * len(row) for row in mask]
    for b, row in enumerate(mask):
        steps = [t for t, m in enumerate(row) if m]
        running, next_value = 0.0, 0.0  # the last response token bootstraps from 0
        for t in reversed(steps):
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            adv[b][t] = running
            next_value = values[b][t]
    return adv


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_python_loop(gamma, lam):
    adv, ret = ppo.gae(REWARDS, VALUES, MASK, gamma, lam)
    expected = gae_by_hand(REWARDS.tolist(), VALUES.tolist(), MASK.tolist(), gamma, lam)
    for b in range(4):
        for t in range(6):
            m = MASK[b, t].item()
            assert adv[b, t].item() == pytest.approx(expected[b][t] if m else 0.0, abs=1e-6)
            assert ret[b, t].item() == pytest.approx(expected[b][t] + VALUES[b, t].item() if m else 0.0, abs=1e-6)


def test_gae_edge_lambdas():
    """lam = 1: discounted Monte-Carlo return minus the value; lam = 0: the one-step TD residual."""
    gamma = 0.9
    mc, _ = ppo.gae(REWARDS, VALUES, MASK, gamma, 1.0)
    td, _ = ppo.gae(REWARDS, VALUES, MASK, gamma, 0.0)
    for b in range(4):
        steps = [t for t in range(6) if MASK[b, t]]
        for k, t in enumerate(steps):
            later = steps[k:]
            g = sum(gamma**j * REWARDS[b, s].item() for j, s in enumerate(later))
            assert mc[b, t].item() == pytest.approx(g - VALUES[b, t].item(), abs=1e-6)
            next_v = VALUES[b, steps[k + 1]].item() if k + 1 < len(steps) else 0.0
            assert td[b, t].item() == pytest.approx(
                REWARDS[b, t].item() + gamma * next_v - VALUES[b, t].item(), abs=1e-6
            )
    assert mc[2].abs().sum() == 0 and td[2].abs().sum() == 0  # an empty response gets nothing


def test_fresh_critic_advantages_follow_the_reward_only_with_lambda_1():
    """Why --lam defaults to 1: with a new critic (values 0) and lam < 1, GAE scales the final reward by lam^(tokens to
    the end), so after whitening the first tokens of a right answer (reward 2: math + format) get negative advantages
    and the last tokens of a wrong one (reward 1) positive ones; with lam = 1 every token's sign follows the reward."""
    rewards = torch.tensor([2.0] * 11 + [1.0] * 5)  # 16 completions of 30 tokens, 11 right
    token_rewards, mask = torch.zeros(16, 30), torch.ones(16, 30, dtype=torch.bool)
    token_rewards[:, -1] = rewards
    wrong_sign = {}
    for lam in (0.95, 1.0):
        advantages = ppo.whiten(ppo.gae(token_rewards, torch.zeros(16, 30), mask, 1.0, lam)[0], mask)
        wrong_sign[lam] = ((advantages > 0) != (rewards[:, None] > 1.5)).float().mean().item()
        if lam == 0.95:
            assert advantages[0, 0] < 0 and advantages[-1, -1] > 0
    assert wrong_sign[1.0] == 0.0 and wrong_sign[0.95] > 0.3


def test_whiten_over_the_mask():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 6, generator=g) * 3 + 2
    out = ppo.whiten(values, MASK)
    picked = out[MASK].tolist()
    assert statistics.mean(picked) == pytest.approx(0.0, abs=1e-6)
    assert statistics.stdev(picked) == pytest.approx(1.0, abs=1e-6)
    assert out[~MASK].abs().sum() == 0
    kept = ppo.whiten(values, MASK, shift_mean=False)[MASK].tolist()
    assert statistics.mean(kept) == pytest.approx(statistics.mean(values[MASK].tolist()), abs=1e-5)
    assert statistics.stdev(kept) == pytest.approx(1.0, abs=1e-6)


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[1.0, 2.0, 0.5, 3.0, 100.0]])
    old = torch.tensor([[0.5, 2.1, 1.0, 1.0, -100.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0, 1.5, 0.0]])
    mask = torch.tensor([[True, True, True, True, False]])  # the last token is padding
    # token 0: clipped value 0.7 -> (0.7-2)^2 = 1.69 > (1-2)^2 = 1       (clipped term wins)
    # token 1: |2.0-2.1| < 0.2, both terms (2-1)^2 = 1                   (not clipped)
    # token 2: clipped value 0.8 -> 0.64 > 0.25                          (clipped term wins)
    # token 3: clipped value 1.2 -> 0.09 < (3-1.5)^2 = 2.25              (unclipped wins)
    loss, clip_fraction = ppo.value_loss(values, old, returns, mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 0.64 + 2.25) / 4, rel=1e-6)
    assert clip_fraction.item() == pytest.approx(2 / 4)
    plain, none_clipped = ppo.value_loss(values, old, returns, mask, None)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 1.0 + 0.25 + 2.25) / 4, rel=1e-6)
    assert none_clipped.item() == 0.0
    # a global token count (gradient accumulation) only changes the divisor
    assert ppo.value_loss(values, old, returns, mask, 0.2, n_tokens=8)[0].item() == pytest.approx(loss.item() / 2)


def test_policy_loss_matches_formula():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    logps = torch.tensor([[-1.0, -0.5, 0.0], [-0.1, 0.0, 0.0]])
    old = torch.tensor([[-1.5, -0.4, -9.0], [-0.9, 0.0, 0.0]])
    adv = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 0.0]])
    loss, stats = ppo.policy_loss(logps, old, adv, mask, clip_low=0.2, clip_high=0.28)
    terms, clipped = [], 0
    for b, t in [(0, 0), (0, 1), (1, 0)]:
        a, r = adv[b, t].item(), math.exp(logps[b, t].item() - old[b, t].item())
        unclipped, clip_term = -a * r, -a * min(max(r, 0.8), 1.28)
        terms.append(max(unclipped, clip_term))
        clipped += clip_term > unclipped
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(clipped / 3) and clipped > 0


def test_adaptive_kl_controller_by_hand():
    # KL above target: the error is clipped at +0.2; below: -1/6 unclipped
    assert ppo.adaptive_kl_coef(0.1, 8.0, 6.0, 256, 10000) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    assert ppo.adaptive_kl_coef(0.1, 5.0, 6.0, 256, 10000) == pytest.approx(0.1 * (1 - (1 / 6) * 256 / 10000))


# ------------------------------------------------------------------------------------------- end to end
def tiny_args(model_dir, arith_small, out, **overrides):
    base = dict(
        model_path=model_dir,
        dataset=str(arith_small / "train.jsonl"),
        eval_samples=0,
        output_dir=str(out),
        max_steps=2,
        prompts_per_step=4,
        max_new_tokens=8,
        mu=2,  # two epochs x two mini-batches: the old-vs-new policy ratio moves within a step
        mini_batches=2,
        lr=1e-3,
        critic_lr=1e-3,
        dtype="float32",
        rewards=("conftest:vowel_fraction",),
        export=False,
        micro_batch_size=8,
    )
    return ppo.Args(**{**base, **overrides})


def test_tiny_model_learns_a_learnable_reward(sharper_tiny_model_dir, arith_small, tmp_path):
    """One completion per prompt, the critic as the only baseline (lam=1: A = return - V); one update per step."""
    ppo.main(
        tiny_args(
            sharper_tiny_model_dir,
            arith_small,
            tmp_path,
            max_steps=12,
            prompts_per_step=16,
            lr=2e-2,
            critic_lr=5e-4,
            lam=1.0,
            mu=1,
            mini_batches=1,
            kl_coef=0.0,
            seed=1,  # at lr 2e-2 some seeds stall on a plateau: on the regenerated data seed 0 went 0.38 -> 0.45
        )
    )
    rows = [r for r in read_metrics(tmp_path) if "reward/mean" in r]
    curve = [r["reward/mean"] for r in rows]
    assert len(curve) == 12
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last > first + 0.15, curve  # measured: 0.38 -> 0.58 (seed 2: 0.43 -> 0.63)
    for key in (
        "reward/std",
        "train/value_loss",
        "train/explained_variance",
        "train/policy_clip_fraction",
        "train/value_clip_fraction",
        "train/kl",
        "train/entropy",
        "completion/length_mean",
        "time/rollout_share",
    ):
        assert key in rows[0] and math.isfinite(rows[0][key]), key


def test_critic_warmup_leaves_the_actor_untouched(tiny_model_dir, arith_small, tmp_path):
    from safetensors.torch import load_file

    ppo.main(tiny_args(tiny_model_dir, arith_small, tmp_path, max_steps=1, critic_warmup_steps=1, export=True))
    row = read_metrics(tmp_path)[0]
    assert "train/policy_loss" not in row and row["train/value_loss"] > 0
    before, after = (
        load_file(f"{tiny_model_dir}/model.safetensors"),
        load_file(tmp_path / "model" / "model.safetensors"),
    )
    assert all(torch.equal(before[k], after[k]) for k in before)
    critic = load_file(tmp_path / "critic" / "model.safetensors")
    assert critic["score.weight"].abs().sum() > 0  # the zero-initialised value head did learn
    assert not torch.equal(critic["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])


def test_missing_default_model_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"run `python sft.py` first .* --model-path smollm2-135m"):
        ppo.main(ppo.Args())


@pytest.fixture(scope="module")
def tiny_reward_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model as a sequence-classification folder (random head): a reward model and critic start."""
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-rm")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = 2
    model.save_pretrained(folder)
    load_tokenizer(tiny_model_dir).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_torchrun_fsdp2_two_processes(tiny_model_dir, tiny_reward_model_dir, arith_small, tmp_path):
    """2 ranks under FSDP2: actor, critic (from the reward model), reference and reward model all sharded; adaptive KL;
    checkpoint and both exports."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "ppo.py",
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
        "--max-new-tokens",
        "8",
        "--dtype",
        "float32",
        "--kl-target",
        "1.0",
        "--reward-model",
        tiny_reward_model_dir,
        "--critic-path",
        tiny_reward_model_dir,
        "--rewards",
        "conftest:vowel_fraction",
        "--output-dir",
        str(tmp_path),
    ]
    env = {**subprocess_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path) if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["train/value_loss"]) and r["reward/reward_model_mean"] != 0 for r in rows)
    assert rows[1]["train/kl_coef"] != rows[0]["train/kl_coef"]  # the adaptive controller moved beta
    assert rows[0]["train/kl"] == 0.0  # the reference's shards are a copy of the actor's: step 1 equal
    assert (tmp_path / "model" / "model.safetensors").exists() and (tmp_path / "critic" / "model.safetensors").exists()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_0000002"]
    assert "accuracy after training" in run.stdout


@pytest.mark.slow
def test_resume_is_exact(tiny_model_dir, arith_small, tmp_path, monkeypatch):
    """4 steps straight == 2 steps, SIGTERM (preemption), then --resume: same rollouts, rewards, losses, KL coefficient
    (adaptive) and weights of both actor and critic."""
    kw = dict(max_steps=4, export=True, mu=2, mini_batches=2, kl_target=0.5, kl_horizon=100, critic_warmup_steps=1)
    ppo.main(tiny_args(tiny_model_dir, arith_small, tmp_path / "straight", **kw))
    original_log = RunLogger.log

    def log_then_preempt(self, metrics, step):
        original_log(self, metrics, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunLogger, "log", log_then_preempt)
    assert ppo.main(tiny_args(tiny_model_dir, arith_small, tmp_path / "resumed", **kw)) == {
        "step": 2,
        "preempted": True,
    }
    monkeypatch.setattr(RunLogger, "log", original_log)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert ppo.main(tiny_args(tiny_model_dir, arith_small, tmp_path / "resumed", resume=True, **kw))["step"] == 4
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in (
        "reward/mean",
        "train/value_loss",
        "train/kl",
        "train/kl_coef",
        "completion/length_mean",
        "train/explained_variance",
    ):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-5), key
    assert [r.get("train/policy_loss") for r in a] == pytest.approx([r.get("train/policy_loss") for r in b], abs=1e-5)
    assert len({r["train/kl_coef"] for r in a}) == 4  # beta moved every step, so its checkpointed value mattered
    assert any(r.get("train/policy_clip_fraction", 0) > 0 for r in a)  # mu=2 x 2 mini-batches really reused rollouts
    from safetensors.torch import load_file

    for folder in ("model", "critic"):
        wa, wb = (load_file(tmp_path / run / folder / "model.safetensors") for run in ("straight", "resumed"))
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6, folder


def test_token_budget_micro_batches_change_no_number(tiny_model_dir, arith_small, tmp_path):
    """ppo.py --max-tokens-per-micro-batch: the actor's and the critic's losses equal the padded micro-batches'."""
    curves = {}
    for name, budget in (("padded", 0), ("packed", 300)):
        ppo.main(
            tiny_args(tiny_model_dir, arith_small, tmp_path / name, max_steps=2, max_tokens_per_micro_batch=budget)
        )
        rows = read_metrics(tmp_path / name)
        curves[name] = [(r["train/policy_loss"], r["train/value_loss"], r["reward/mean"]) for r in rows]
    assert len(curves["packed"]) == 2
    for a, b in zip(curves["padded"], curves["packed"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_loo_centred_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])  # two prompts x n = 3
    # prompt 0: 1 - (0 + 0) / 2 = 1, 0 - (1 + 0) / 2 = -0.5 (twice); prompt 1: all equal, so all 0
    assert torch.allclose(ppo.loo_centred(scores, 3), torch.tensor([1.0, -0.5, -0.5, 0.0, 0.0, 0.0]))
    assert torch.equal(ppo.loo_centred(scores, 1), scores)


def test_group_size_centres_each_prompts_scores(tiny_model_dir, arith_small, tmp_path):
    """A reward equal across a prompt's completions: with G = 2 the leave-one-out baseline removes all of it, so the
    returns are 0 and the zero-initialised critic (values 0) has nothing to fit; with G = 1 the returns are the reward."""
    common = dict(max_steps=1, rewards=("conftest:answer_digits",), kl_coef=0.0, mu=1, mini_batches=1)
    ppo.main(tiny_args(tiny_model_dir, arith_small, tmp_path / "g2", group_size=2, **common))
    ppo.main(tiny_args(tiny_model_dir, arith_small, tmp_path / "g1", group_size=1, **common))
    g2, g1 = read_metrics(tmp_path / "g2")[0], read_metrics(tmp_path / "g1")[0]
    assert g2["reward/mean"] >= 1.0 and g1["reward/mean"] >= 1.0  # the raw reward is logged as it is
    assert g2["train/return_mean"] == 0.0 and g2["train/value_loss"] == 0.0
    assert g1["train/return_mean"] >= 1.0 and g1["train/value_loss"] > 0.4  # 0.5 * mean(R^2) with R >= 1
