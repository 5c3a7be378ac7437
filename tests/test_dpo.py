"""dpo.py: every loss against hand-computed values, and end to end on a tiny random-init model of SmolLM2's family
(real tokenizer, the bundled arithmetic preference pairs)."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, plain_greedy_accuracy, subprocess_env
from safetensors.torch import load_file

import dpo
from common.checkpoint import checkpoint_dirs
from common.cli import cli
from common.data import load_records
from common.models import load_model, load_processor
from common.run import RunLogger, read_metrics


def sig(x):
    return 1 / (1 + math.exp(-x))


def logsig(x):
    return math.log(sig(x))


def tiny_args(tiny_model_dir, pref_small, out, **overrides):
    base = dict(
        model_path=tiny_model_dir,
        dataset=str(pref_small / "train.jsonl"),
        eval_dataset=str(pref_small / "test.jsonl"),
        output_dir=str(out),
        ref_cache_dir=str(Path(out) / "ref-cache"),
        eval_samples=0,
        max_steps=6,
        lr=3e-3,
        warmup_steps=1,
        batch_size=8,
        max_len=256,
        dtype="float32",
        save_every=0,
        eval_every=0,
        export=False,
    )
    return dpo.Args(**{**base, **overrides})


def train_rows(out) -> list[dict]:
    return [r for r in read_metrics(out) if "train/loss" in r]


# ---------------------------------------------------------------------------------------------- losses
# two pairs: (policy chosen, policy rejected, ref chosen, ref rejected)
PC, PR, RC, RR = [-10.0, -3.0], [-12.0, -2.0], [-11.0, -2.5], [-11.5, -2.2]


def by_hand(loss_type, beta, eps=0.0, gamma=0.5, kl=0.0):
    """Per-pair losses written out from the papers' formulas with the math module."""
    out = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        h = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            out.append(-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - beta * h))
        elif loss_type == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        elif loss_type == "robust":
            out.append((-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps))
        elif loss_type == "simpo":
            z = beta * (pc - pr) - gamma
            out.append(-(1 - eps) * logsig(z) - eps * logsig(-z))
        elif loss_type == "orpo":
            # odds = p / (1 - p) with p = exp(logp)
            log_odds = math.log(math.exp(pc) / (1 - math.exp(pc))) - math.log(math.exp(pr) / (1 - math.exp(pr)))
            out.append(-beta * logsig(log_odds))
        elif loss_type == "kto":
            out.append(((1 - sig(beta * ((pc - rc) - kl))) + (1 - sig(beta * (kl - (pr - rr))))) / 2)
    return out


@pytest.mark.parametrize(
    "loss_type,beta,eps",
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 0.5, 0.2),
        ("hinge", 0.3, 0.0),
        ("ipo", 0.5, 0.0),
        ("robust", 0.1, 0.0),
        ("robust", 0.5, 0.2),
        ("simpo", 2.0, 0.0),
        ("simpo", 2.0, 0.1),
        ("orpo", 0.25, 0.0),
        ("kto", 0.1, 0.0),
    ],
)
def test_loss_values_by_hand(loss_type, beta, eps):
    kl = torch.tensor(0.3) if loss_type == "kto" else None
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    losses, chosen_rewards, rejected_rewards = dpo.preference_loss(
        t(PC), t(PR), t(RC), t(RR), loss_type=loss_type, beta=beta, label_smoothing=eps, gamma=0.5, kl=kl
    )
    expected = by_hand(loss_type, beta, eps, gamma=0.5, kl=0.3)
    assert losses.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    if loss_type in ("simpo", "orpo"):  # reference-free rewards
        assert chosen_rewards.tolist() == pytest.approx([beta * x for x in PC])
        assert rejected_rewards.tolist() == pytest.approx([beta * x for x in PR])
    else:
        assert chosen_rewards.tolist() == pytest.approx([beta * (a - b) for a, b in zip(PC, RC)])
        assert rejected_rewards.tolist() == pytest.approx([beta * (a - b) for a, b in zip(PR, RR)])


