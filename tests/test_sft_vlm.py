"""sft.py on a VLM folder (a tiny composed VLM: random-init tiny Llama + siglip-tiny, saved with save_vlm) and on
dataset mixtures: image records, packing with image tokens, per-module learning rates, export, resume, accuracy."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, plain_greedy_accuracy, subprocess_env, tiny_qwen_vl_folder, write_color_records
from safetensors.torch import load_file

import sft
from common.chat import IGNORE, pack_examples, pad_collate
from common.cli import cli
from common.data import load_records, to_messages
from common.evaluation import answer_accuracy
from common.logprob import sequence_logprobs
from common.metrics import exact_match
from common.rollout import prompt_records
from common.run import Run, RunLogger, read_metrics
from common.vision import ComposedVLM, load_vlm, vlm_generate


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colors")
    return {"train": write_color_records(folder, 16, seed=0), "test": write_color_records(folder, 6, seed=1)}


def vlm_args(vlm_dir, colors, out, **overrides):
    base = dict(
        model_path=vlm_dir,
        dataset=colors["train"],
        eval_dataset=colors["test"],
        output_dir=str(out),
        eval_samples=0,
        max_steps=6,
        lr=3e-3,
        warmup_steps=1,
        batch_size=2,
        max_len=128,
        dtype="float32",
        save_every=0,
        eval_every=0,
        export=False,
    )
    return sft.Args(**{**base, **overrides})


def losses(out) -> list[float]:
    return [row["train/loss"] for row in read_metrics(out) if "train/loss" in row]


def examples_of(path, processor, max_len):
    return [processor(to_messages(r, "messages"), base_dir=r["_dir"], max_len=max_len) for r in load_records(path)]


def test_packed_equals_unpacked_for_image_records(vlm_dir, colors, tmp_path, capsys):
    """One global batch holds the whole train set, so packed rows and padded rows see the same examples: the losses
    (and, through identical updates, the next steps' losses) agree."""
    _, processor = load_vlm(vlm_dir)
    examples = examples_of(colors["train"], processor, 128)
    assert all(e["input_ids"].count(processor.image_token_id) == 16 for e in examples)
    lengths = [len(e["input_ids"]) for e in examples]  # image tokens included
    n_rows = len(pack_examples(examples, 128))
    assert sum(lengths) / 128 <= n_rows < len(examples)  # image tokens fill the rows: fewer rows than examples
    sft.main(vlm_args(vlm_dir, colors, tmp_path / "packed", max_steps=3, batch_size=n_rows))
    assert f"{len(examples)} examples -> {n_rows} rows (packed, max 128 tokens)" in capsys.readouterr().out
    sft.main(vlm_args(vlm_dir, colors, tmp_path / "padded", max_steps=3, batch_size=len(examples), packing=False))
    packed, padded = losses(tmp_path / "packed"), losses(tmp_path / "padded")
    assert len(packed) == 3 and packed[0] == pytest.approx(10.8, abs=1.0)  # random init: about ln(vocab)
    assert max(abs(a - b) for a, b in zip(packed, padded)) < 1e-5, (packed, padded)
    eval_packed, eval_padded = (read_metrics(tmp_path / d)[-1]["eval/loss"] for d in ("packed", "padded"))
    assert eval_packed == pytest.approx(eval_padded, abs=1e-5)
    assert read_metrics(tmp_path / "padded")[0]["train/padding_fraction"] > 0


def test_lr_lm_zero_keeps_the_lm_bit_identical(vlm_dir, colors, tmp_path):
    sft.main(vlm_args(vlm_dir, colors, tmp_path, max_steps=3, lr_lm=0.0, lr_projector=1e-2, export=True))
    rows = read_metrics(tmp_path)
    assert {k for k in rows[-1] if k.startswith("train/lr_")} == {"train/lr_projector", "train/lr_vision"}
    assert max(r["train/lr_projector"] for r in rows if "train/lr_projector" in r) == pytest.approx(1e-2)
    before, after = load_file(f"{vlm_dir}/model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    lm = [k for k in before if k.startswith("language_model.")]
    assert len(lm) > 10 and all(torch.equal(before[k], after[k]) for k in lm)
    for part in ("projector.", "vision_encoder."):  # the trained parts did move
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part)), part


