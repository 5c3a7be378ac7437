"""pretrain_captioner.py end to end: a tiny random-init LM of SmolLM2's family (real tokenizer) + siglip-tiny, on
real easy-VQA images copied next to small caption files (relative image paths)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, subprocess_env

import pretrain_captioner as pc
from common.chat import collate, pack_examples
from common.checkpoint import checkpoint_dirs
from common.cli import cli
from common.data import DataError, load_records
from common.models import build_vlm
from common.run import RunLogger, read_metrics
from common.vision import load_vlm, vlm_generate


def tiny_args(tiny_model_dir, captions_dir, out, **overrides):
    base = dict(
        model_path=tiny_model_dir,
        dataset=str(captions_dir / "train.jsonl"),
        eval_dataset=str(captions_dir / "test.jsonl"),
        output_dir=str(out),
        eval_samples=0,
        max_steps=8,
        lr=3e-3,
        lr_vision=1e-3,
        warmup_steps=2,
        batch_size=2,
        max_len=128,
        dtype="float32",
        save_every=0,
        eval_every=0,
        export=False,
    )
    return pc.Args(**{**base, **overrides})


def losses(out) -> list[float]:
    return [row["train/loss"] for row in read_metrics(out) if "train/loss" in row]


def test_lr_schedules_by_hand():
    # warmup 4 steps to the peak: (step + 1) / 4
    for schedule in ("cosine", "linear", "inverse-sqrt"):
        assert [pc.lr_lambda(s, 4, 10, schedule, 0.1) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # cosine from 1 to 0.1 over steps 4..10, then flat at the floor
    assert pc.lr_lambda(4, 4, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert pc.lr_lambda(7, 4, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert pc.lr_lambda(10, 4, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert pc.lr_lambda(12, 4, 10, "cosine", 0.1) == pytest.approx(0.1)
    # linear: 1 - progress, rescaled to end at the floor
    assert pc.lr_lambda(7, 4, 10, "linear", 0.0) == pytest.approx(0.5)
    assert pc.lr_lambda(8, 4, 10, "linear", 0.2) == pytest.approx(0.2 + 0.8 * (1 - 4 / 6))
    # inverse-sqrt: sqrt(warmup / (step + 1)), continuous with the warmup at step + 1 = warmup, no floor
    assert pc.lr_lambda(15, 4, 10, "inverse-sqrt", 0.5) == pytest.approx(0.5)
    assert pc.lr_lambda(99, 4, 10, "inverse-sqrt", 0.5) == pytest.approx(0.2)
    assert pc.lr_lambda(3, 0, 10, "inverse-sqrt", 0.0) == pytest.approx(0.5)  # no warmup: 1 / sqrt(step + 1)


def test_caption_correct_reads_colour_and_shape():
    assert pc.caption_correct("an image of a red circle.", "a red circle.")  # template is free
    assert not pc.caption_correct("a red triangle.", "a red circle.")
    assert not pc.caption_correct("a blue circle.", "a red circle.")
    assert not pc.caption_correct("a red blue circle.", "a red circle.")  # hedging both colours is wrong
    assert pc.caption_correct("a red triangle.", "a red shape.")  # the reference leaves the shape unnamed
    assert pc.caption_correct("A cat.", "a cat") and not pc.caption_correct("a dog", "a cat")  # other vocab: exact


def test_loss_falls_and_evals_are_logged(tiny_model_dir, captions_dir, tmp_path):
    result = pc.main(
        tiny_args(
            tiny_model_dir,
            captions_dir,
            tmp_path,
            max_steps=12,
            lr_lm=3e-3,
            eval_every=6,
            eval_samples=4,
            max_new_tokens=6,
            export=True,
        )
    )
    curve, rows = losses(tmp_path), read_metrics(tmp_path)
    assert len(curve) == 12
    assert curve[0] == pytest.approx(math.log(49153), abs=1.0)  # random-init LM: near uniform over the vocabulary
    assert sum(curve[-3:]) / 3 < curve[0] - 2.0, curve
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]  # before training, every 6 steps
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 1.0
    # the last caption accuracy is the exported model's, captioning the 4 held-out images one at a time
    model, processor = load_vlm(tmp_path / "model")
    right = 0
    for record in load_records(str(captions_dir / "test.jsonl"))[:4]:
        prompt = processor(
            pc.caption_chat(record, with_caption=False), base_dir=record["_dir"], add_generation_prompt=True
        )
        ids = torch.tensor([prompt["input_ids"]])
        with torch.no_grad():
            new = vlm_generate(model, ids, torch.ones_like(ids), **processor.image_inputs([prompt], ids),
                               max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)  # fmt: skip
        right += pc.caption_correct(
            processor.tokenizer.decode(new[0], skip_special_tokens=True).strip(), record["caption"]
        )
    assert evals[-1]["eval/caption_accuracy"] == right / 4
    assert result["step"] == 12 and result["loss"] == evals[-1]["eval/loss"]
    assert {"train/lr_projector", "train/lr_vision", "train/lr_lm"} <= set(rows[1])
    assert rows[1]["train/lr_projector"] == pytest.approx(3e-3 / 2) and rows[1]["train/lr_vision"] == pytest.approx(
        1e-3 / 2
    )


def test_lr_zero_freezes_parts_and_export_reproduces_eval_loss(tiny_model_dir, captions_dir, tmp_path):
    initial = build_vlm(tiny_model_dir, "siglip-tiny", seed=0)[0].state_dict()  # what main builds with --seed 0
    for name, lr_vision in (("projector_only", 0.0), ("with_vision", 1e-3)):
        pc.main(tiny_args(tiny_model_dir, captions_dir, tmp_path / name, max_steps=4, lr_vision=lr_vision, export=True))
        model, processor = load_vlm(tmp_path / name / "model")
        trained = model.state_dict()
        assert trained.keys() == initial.keys()
        changed = {k for k in initial if not torch.equal(initial[k], trained[k])}
        assert changed, name
        assert all(k.startswith("projector.") for k in changed) == (lr_vision == 0.0), sorted(changed)[:5]
        assert not any(k.startswith("language_model.") for k in changed), name  # --lr-lm 0: bit-identical
        assert {k for k in initial if k.startswith("projector.mlp.") and k.endswith("weight")} <= changed
    # the export holds the trained weights: load_vlm's model reproduces the eval loss logged at the last step
    final_eval = [r["eval/loss"] for r in read_metrics(tmp_path / name) if "eval/loss" in r][-1]
    records = pc.load_caption_records(str(captions_dir / "test.jsonl"), 0)
    examples = pc.caption_examples(records, processor, 128, "truncate")
    nll, n = 0.0, 0
    for pack in pack_examples(examples, 128):
        with torch.no_grad():
            s, k = pc.caption_loss_sum(
                model, collate([[examples[i] for i in pack]], processor, packing=True, max_len=128), "naive"
            )
        nll, n = nll + s.item(), n + k
    assert n > 8 * 4 and nll / n == pytest.approx(final_eval, abs=1e-5)


def test_resume_is_exact(tiny_model_dir, captions_dir, tmp_path, monkeypatch):
    """8 steps straight == 4 steps, stopped by SIGTERM (the preemption path), then --resume for 4 more."""
    pc.main(tiny_args(tiny_model_dir, captions_dir, tmp_path / "straight", export=True))
    original_log = RunLogger.log

    def log_then_preempt(self, metrics, step):
        original_log(self, metrics, step)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the loop, like a cluster's preemption notice

    monkeypatch.setattr(RunLogger, "log", log_then_preempt)
    result = pc.main(tiny_args(tiny_model_dir, captions_dir, tmp_path / "resumed", export=True))
    monkeypatch.setattr(RunLogger, "log", original_log)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert result == {"step": 4, "preempted": True}
    assert [p.name for p in checkpoint_dirs(tmp_path / "resumed")] == ["step_0000004"]
    assert not (tmp_path / "resumed" / "model").exists()

    assert pc.main(tiny_args(tiny_model_dir, captions_dir, tmp_path / "resumed", export=True, resume=True))["step"] == 8
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(resumed) == 8
    assert max(abs(a - b) for a, b in zip(straight, resumed)) < 1e-6, (straight, resumed)
    a = load_vlm(tmp_path / "straight" / "model")[0].state_dict()
    b = load_vlm(tmp_path / "resumed" / "model")[0].state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_mixture_relative_images_dry_run_and_bad_records(tiny_model_dir, captions_dir, tmp_path, capsys):
    # two sources in two folders, each with its own images/x.png: paths resolve against each file's folder
    for name, source in (("a", "train0.png"), ("b", "train1.png")):
        (tmp_path / name / "images").mkdir(parents=True)
        shutil.copy(captions_dir / "images" / source, tmp_path / name / "images" / "x.png")
        (tmp_path / name / "caps.jsonl").write_text(
            "".join(json.dumps({"image": "images/x.png", "caption": f"from {name} {k}"}) + "\n" for k in range(4))
        )
    args = cli(
        pc.Args,
        [
            "--model-path",
            tiny_model_dir,
            "--dataset",
            f"{tmp_path}/a/caps.jsonl:3",
            "--dataset",
            f"{tmp_path}/b/caps.jsonl:1",
            "--max-len",
            "128",
            "--output-dir",
            str(tmp_path / "out"),
            "--dry-run",
        ],
    )
    records = pc.load_caption_records(args.dataset, 0)
    assert sorted(r["caption"].split()[1] for r in records) == ["a"] * 6 + ["b"] * 2  # 8 records, weights 3:1
    _, processor = build_vlm(tiny_model_dir, seed=0)
    examples = pc.caption_examples(records, processor, 128, "truncate")
    from PIL import Image

    for r, e in zip(records, examples):
        pixels = processor.preprocess(
            Image.open(tmp_path / r["caption"].split()[1] / "images" / "x.png").convert("RGB")
        )
        assert torch.equal(e["images"][0]["pixel_values"][0], pixels)
    assert pc.main(args) is None
    assert "8 records -> 8 examples" in capsys.readouterr().out
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    # bad records: one clear error naming the file and line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "images/x.png", "caption": "ok"}\n{"image": "images/x.png", "text": "no caption"}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: caption: expected a non-empty string"):
        pc.load_caption_records(str(bad), 0)
    bad.write_text('{"image": "missing.png", "caption": "ok"}\n')
    with pytest.raises(DataError, match=rf"{bad}:1: image not found"):
        pc.caption_examples(pc.load_caption_records(str(bad), 0), processor, 128, "truncate")


def test_nothing_to_train_is_a_clear_error(tiny_model_dir, captions_dir, tmp_path):
    with pytest.raises(SystemExit, match="nothing to train"):
        pc.main(tiny_args(tiny_model_dir, captions_dir, tmp_path, lr=0.0, lr_vision=0.0, lr_lm=0.0))


@pytest.mark.slow
def test_torchrun_fsdp2_matches_single_process(tiny_model_dir, captions_dir, tmp_path):
    """Frozen LM (the default), trained encoder + projector: 2 ranks x 2 rows == 1 process x 2 micro-batches of 2."""
    common = [
        "--model-path",
        tiny_model_dir,
        "--dataset",
        str(captions_dir / "train.jsonl"),
        "--eval-dataset",
        str(captions_dir / "test.jsonl"),
        "--eval-samples",
        "4",
        "--max-new-tokens",
        "4",
        "--max-steps",
        "4",
        "--lr",
        "3e-3",
        "--lr-vision",
        "1e-3",
        "--max-len",
        "128",
        "--dtype",
        "float32",
        "--save-every",
        "2",
        "--eval-every",
        "2",
    ]
    single = [
        sys.executable,
        "pretrain_captioner.py",
        *common,
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--output-dir",
        str(tmp_path / "single"),
    ]
    multi = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "pretrain_captioner.py",
        *common,
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--output-dir",
        str(tmp_path / "fsdp"),
    ]
    for cmd in (single, multi):
        run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    a, b = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    eval_a = [r["eval/loss"] for r in read_metrics(tmp_path / "single") if "eval/loss" in r]
    eval_b = [r["eval/loss"] for r in read_metrics(tmp_path / "fsdp") if "eval/loss" in r]
    assert len(eval_a) == len(eval_b) == 3 and max(abs(x - y) for x, y in zip(eval_a, eval_b)) < 1e-4
    # caption accuracy under FSDP2 (each rank captions every other image, the weights gathered once): as in one process
    accuracy_a, accuracy_b = ([(r["step"], r["eval/caption_accuracy"]) for r in read_metrics(tmp_path / run)
                               if "eval/caption_accuracy" in r] for run in ("single", "fsdp"))  # fmt: skip
    assert [step for step, _ in accuracy_b] == [0, 2, 4] and accuracy_a == accuracy_b
    w_a = load_vlm(tmp_path / "single" / "model")[0].state_dict()
    w_b = load_vlm(tmp_path / "fsdp" / "model")[0].state_dict()
    assert max((w_a[k] - w_b[k]).abs().max().item() for k in w_a) < 1e-4
    initial = build_vlm(tiny_model_dir, seed=0)[0].state_dict()
    assert all(torch.equal(w_b[k], initial[k]) for k in initial if k.startswith("language_model."))
    fc1 = "vision_encoder.encoder.layers.0.mlp.fc1.weight"  # a vision block sharded on its own
    assert not torch.equal(w_b[fc1], initial[fc1])
    assert [p.name for p in checkpoint_dirs(tmp_path / "fsdp")] == ["step_0000004"]  # --keep-checkpoints 1


def test_bad_input_from_the_command_line_is_one_clear_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "caption": "a red circle."}\n{"image": "x.png", "caption": 3}\n')
    for flags, expected in (
        ([f"--model-path={tiny_model_dir}", f"--dataset={bad}"], f"error: {bad}:2: caption: expected"),
        (["--model-path=no-such-model", "--eval-dataset", str(bad)], f"error: {bad}:2: caption"),
    ):
        run = subprocess.run(
            [sys.executable, "pretrain_captioner.py", *flags, "--dry-run"],
            cwd=ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 1
        assert expected in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