def test_cdpo_and_robust_differ_and_reduce_to_dpo():
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    plain = dpo.preference_loss(t(PC), t(PR), t(RC), t(RR), loss_type="sigmoid", beta=0.1)[0]
    robust0 = dpo.preference_loss(t(PC), t(PR), t(RC), t(RR), loss_type="robust", beta=0.1)[0]
    assert torch.allclose(plain, robust0)  # no flips assumed: both are DPO
    cdpo = dpo.preference_loss(t(PC), t(PR), t(RC), t(RR), loss_type="sigmoid", beta=0.1, label_smoothing=0.2)[0]
    robust = dpo.preference_loss(t(PC), t(PR), t(RC), t(RR), loss_type="robust", beta=0.1, label_smoothing=0.2)[0]
    assert not torch.allclose(cdpo, plain) and not torch.allclose(robust, cdpo)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.preference_loss(t(PC), t(PR), t(RC), t(RR), loss_type="robust", beta=0.1, label_smoothing=0.5)


@pytest.mark.parametrize("loss_type", dpo.LOSS_TYPES)
def test_gradient_pushes_chosen_up_and_rejected_down(loss_type):
    # at the reference (h = 0) for every loss: ipo's (h - 1/(2 beta))^2 and hinge are on their active side there
    pc = torch.tensor([-1.5, -0.7], requires_grad=True)  # mean token logps, valid for orpo's odds
    pr = torch.tensor([-1.2, -0.9], requires_grad=True)
    losses, _, _ = dpo.preference_loss(
        pc, pr, pc.detach().clone(), pr.detach().clone(), loss_type=loss_type, beta=0.5, kl=torch.tensor(0.0)
    )
    losses.sum().backward()
    assert (pc.grad < 0).all(), pc.grad  # gradient descent raises the chosen logp...
    assert (pr.grad > 0).all(), pr.grad  # ...and lowers the rejected one


def test_dpo_at_the_reference_is_ln2():
    logps = torch.tensor([-20.0, -3.0, -57.5])
    for eps in (0.0, 0.1):
        losses, cr, rr = dpo.preference_loss(
            logps, logps - 1, logps, logps - 1, loss_type="sigmoid", beta=0.1, label_smoothing=eps
        )
        assert losses.tolist() == pytest.approx([math.log(2)] * 3)
        assert cr.abs().max() == 0 and rr.abs().max() == 0


def test_kto_kl_is_mean_clamped_and_detached():
    policy = torch.tensor([-5.0, -7.0], requires_grad=True)
    assert dpo.kto_kl(policy, torch.tensor([-6.0, -7.5])).item() == pytest.approx(0.75)
    assert dpo.kto_kl(policy, torch.tensor([-4.0, -6.0])).item() == 0.0  # mean -1 clamps to 0
    assert not dpo.kto_kl(policy, torch.tensor([-6.0, -7.5])).requires_grad


