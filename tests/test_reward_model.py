"""reward_model.py: the Bradley-Terry loss by hand; a text reward model learns easy pairs and exports a folder
transformers reloads to the same scores; resume after a preemption is exact; 2-process FSDP2; a VLM reward model
learns pairs only the image tells apart, exports and reloads to the same scores; data errors name the record."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, easy_pairs, subprocess_env
from safetensors.torch import load_file

import reward_model
from common.checkpoint import checkpoint_dirs
from common.data import DataError
from common.logprob import forward_hidden
from common.models import load_processor
from common.run import Run, RunLogger, read_metrics
from common.value import load_value_model, score_chats
from common.vision import is_vlm, load_vlm

CPU = Run(0, 1, torch.device("cpu"), torch.float32)


def test_bradley_terry_loss_by_hand():
    loss, acc = reward_model.bradley_terry_loss(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.5, 2.0]))
    expected = [math.log1p(math.exp(-d)) for d in (1.0, -0.5, 0.0)]  # -log sigmoid(d) = log(1 + e^-d)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert acc.item() == pytest.approx(1 / 3)  # a tie is not a win


def rm_args(model_dir, data, out, **overrides):
    base = dict(model_path=model_dir, dataset=data, eval_dataset=data, output_dir=str(out), max_steps=30,
                pairs_per_step=8, lr=3e-3, dtype="float32")  # fmt: skip
    return reward_model.Args(**{**base, **overrides})


def test_text_reward_model_learns_easy_pairs_and_exports(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    data = str(easy_pairs(tmp_path / "pairs.jsonl"))
    result = reward_model.main(rm_args(tiny_model_dir, data, tmp_path / "rm"))
    assert result["pair_accuracy_after"] >= 0.9, result
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "rm") if "train/loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    # the exported folder: transformers loads it, scores chosen > rejected, and equals our batched last-token score
    folder = tmp_path / "rm" / "model"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    processor = load_processor(str(folder))
    pairs = reward_model.preference_pairs(data, processor, 512)
    with torch.no_grad():
        hf = [[model(input_ids=torch.tensor([processor(m)["input_ids"]])).logits.item() for m, _ in pair]
              for pair in pairs]  # fmt: skip
        ours = score_chats(model, processor, [c for c, _ in pairs], CPU, 8)
    assert sum(c > r for c, r in hf) / len(hf) >= 0.9
    assert torch.allclose(ours, torch.tensor([c for c, _ in hf]), atol=1e-5)  # batched + padded == one by one
    reloaded, _ = load_value_model(str(folder), device="cpu", zero_new_head=False)  # what ppo.py --reward-model reads
    assert torch.allclose(score_chats(reloaded.eval(), processor, [c for c, _ in pairs], CPU, 8), ours, atol=1e-6)


def test_mean_pooling_averages_the_assistant_tokens_and_is_saved(tiny_model_dir, vlm_rm, tmp_path):
    """--pooling mean: the score is the head's mean over the assistant tokens (computed here from the saved model's
    hidden states, one chat at a time); the export keeps the pooling, for a text model and for a VLM."""
    from transformers import AutoModelForSequenceClassification

    from common.chat import IGNORE
    from common.value import export_value_model, pooling, set_pooling

    data = str(easy_pairs(tmp_path / "pairs.jsonl"))
    result = reward_model.main(rm_args(tiny_model_dir, data, tmp_path / "rm", pooling="mean", max_steps=20))
    assert result["pair_accuracy_after"] >= 0.9, result
    folder = tmp_path / "rm" / "model"
    reloaded, processor = load_value_model(str(folder), device="cpu", zero_new_head=False)
    assert pooling(reloaded) == "mean" and pooling(load_value_model(tiny_model_dir, device="cpu")[0]) == "last"
    chats = [side for pair in reward_model.preference_pairs(data, processor, 512)[:6] for side in pair]
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    want = []
    for messages, _ in chats:
        example = processor(messages)
        with torch.no_grad():
            per_token = hf.score(hf.model(input_ids=torch.tensor([example["input_ids"]])).last_hidden_state)[0, :, 0]
        assistant = torch.tensor(example["labels"]) != IGNORE
        assert 0 < assistant.sum() < len(assistant)
        want.append(float(per_token[assistant].mean()))
    got = score_chats(reloaded.eval(), processor, chats, CPU, 4)  # batched, right-padded
    assert torch.allclose(got, torch.tensor(want), atol=1e-5), (got, want)
    last = hf(input_ids=torch.tensor([processor(chats[0][0])["input_ids"]])).logits.item()
    assert abs(last - want[0]) > 1e-4  # the mean is not the last token's score
    # a VLM reward model: the pooling rides in value_head.safetensors' metadata
    vlm_model = vlm_rm["model"]
    set_pooling(vlm_model, "mean")
    try:
        out = export_value_model(vlm_model, processor=load_processor(str(vlm_rm["run"] / "model")),
                                 out=tmp_path / "vlm_mean", run=CPU, base_path=str(vlm_rm["run"] / "model"))  # fmt: skip
    finally:
        set_pooling(vlm_model, "last")
    assert pooling(load_value_model(str(out), device="cpu", zero_new_head=False)[0]) == "mean"


def test_logprob_pooling_is_the_lm_likelihood_of_the_answer_and_is_saved(tiny_model_dir, tmp_path):
    """--pooling logprob: no head; the score is the causal LM's mean log-probability of the assistant tokens (computed
    here from the exported folder's logits, one chat at a time); BT training separates the pairs; the export is a
    causal-LM folder that loads back as the same kind, and cannot start a PPO critic."""
    from transformers import AutoModelForCausalLM

    from common.chat import IGNORE
    from common.value import pooling

    data = str(easy_pairs(tmp_path / "pairs.jsonl"))
    result = reward_model.main(rm_args(tiny_model_dir, data, tmp_path / "rm", pooling="logprob", max_steps=20))
    assert result["pair_accuracy_after"] >= 0.9 and result["pair_accuracy_after"] > result["pair_accuracy_before"]
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "rm") if "train/loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    folder = str(tmp_path / "rm" / "model")
    reloaded, processor = load_value_model(folder, device="cpu", zero_new_head=False)  # what --reward-model reads
    assert pooling(reloaded) == "logprob" and not hasattr(reloaded, "score")
    lm = AutoModelForCausalLM.from_pretrained(folder).eval()
    chats = [side for pair in reward_model.preference_pairs(data, processor, 512)[:6] for side in pair]
    want = []
    for messages, _ in chats:
        example = processor(messages)
        ids, labels = torch.tensor(example["input_ids"]), torch.tensor(example["labels"])
        with torch.no_grad():
            logps = torch.log_softmax(lm(input_ids=ids[None]).logits[0, :-1].float(), -1)  # [L-1, V]: token t+1
        answer = labels[1:] != IGNORE
        assert 0 < answer.sum() < len(answer)
        want.append(float(logps.gather(1, ids[1:, None])[:, 0][answer].mean()))
    got = score_chats(reloaded.eval(), processor, chats, CPU, 4)  # batched, right-padded
    assert torch.allclose(got, torch.tensor(want), atol=1e-5), (got, want)
    assert all(w < 0 for w in want)  # log-probabilities
    with pytest.raises(SystemExit, match="likelihood reward model.*critic"):
        load_value_model(folder, device="cpu", critic=True)  # ppo.py --critic-path
    with pytest.raises(SystemExit, match="--pooling last"):
        load_value_model(folder, device="cpu", pooling="last")


def test_resume_is_exact(tiny_model_dir, tmp_path, monkeypatch):
    """6 steps straight == 3 steps, SIGTERM (preemption), then --resume: the same pair stream, losses and weights."""
    data = str(easy_pairs(tmp_path / "pairs.jsonl", n=12))  # 6 steps x 4 pairs: two epochs of the stream
    kw = dict(max_steps=6, pairs_per_step=4, eval_samples=0)
    reward_model.main(rm_args(tiny_model_dir, data, tmp_path / "straight", **kw))
    original_log = RunLogger.log

    def log_then_preempt(self, metrics, step):
        original_log(self, metrics, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunLogger, "log", log_then_preempt)
    result = reward_model.main(rm_args(tiny_model_dir, data, tmp_path / "resumed", **kw))
    monkeypatch.setattr(RunLogger, "log", original_log)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert result == {"step": 3, "preempted": True}
    assert [p.name for p in checkpoint_dirs(tmp_path / "resumed")] == ["step_0000003"]
    assert reward_model.main(rm_args(tiny_model_dir, data, tmp_path / "resumed", resume=True, **kw))["step"] == 6
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["train/loss"] for r in a] == pytest.approx([r["train/loss"] for r in b], abs=1e-6)
    wa, wb = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("straight", "resumed"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["last", "logprob"])
def test_torchrun_fsdp2_two_processes(tiny_model_dir, tmp_path, pooling):
    data = str(easy_pairs(tmp_path / "pairs.jsonl", n=8))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "reward_model.py",
           "--model-path", tiny_model_dir, "--dataset", data, "--eval-dataset", data, "--max-steps", "2",
           "--pairs-per-step", "4", "--dtype", "float32", "--output-dir", str(tmp_path / "rm"), "--pooling", pooling]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "rm") if "train/loss" in r] == [1, 2]
    assert "pair accuracy after training" in run.stdout
    assert json.loads((tmp_path / "rm" / "model" / "config.json").read_text())["score_pooling"] == pooling


# ---------------------------------------------------------------------------------------- a VLM reward model
def plain_score(vlm, head, processor, chat, images=None):
    """The reward of one (messages, image folder) chat computed without the scripts: encoded alone, unpadded, with its
    own images (or `images`), then the head on the final hidden state of its last token."""
    example = processor(chat[0], base_dir=chat[1])
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        pixels = torch.cat([i["pixel_values"] for i in images or example["images"]])
        hidden = forward_hidden(vlm, ids, pixel_values=pixels)
    return float(hidden[0, -1].float() @ head[0])


def test_vlm_reward_model_learns_pairs_only_the_image_tells_apart(vlm_rm):
    result, rows = vlm_rm["result"], [r for r in read_metrics(vlm_rm["run"]) if "train/loss" in r]
    assert len(rows) == 24 and rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero head: margins 0
    assert result["pair_accuracy_before"] == 0.0  # every margin exactly 0 counts as wrong
    assert result["pair_accuracy_after"] >= 0.9, result  # text alone (same question, both orders) caps this at 0.5
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.05


def test_vlm_reward_model_export_reloads_to_the_same_scores(vlm_rm):
    folder = vlm_rm["run"] / "model"
    assert (folder / "value_head.safetensors").exists() and is_vlm(folder)
    reloaded, processor = load_value_model(str(folder), device="cpu", zero_new_head=False)
    pairs = reward_model.preference_pairs(vlm_rm["pairs"], processor, 512)[:4]
    chats = [side for pair in pairs for side in pair]
    got = score_chats(reloaded.eval(), processor, chats, CPU, 8)
    want = score_chats(vlm_rm["model"].eval(), processor, chats, CPU, 8)
    assert got.abs().max() > 1e-3 and (got - want).abs().max() < 1e-4, (got, want)
    # ...and without the batching: the saved VLM and head, one example at a time
    vlm, _ = load_vlm(folder)
    head = load_file(folder / "value_head.safetensors")["weight"]
    alone = torch.tensor([plain_score(vlm, head, processor, c) for c in chats])
    assert (alone - want).abs().max() < 1e-4, (alone, want)


def test_gradient_checkpointing_reaches_a_vlm_reward_model(vlm_dir, tmp_path, monkeypatch):
    from conftest import write_pref_records

    calls = []
    load = reward_model.load_value_model
    monkeypatch.setattr(reward_model, "load_value_model", lambda *a, **kw: calls.append(load(*a, **kw)) or calls[-1])
    pairs = write_pref_records(tmp_path / "pairs", 4, seed=0, names=("red", "blue"))
    result = reward_model.main(rm_args(vlm_dir, pairs, tmp_path / "rm", eval_samples=0, max_steps=1, pairs_per_step=4,
                                       export=False, gradient_checkpointing=True))  # fmt: skip
    assert result["step"] == 1 and calls[0][0].vlm.language_model.is_gradient_checkpointing


def test_reward_model_data_errors(tiny_model_dir, vlm_dir, vlm_rm, tmp_path):
    text_pairs = tmp_path / "text_pairs.jsonl"
    text_pairs.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    with pytest.raises(DataError, match=r"text_pairs\.jsonl:1: the pair holds no image but --model-path is a VLM"):
        reward_model.main(rm_args(vlm_dir, str(text_pairs), tmp_path, dry_run=True))
    with pytest.raises(DataError, match=r"prefs_0\.jsonl:1: the chat holds an image but --model-path is a text model"):
        reward_model.main(rm_args(tiny_model_dir, vlm_rm["pairs"], tmp_path, dry_run=True))
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="needs preference records"):
        reward_model.main(rm_args(tiny_model_dir, str(chats), tmp_path, dry_run=True))