def test_loss_falls_and_export_reproduces_the_final_eval_loss(vlm_dir, colors, tmp_path):
    sft.main(vlm_args(vlm_dir, colors, tmp_path, max_steps=12, export=True, lr_vision=0.0, eval_every=6))
    curve = losses(tmp_path)
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < curve[0] - 2.0, curve
    evals = [r["eval/loss"] for r in read_metrics(tmp_path) if "eval/loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    model, processor = load_vlm(tmp_path / "model")
    assert isinstance(model, ComposedVLM) and processor.tokens_per_image == 16
    examples = examples_of(colors["test"], processor, 128)
    batch = pad_collate(examples, processor.tokenizer.pad_token_id)
    batch |= processor.image_inputs(examples, batch["input_ids"])
    with torch.no_grad():  # no packing, no sft.py code: a plain padded batch through the exported model
        logps = sequence_logprobs(
            model,
            batch["input_ids"],
            batch["labels"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            pixel_values=batch["pixel_values"],
            impl="naive",
        )
    assert (-logps.sum() / (batch["labels"][:, 1:] != IGNORE).sum()).item() == pytest.approx(evals[-1], abs=1e-5)


def test_answer_accuracy_batches_left_padded_prompts_like_one_at_a_time(vlm_dir, colors):
    """Answers set to what the model says to each prompt alone (half of them) or to something else: the batched,
    left-padded accuracy must come out at exactly one half."""
    model, processor = load_vlm(vlm_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # large random LM matrices: greedy answers that differ from prompt to prompt
        for p in model.language_model.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else None
    records = load_records(colors["test"])
    prompts = [
        processor(to_messages(r, "messages")[:-1], base_dir=r["_dir"], add_generation_prompt=True) for r in records
    ]
    assert len({len(p["input_ids"]) for p in prompts}) > 1  # different lengths: left padding matters
    saids = []
    for k, (record, prompt) in enumerate(zip(records, prompts)):
        ids = torch.tensor([prompt["input_ids"]])
        alone = vlm_generate(
            model,
            ids,
            torch.ones_like(ids),
            **processor.image_inputs([prompt]),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        said = processor.tokenizer.decode(alone[0], skip_special_tokens=True).strip()
        record["answer"] = said if k % 2 == 0 else said + " zebra"
        saids.append(said)
        assert exact_match(said, record["answer"]) == (k % 2 == 0)
    assert len(set(saids)) == len(saids) and all(saids)
    items = prompt_records(records, processor)  # (prompt, answer), image paths resolved against the data file
    accuracy = answer_accuracy(
        model, processor, items, Run(0, 1, torch.device("cpu"), torch.float32), max_new_tokens=3, batch_size=4
    )
    assert accuracy == pytest.approx(0.5)


def test_mixture_of_two_files_follows_the_weights(vlm_dir, tiny_model_dir, colors, arith_small, tmp_path, capsys):
    a, b = colors["train"], colors["test"]
    args = cli(
        sft.Args,
        [
            "--model-path",
            vlm_dir,
            "--dataset",
            f"{a}:3",
            "--dataset",
            f"{b}:1",
            "--dataset-records",
            "40",
            "--eval-dataset",
            b,
            "--max-len",
            "128",
            "--dry-run",
            "--output-dir",
            str(tmp_path),
        ],
    )
    assert args.dataset == f"{a}:3,{b}:1"
    assert sft.main(args) is None
    printed = capsys.readouterr().out
    assert f"[data] mixture: {a} 30 (1.88x), {b} 10 (1.67x)" in printed  # 40 * 3/4 of 16 records, 40 * 1/4 of 6
    assert "(VLM) | 40 examples ->" in printed
    # the text path mixes the same way
    train, test = str(arith_small / "train.jsonl"), str(arith_small / "test.jsonl")
    sft.main(
        sft.Args(
            model_path=tiny_model_dir,
            dataset=f"{train}:1,{test}:3",
            dataset_records=20,
            eval_dataset=None,
            output_dir=str(tmp_path / "text"),
            max_len=256,
            dry_run=True,
        )
    )
    printed = capsys.readouterr().out
    assert f"[data] mixture: {train} 5 (0.10x), {test} 15 (1.88x)" in printed
    assert "| 20 examples ->" in printed and "(VLM)" not in printed


def test_resume_is_exact(vlm_dir, colors, tmp_path, monkeypatch):
    """6 steps straight == 3 steps, stopped by SIGTERM, then --resume for 3 more (param groups, a frozen encoder)."""
    sft.main(vlm_args(vlm_dir, colors, tmp_path / "straight", lr_vision=0.0, lr_projector=1e-2, export=True))
    original_log = RunLogger.log

    def log_then_preempt(self, metrics, step):
        original_log(self, metrics, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunLogger, "log", log_then_preempt)
    result = sft.main(vlm_args(vlm_dir, colors, tmp_path / "resumed", lr_vision=0.0, lr_projector=1e-2, export=True))
    monkeypatch.setattr(RunLogger, "log", original_log)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert result == {"step": 3, "preempted": True}
    result = sft.main(
        vlm_args(vlm_dir, colors, tmp_path / "resumed", lr_vision=0.0, lr_projector=1e-2, export=True, resume=True)
    )
    assert result["step"] == 6
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(resumed) == 6 and max(abs(a - b) for a, b in zip(straight, resumed)) < 1e-6, (straight, resumed)
    w_straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    w_resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert max((w_straight[k] - w_resumed[k]).abs().max().item() for k in w_straight) < 1e-6


@pytest.mark.slow
def test_native_vlm_trains_unpacked_and_exports(colors, tmp_path, capsys):
    tiny_qwen_vl_folder(tmp_path / "qwen2_vl", "qwen2_vl")
    result = sft.main(
        vlm_args(
            str(tmp_path / "qwen2_vl"),
            colors,
            tmp_path / "run",
            max_steps=8,
            export=True,
            eval_samples=2,
            max_new_tokens=2,
        )
    )
    printed = capsys.readouterr().out
    assert "--no-packing" in printed and "16 examples -> 16 rows (padded" in printed
    curve = losses(tmp_path / "run")
    assert len(curve) == 8 and sum(curve[-3:]) / 3 < curve[0] - 1.0, curve
    items = [(r["messages"][:-1], r["answer"], r["_dir"]) for r in load_records(colors["test"])[:2]]
    assert result["accuracy_before"] == plain_greedy_accuracy(tmp_path / "qwen2_vl", items, 2)
    assert result["accuracy_after"] == plain_greedy_accuracy(tmp_path / "run" / "model", items, 2)
    model, _ = load_vlm(tmp_path / "run" / "model")
    assert not isinstance(model, ComposedVLM)


@pytest.mark.slow
def test_torchrun_fsdp2_matches_single_process(vlm_dir, colors, tmp_path):
    """FSDP2 shards the LM decoder layers and the vision encoder layers; 2 ranks x 2 rows == 1 process x 2 x 2 accum."""
    common = [
        "--model-path",
        vlm_dir,
        "--dataset",
        colors["train"],
        "--eval-dataset",
        colors["test"],
        "--eval-samples",
        "0",
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
        "0",
        "--eval-every",
        "2",
    ]
    single = [
        sys.executable,
        "sft.py",
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
        "sft.py",
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
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    eval_a, eval_b = (
        [r["eval/loss"] for r in read_metrics(tmp_path / d) if "eval/loss" in r] for d in ("single", "fsdp")
    )
    assert len(eval_a) == 2 and max(abs(x - y) for x, y in zip(eval_a, eval_b)) < 1e-4
    w_a = load_file(tmp_path / "single" / "model" / "model.safetensors")
    w_b = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    assert w_a.keys() == w_b.keys() and max((w_a[k] - w_b[k]).abs().max().item() for k in w_a) < 1e-4