def test_unpaired_kto_loss_is_the_papers_equation_8():
    # Ethayarajh et al. 2024 (arXiv:2402.01306), eq. 8: L = E_{x,y}[lambda_y - v(x, y)], r = log pi/pi_ref, z0 >= 0,
    # v = lambda_D sigma(beta (r - z0)) for a desirable y, lambda_U sigma(beta (z0 - r)) for an undesirable one
    policy, ref = [-3.0, -8.5, -4.0, -6.25, -2.0], [-3.5, -7.0, -5.5, -6.0, -2.1]
    desirable, beta, lam_d, lam_u = [True, False, False, True, True], 0.3, 1.0, 1.33
    z0 = max(0.0, sum(p - r for p, r in zip(policy[1:] + policy[:1], ref)) / 5)  # mismatched pairs' log-ratio mean
    by_hand = []
    for p, r, good in zip(policy, ref, desirable):
        lam = lam_d if good else lam_u
        v = lam * sig(beta * ((p - r) - z0)) if good else lam * sig(beta * (z0 - (p - r)))
        by_hand.append(lam - v)
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    policy_logps = t(policy).requires_grad_()
    z = dpo.kto_kl(t(policy[1:] + policy[:1]), t(ref))
    losses, rewards = dpo.kto_loss(policy_logps - t(ref), torch.tensor(desirable), z, beta=beta, desirable_weight=lam_d,
                                   undesirable_weight=lam_u)  # fmt: skip
    assert z.item() == pytest.approx(z0) and losses.tolist() == pytest.approx(by_hand, rel=1e-12)
    assert rewards.tolist() == pytest.approx([beta * (p - r) for p, r in zip(policy, ref)])
    losses.mean().backward()  # the loss pulls desirable answers up and undesirable ones down
    assert all((g < 0) == good for g, good in zip(policy_logps.grad.tolist(), desirable))
    # paired KTO: the mean over a pair's desirable chosen and undesirable rejected answer, same weights
    pc, pr, rc, rr = t(policy[:2]), t(policy[2:4]), t(ref[:2]), t(ref[2:4])
    paired, _, _ = dpo.preference_loss(pc, pr, rc, rr, loss_type="kto", beta=beta, kl=z, desirable_weight=lam_d,
                                       undesirable_weight=lam_u)  # fmt: skip
    expected = [(lam_d - lam_d * sig(beta * ((a - b) - z0)) + lam_u - lam_u * sig(beta * (z0 - (c - d)))) / 2
                for a, b, c, d in zip(policy[:2], ref[:2], policy[2:4], ref[2:4])]  # fmt: skip
    assert paired.tolist() == pytest.approx(expected, rel=1e-12)


def test_unpaired_metrics_average_over_each_kind():
    # rows as example_losses makes them: loss, reward and logp as desirable / undesirable, sign right, indicators
    rows = torch.tensor([[0.4, 0.2, 0.0, 1.0, -3.0, 0.0, 1.0, 0.0], [0.6, 0.0, 0.1, 0.0, 0.0, -5.0, 0.0, 1.0],
                         [0.5, -0.1, 0.0, 0.0, -4.0, 0.0, 1.0, 0.0]])  # fmt: skip
    m = dpo.metric_means(rows.sum(0), 3, "eval", unpaired=True)
    assert m["eval/loss"] == pytest.approx(0.5) and m["eval/rewards/accuracies"] == pytest.approx(1 / 3)
    assert m["eval/rewards/chosen"] == pytest.approx(0.05) and m["eval/rewards/rejected"] == pytest.approx(0.1)
    assert m["eval/logps/chosen"] == pytest.approx(-3.5) and m["eval/logps/rejected"] == pytest.approx(-5.0)
    assert m["eval/rewards/margins"] == pytest.approx(-0.05) and "eval/logps_accuracy" not in m


# ------------------------------------------------------------------------------------------------- data
def test_bundled_pairs_are_correct_vs_wrong_worked_answers():
    import re

    from common.rewards import answer_correct

    pairs = [json.loads(line) for line in (ROOT / "data" / "arith_pref" / "train.jsonl").read_text().splitlines()]
    assert len(pairs) >= 300
    for p in pairs[:200]:
        assert answer_correct(p["chosen"], p["answer"]) and not answer_correct(p["rejected"], p["answer"])
        # the wrong one is a worked solution with the same number of steps and the same wording around them
        step = r"\d+ [-+*/] \d+ = \d+"
        assert len(re.findall(step, p["rejected"])) == len(re.findall(step, p["chosen"]))
        assert re.sub(r"\d+", "N", p["rejected"]) == re.sub(r"\d+", "N", p["chosen"])


def test_packed_and_padded_logps_match(tiny_model_dir, pref_small):
    from common.models import load_model, load_processor

    processor, model = load_processor(tiny_model_dir), load_model(tiny_model_dir)
    pairs, _ = dpo.build_pairs(str(pref_small / "train.jsonl"), processor, max_len=256)
    chunk = pairs[:6]
    with torch.no_grad():
        padded, n_padded = dpo.sequence_logps(model, dpo.collate_pairs(chunk, processor, packing=False, max_len=256))
        packed, n_packed = dpo.sequence_logps(model, dpo.collate_pairs(chunk, processor, packing=True, max_len=256))
        # one sequence alone, unpadded: the reference value for the first chosen answer
        alone, _ = dpo.sequence_logps(
            model, dpo.collate_pairs(chunk[:1], processor, packing=False, max_len=256, sides=("chosen",))
        )
    assert padded.shape == (12,) and torch.equal(n_padded, n_packed)
    n_answer = sum(t != -100 for t in chunk[2]["rejected"]["labels"])
    assert n_padded[6 + 2].item() == n_answer  # rows are chosen 0..5, then rejected 0..5
    assert torch.allclose(padded, packed, atol=1e-4), (padded - packed).abs().max()
    assert padded[0].item() == pytest.approx(alone[0].item(), abs=1e-4)


# ------------------------------------------------------------------------------------------ end to end
def test_reward_accuracy_on_training_pairs_and_metrics(tiny_model_dir, pref_small, tmp_path):
    result = dpo.main(tiny_args(tiny_model_dir, pref_small, tmp_path, max_steps=6, batch_size=16, export=True))
    rows = train_rows(tmp_path)
    assert len(rows) == 6
    # step 0: the policy is the reference, so every pair's loss is ln 2
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0]["train/rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    # measured: 0, 0.75, 0.81, 0.81, 0.88, 0.88 (14 of the 16 pairs after five updates)
    assert rows[-1]["train/rewards/accuracies"] >= 0.85, [r["train/rewards/accuracies"] for r in rows]
    assert rows[-1]["train/loss"] < 0.6
    for r in rows:
        assert r["train/rewards/margins"] == pytest.approx(
            r["train/rewards/chosen"] - r["train/rewards/rejected"], abs=1e-5
        )
    for key in ("train/logps/chosen", "train/logps/rejected", "train/lr", "train/grad_norm", "train/pairs_per_s"):
        assert key in rows[-1]
    assert result["preference_accuracy_before"] == 0.0  # margin is exactly 0 before the first update
    # held-out reward accuracy, recomputed one sequence at a time: margin = beta ((pi - ref)_chosen - (pi - ref)_rejected)
    processor = load_processor(tiny_model_dir)
    pairs, _ = dpo.build_pairs(str(pref_small / "test.jsonl"), processor, max_len=256)
    policy, reference = load_model(str(tmp_path / "model")), load_model(tiny_model_dir)

    def logp(model, pair, side):
        with torch.no_grad():
            batch = dpo.collate_pairs([pair], processor, packing=False, max_len=256, sides=(side,))
            return dpo.sequence_logps(model, batch)[0].item()

    margins = [(logp(policy, p, "chosen") - logp(reference, p, "chosen"))
               - (logp(policy, p, "rejected") - logp(reference, p, "rejected")) for p in pairs]  # fmt: skip
    assert result["preference_accuracy_after"] == sum(m > 0 for m in margins) / len(margins)


def test_reference_cache_reused_and_invalidated(tiny_model_dir, pref_small, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = dict(ref_cache_dir=str(cache), max_steps=1, eval_dataset=None)
    first = dpo.main(tiny_args(tiny_model_dir, pref_small, tmp_path / "a", **args))
    files = list(cache.glob("*.pt"))
    assert first["ref_cache_hit"] == {"train": False} and len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    capsys.readouterr()
    second = dpo.main(tiny_args(tiny_model_dir, pref_small, tmp_path / "b", **args))
    assert second["ref_cache_hit"] == {"train": True} and "cached reference logps" in capsys.readouterr().out
    assert files[0].stat().st_mtime_ns == mtime
    assert read_metrics(tmp_path / "a")[0]["train/loss"] == read_metrics(tmp_path / "b")[0]["train/loss"]
    # one rejected answer changed: a different dataset, so a new pass and a second cache file
    changed = tmp_path / "changed.jsonl"
    lines = (pref_small / "train.jsonl").read_text().splitlines()
    record = json.loads(lines[3])
    record["rejected"] = record["rejected"].replace("####", "So the answer is\n####")
    changed.write_text("\n".join(lines[:3] + [json.dumps(record)] + lines[4:]) + "\n")
    third = dpo.main(tiny_args(tiny_model_dir, pref_small, tmp_path / "c", dataset=str(changed), **args))
    assert third["ref_cache_hit"] == {"train": False} and len(list(cache.glob("*.pt"))) == 2
    # a different max_len is a different key too
    fourth = dpo.main(tiny_args(tiny_model_dir, pref_small, tmp_path / "d", max_len=200, **args))
    assert fourth["ref_cache_hit"] == {"train": False}


def test_lora_reference_is_base_model_with_adapters_off(tiny_model_dir, pref_small, tmp_path):
    from common.models import load_model, load_processor
    from common.run import Run

    processor = load_processor(tiny_model_dir)
    pairs, _ = dpo.build_pairs(str(pref_small / "train.jsonl"), processor, max_len=256)
    base = load_model(tiny_model_dir)
    policy = load_model(tiny_model_dir, lora_r=4)
    with torch.no_grad():  # make the adapters matter: a freshly initialised LoRA is a no-op (B = 0)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    args = tiny_args(tiny_model_dir, pref_small, tmp_path, lora_r=4)
    run = Run(0, 1, torch.device("cpu"), torch.float32)
    base_logps = dpo.compute_logps(base, pairs, ("chosen", "rejected"), args, processor, run)
    adapted_logps = dpo.compute_logps(policy, pairs, ("chosen", "rejected"), args, processor, run)
    ref_logps, hit = dpo.reference_logps(args, "train", pairs, ("chosen", "rejected"), policy, processor, run)
    assert not hit
    assert not torch.allclose(adapted_logps["chosen"], base_logps["chosen"], atol=1e-2)
    for side in ("chosen", "rejected"):
        assert torch.allclose(ref_logps[side], base_logps[side], atol=1e-4), side
    assert any(m.disable_adapters is False for m in policy.modules() if hasattr(m, "disable_adapters"))  # re-enabled


@pytest.mark.slow
def test_lora_exports_adapter_and_merged_model(tiny_model_dir, pref_small, tmp_path):
    from transformers import AutoModelForCausalLM

    dpo.main(tiny_args(tiny_model_dir, pref_small, tmp_path / "plain", max_steps=1, lora_r=4, lr=1e-2, export=True))
    assert (tmp_path / "plain" / "model" / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "plain" / "model" / "model.safetensors").exists()  # no --merge
    dpo.main(
        tiny_args(
            tiny_model_dir, pref_small, tmp_path / "merged", max_steps=1, lora_r=4, lr=1e-2, export=True, merge=True
        )
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], base[q])  # trained and merged in
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # frozen under LoRA


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["kto", "ipo", "orpo"])
def test_other_losses_train(tiny_model_dir, pref_small, tmp_path, loss_type):
    beta = {"kto": 0.1, "ipo": 0.5, "orpo": 0.5}[loss_type]
    result = dpo.main(
        tiny_args(
            tiny_model_dir,
            pref_small,
            tmp_path,
            max_steps=3,
            batch_size=8,
            beta=beta,
            loss_type=loss_type,
            eval_dataset=None,
        )
    )
    rows = train_rows(tmp_path)
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    if loss_type == "orpo":  # reference-free: no reference pass at all
        assert result["ref_cache_hit"] == {} and not (tmp_path / "ref-cache").exists()
    if loss_type == "kto":
        assert rows[0]["train/kl"] == 0.0  # policy == reference at step 0
        assert rows[0]["train/loss"] == pytest.approx(0.5, abs=1e-4)  # 1 - sigmoid(0) on both sides
    if loss_type == "ipo":  # at the reference h = 0, so the loss is (1 / (2 beta))^2
        assert rows[0]["train/loss"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("loss_type", ["sigmoid", pytest.param("kto", marks=pytest.mark.slow)])
def test_grad_accum_matches_bigger_batch(tiny_model_dir, pref_small, tmp_path, loss_type):
    """Global-pair normalisation (and KTO's global KL): 2 micro-batches of 4 pairs == 1 batch of 8."""
    common = dict(max_steps=2, loss_type=loss_type, eval_dataset=None)
    dpo.main(tiny_args(tiny_model_dir, pref_small, tmp_path / "accum", batch_size=4, grad_accum=2, **common))
    dpo.main(tiny_args(tiny_model_dir, pref_small, tmp_path / "big", batch_size=8, grad_accum=1, **common))
    a, b = train_rows(tmp_path / "accum"), train_rows(tmp_path / "big")
    for key in ("train/loss", "train/rewards/margins", "train/grad_norm"):
        assert max(abs(x[key] - y[key]) for x, y in zip(a, b)) < 1e-5, key


def test_resume_is_exact(tiny_model_dir, pref_small, tmp_path, monkeypatch):
    """4 steps straight == 2 steps, stopped by SIGTERM (the preemption path), then --resume for 2 more."""
    dpo.main(tiny_args(tiny_model_dir, pref_small, tmp_path / "straight", export=True, batch_size=4, max_steps=4))
    original_log = RunLogger.log

    def log_then_preempt(self, metrics, step):
        original_log(self, metrics, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunLogger, "log", log_then_preempt)
    result = dpo.main(
        tiny_args(tiny_model_dir, pref_small, tmp_path / "resumed", export=True, batch_size=4, max_steps=4)
    )
    monkeypatch.setattr(RunLogger, "log", original_log)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert result["step"] == 2 and result["preempted"]
    assert [p.name for p in checkpoint_dirs(tmp_path / "resumed")] == ["step_0000002"]
    result = dpo.main(
        tiny_args(tiny_model_dir, pref_small, tmp_path / "resumed", export=True, batch_size=4, max_steps=4, resume=True)
    )
    assert result["step"] == 4 and result["ref_cache_hit"]["train"]  # the reference is the initial model's, from cache
    straight, resumed = train_rows(tmp_path / "straight"), train_rows(tmp_path / "resumed")
    assert len(resumed) == 4
    assert max(abs(a["train/loss"] - b["train/loss"]) for a, b in zip(straight, resumed)) < 1e-6
    w_a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    w_b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    for name in w_a:
        assert torch.allclose(w_a[name], w_b[name], atol=1e-6, rtol=0), name


def test_dry_run_config_and_bad_data(tiny_model_dir, pref_small, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model-path: {tiny_model_dir}\nloss_type: ipo\nbeta: 0.5\nmax_steps: 3\n")
    args = cli(
        dpo.Args,
        [
            "--config",
            str(config),
            "--beta",
            "0.25",
            "--dry-run",
            "--dataset",
            str(pref_small / "train.jsonl"),
            "--output-dir",
            str(tmp_path / "out"),
        ],
    )
    assert (args.loss_type, args.beta, args.max_steps) == ("ipo", 0.25, 3)
    assert dpo.main(args) is None
    printed = capsys.readouterr().out
    assert "[plan] ipo (beta 0.25)" in printed and "16 pairs" in printed
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    from common.data import DataError

    with pytest.raises(DataError, match="preference records"):
        dpo.main(tiny_args(tiny_model_dir, pref_small, tmp_path, dataset=str(ROOT / "data" / "arith" / "test.jsonl")))


# ------------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_torchrun_fsdp2_matches_single_process(tiny_model_dir, pref_small, tmp_path):
    common = [
        "--model-path",
        tiny_model_dir,
        "--dataset",
        str(pref_small / "train.jsonl"),
        "--eval-dataset",
        str(pref_small / "test.jsonl"),
        "--eval-samples",
        "0",
        "--max-steps",
        "4",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "1",
        "--dtype",
        "float32",
        "--save-every",
        "2",
        "--eval-every",
        "2",
    ]
    single = [
        sys.executable,
        "dpo.py",
        *common,
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--output-dir",
        str(tmp_path / "single"),
        "--ref-cache-dir",
        str(tmp_path / "cache-single"),
    ]
    multi = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "dpo.py",
        *common,
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--output-dir",
        str(tmp_path / "fsdp"),
        "--ref-cache-dir",
        str(tmp_path / "cache-fsdp"),
    ]
    for cmd in (single, multi):
        run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    # the reference pass split across two ranks gives the same cached values as one process
    single_files = sorted(p.name for p in (tmp_path / "cache-single").glob("*.pt"))
    assert len(single_files) == 2 and single_files == sorted(p.name for p in (tmp_path / "cache-fsdp").glob("*.pt"))
    for name in single_files:  # same key (model, tokens, dtype), and the same values from two half passes
        ref_a, ref_b = torch.load(tmp_path / "cache-single" / name), torch.load(tmp_path / "cache-fsdp" / name)
        assert all(torch.allclose(ref_a[k], ref_b[k], atol=1e-4) for k in ("chosen", "rejected"))
    a, b = train_rows(tmp_path / "single"), train_rows(tmp_path / "fsdp")
    assert len(a) == len(b) == 4
    # (not rewards/accuracies: at step 1 every margin is ~0 and its sign is float noise)
    for key in ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins"):
        assert max(abs(x[key] - y[key]) for x, y in zip(a, b)) < 1e-4, (key, a, b)
    eval_a = [r["eval/loss"] for r in read_metrics(tmp_path / "single") if "eval/loss" in r]
    eval_b = [r["eval/loss"] for r in read_metrics(tmp_path / "fsdp") if "eval/loss" in r]
    assert len(eval_a) == 3 and max(abs(x - y) for x, y in zip(eval_a, eval_b)) < 1e-4
    w_a = load_file(tmp_path / "single" / "model" / "model.safetensors")
    w_b = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    assert max((w_a[k] - w_b[k]).abs().max().item() for k in w_a) < 1e-4
    assert [p.name for p in checkpoint_dirs(tmp_path / "fsdp")] == ["step_0000002", "step_0000004"]


@pytest.mark.slow
def test_real_smollm2_default_few_steps(tmp_path):
    """The default model and pairs (SmolLM2-135M-Instruct), shortened to a few steps; float32, so that the plain
    one-prompt-at-a-time check computes what the script computes (see sft's test of the same name)."""
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 32), ("test", 8)):
        lines = (ROOT / "data" / "arith_pref" / f"{split}.jsonl").read_text().splitlines()[:n]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    result = dpo.main(
        dpo.Args(
            dtype="float32",
            output_dir=str(tmp_path / "out"),
            dataset=str(data / "train.jsonl"),
            eval_dataset=str(data / "test.jsonl"),
            ref_cache_dir=str(tmp_path / "cache"),
            max_steps=4,
            warmup_steps=1,
            batch_size=4,
            lr=1e-5,
            eval_samples=4,
            max_new_tokens=48,
            save_every=0,
            eval_every=0,
            export=True,
        )
    )
    rows = train_rows(tmp_path / "out")
    assert len(rows) == 4 and all(math.isfinite(r["train/loss"]) for r in rows)
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=0.02)  # ref and policy start equal
    # the reported accuracies equal the plain one-prompt-at-a-time computation, before and on the export
    items = [([{"role": "user", "content": r["prompt"]}], r["answer"]) for r in load_records(str(data / "test.jsonl"))]
    assert result["accuracy_before"] == plain_greedy_accuracy("smollm2-135m", items[:4], 48)
    assert result["accuracy_after"] == plain_greedy_accuracy(tmp_path / "out" / "model", items[:4], 48)
