"""pretrain_siglip.py: the SigLIP loss against its formula, a tiny encoder learning shapes, export -> composed VLM,
SIGTERM + resume, and 2-process FSDP2 against one process. A tiny random-init LM of SmolLM2's family gives the text
tower's frozen embeddings; the images are real easy-VQA ones copied next to small caption files."""

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, subprocess_env, write_captions

import pretrain_siglip as ps
from common.checkpoint import checkpoint_dirs
from common.data import load_mixture
from common.encoders import load_encoder, save_encoder
from common.models import build_vlm
from common.run import RunLogger, read_metrics
from common.vlm_processor import VLMProcessor


@pytest.fixture(scope="module")
def siglip_captions(tmp_path_factory):
    """train.jsonl (64 records) and test.jsonl (48) of easy-VQA captions, images copied to images/ beside them."""
    return write_captions(tmp_path_factory.mktemp("siglip-captions"), 64, 48)


@pytest.fixture(scope="module")
def small_encoder(tmp_path_factory):
    """A SigLIP vision model small enough to train in seconds: 32x32 pixels, 8x8 patches, 2 layers of width 64."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    folder = tmp_path_factory.mktemp("small-siglip")
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
    )
    SiglipVisionModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    """192 training and 96 held-out 32x32 images of one circle, rectangle or triangle in one of 4 easy-VQA colours,
    of random size and position, captioned "a red circle." etc."""
    from PIL import Image, ImageDraw

    folder, rng = tmp_path_factory.mktemp("shapes"), random.Random(0)
    (folder / "images").mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 160, 30), "blue": (30, 30, 220), "yellow": (230, 200, 20)}
    for split, n in (("train", 192), ("test", 96)):
        lines = []
        for k in range(n):
            shape, colour, size = (
                rng.choice(["circle", "rectangle", "triangle"]),
                rng.choice(list(colours)),
                rng.randint(14, 26),
            )
            x, y = rng.randint(1, 31 - size), rng.randint(1, 31 - size)
            image = Image.new("RGB", (32, 32), (255, 255, 255))
            draw, box, fill = ImageDraw.Draw(image), (x, y, x + size, y + size), colours[colour]
            if shape == "circle":
                draw.ellipse(box, fill=fill)
            elif shape == "rectangle":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(x + size / 2, y), (x, y + size), (x + size, y + size)], fill=fill)
            image.save(folder / "images" / f"{split}{k}.png")
            lines.append(json.dumps({"image": f"images/{split}{k}.png", "caption": f"a {colour} {shape}."}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def tiny_args(tiny_model_dir, captions_dir, encoder, out, **overrides) -> ps.Args:
    base = {
        "vision_encoder": encoder,
        "model_path": tiny_model_dir,
        "dataset": str(captions_dir / "train.jsonl"),
        "eval_dataset": str(captions_dir / "test.jsonl"),
        "output_dir": str(out),
        "max_steps": 4,
        "batch_size": 16,
        "lr": 2e-3,
        "warmup_steps": 2,
        "dtype": "float32",
        "eval_every": 0,
        "save_every": 0,
        "export": False,
    }
    return ps.Args(**{**base, **overrides})


def test_siglip_loss_matches_its_formula_by_hand():
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    y = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.5, 1.0], [-0.3, 1.0]]), dim=-1)
    log_t, b = torch.tensor([math.log(10.0)], requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    expected = 0.0
    for i in range(3):
        for j in range(3):
            z = 1.0 if i == j else -1.0  # positives on the diagonal only
            logit = 10.0 * sum(x[i, d].item() * y[j, d].item() for d in range(2)) - 10.0
            expected -= math.log(1 / (1 + math.exp(-z * logit)))
    loss = ps.siglip_loss(x, y, log_t, b)
    assert loss.item() == pytest.approx(expected / 3, rel=1e-6)
    loss.backward()
    # at b = -10 every logit is negative: raising b helps the 3 positives more than it hurts the 6 negatives
    assert b.grad.item() < 0 and log_t.grad is not None
    # the temperature and bias enter as t = exp(t'), logits t x.y + b: t' = log 2, b = 1 by hand too
    two = ps.siglip_loss(x, y, torch.tensor([math.log(2.0)]), torch.tensor([1.0])).item()
    by_hand = -sum(
        math.log(1 / (1 + math.exp(-(1 if i == j else -1) * (2 * float(x[i] @ y[j]) + 1))))
        for i in range(3)
        for j in range(3)
    )
    assert two == pytest.approx(by_hand / 3, rel=1e-6)
    # matched pairs on the diagonal score better than the same embeddings with the captions shuffled
    assert ps.siglip_loss(x, x, log_t, b) < ps.siglip_loss(x, x[[1, 2, 0]], log_t, b)


def test_tiny_encoder_learns_shapes_above_chance(tiny_model_dir, shapes_dir, small_encoder, tmp_path):
    args = tiny_args(tiny_model_dir, shapes_dir, small_encoder, tmp_path, max_steps=30, batch_size=32, lr=3e-3)
    result = ps.main(dataclasses.replace(args, eval_every=30))
    rows = read_metrics(tmp_path)
    before, after = rows[0], rows[-1]
    assert before["step"] == 0 and after["step"] == 30
    assert after["eval/loss"] < before["eval/loss"] - 3.0
    assert before["eval/shape_accuracy"] < 0.4 and after["eval/shape_accuracy"] > 0.5, (before, after)  # chance: 1/3
    assert before["eval/colour_accuracy"] < 0.3 and after["eval/colour_accuracy"] > 0.9, (before, after)  # 1/4
    assert result["shape_accuracy"] == after["eval/shape_accuracy"]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0] - 3.0
    assert {"train/temperature", "train/bias", "train/lr", "train/grad_norm"} <= set(rows[1])
    assert rows[-1]["train/temperature"] != 10.0 and rows[-1]["train/bias"] != -10.0  # t' and b are learned


def test_export_loads_into_a_composed_vlm_with_the_same_features(tiny_model_dir, siglip_captions, tmp_path):
    from common.models import load_model, load_tokenizer

    torch.manual_seed(0)
    vision, mean, std = load_encoder("siglip-tiny", image_size=32)
    tokenizer, embeddings = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).get_input_embeddings().weight
    model = ps.SigLIP(vision, embeddings.shape[1])
    processor = VLMProcessor(tokenizer, 32, mean, std, tokens_per_image=0)
    embed = lambda texts: ps.text_features(texts, tokenizer, embeddings.detach())
    data = ps.load_pairs(load_mixture(str(siglip_captions / "test.jsonl")), "test.jsonl", processor, embed)
    assert data["pixels"].shape == (48, 3, 32, 32) and data["text"].shape == (48, embeddings.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # move the weights away from their initialisation
        ps.siglip_loss(*model(data["pixels"][:16], data["text"][:16])).backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = save_encoder(model.vision, 32, mean, std, tmp_path / "encoder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]  # no .tmp left behind
    vlm, vlm_processor = build_vlm(tiny_model_dir, str(folder), pixel_shuffle=2)
    assert (vlm_processor.image_size, vlm_processor.image_mean, vlm_processor.image_std) == (32, list(mean), list(std))
    chat = [{"role": "user", "content": [{"type": "image", "image": "images/test0.png"}]}]
    pixels = vlm_processor(chat, base_dir=str(siglip_captions))["images"][0]["pixel_values"]
    assert torch.equal(pixels[0], data["pixels"][0])  # the captioner preprocesses exactly as stage 0 did
    with torch.no_grad():
        ours = model.vision(pixel_values=data["pixels"]).last_hidden_state
        theirs = vlm.vision_encoder(pixel_values=data["pixels"]).last_hidden_state
        fresh = build_vlm(tiny_model_dir, "siglip-tiny", image_size=32)[0].vision_encoder(pixel_values=data["pixels"])
        assert vlm.image_features(data["pixels"][:2]).shape == (2, 4, vlm.config.hidden_size)  # 4x4 patches, 2x2 merged
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, fresh.last_hidden_state)
    from transformers import AutoImageProcessor  # the folder is a standard Hugging Face one

    hf = AutoImageProcessor.from_pretrained(folder)
    assert (hf.size["height"], list(hf.image_mean)) == (32, list(mean))


def test_resume_is_exact(tiny_model_dir, siglip_captions, small_encoder, tmp_path, monkeypatch):
    """6 steps straight == 3 steps, stopped by SIGTERM (the preemption path), then --resume for 3 more."""
    straight = ps.main(
        tiny_args(tiny_model_dir, siglip_captions, small_encoder, tmp_path / "straight", max_steps=6, export=True)
    )
    original_log = RunLogger.log

    def log_then_preempt(self, metrics, step):
        original_log(self, metrics, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunLogger, "log", log_then_preempt)
    args = tiny_args(tiny_model_dir, siglip_captions, small_encoder, tmp_path / "resumed", max_steps=6, export=True)
    assert ps.main(args) == {"step": 3, "preempted": True}
    monkeypatch.setattr(RunLogger, "log", original_log)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert [p.name for p in checkpoint_dirs(tmp_path / "resumed")] == ["step_0000003"]
    assert not (tmp_path / "resumed" / "model").exists()
    args.resume = True
    resumed = ps.main(args)
    assert resumed["step"] == straight["step"] == 6 and resumed["loss"] == pytest.approx(straight["loss"], abs=1e-6)
    a, b = ([r["train/loss"] for r in read_metrics(tmp_path / d) if "train/loss" in r] for d in ("straight", "resumed"))
    assert len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (a, b)
    from safetensors.torch import load_file

    wa, wb = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("straight", "resumed"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_dry_run_and_bad_records(tiny_model_dir, siglip_captions, small_encoder, tmp_path, capsys):
    args = tiny_args(tiny_model_dir, siglip_captions, small_encoder, tmp_path / "dry", dry_run=True, max_steps=2)
    assert ps.main(args) is None
    out = capsys.readouterr().out
    assert "| 64 pairs, eval 48 |" in out and "| 2 steps x 16 pairs (0.5 epochs) |" in out
    assert not (tmp_path / "dry" / "metrics.jsonl").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "caption": "ok"}\n{"image": "x.png", "text": "no caption"}\n')
    with pytest.raises(ps.DataError, match=rf"{bad}:2: caption: expected a non-empty string"):
        ps.main(tiny_args(tiny_model_dir, siglip_captions, small_encoder, tmp_path, dataset=str(bad)))


@pytest.mark.slow
def test_torchrun_fsdp2_matches_single_process(tiny_model_dir, siglip_captions, small_encoder, tmp_path):
    """2 ranks x 8 pairs == 1 process x 16 pairs: the same global B x B loss, the same gradients and weights."""
    common = [
        "--vision-encoder",
        small_encoder,
        "--model-path",
        tiny_model_dir,
        "--dataset",
        str(siglip_captions / "train.jsonl"),
        "--eval-dataset",
        str(siglip_captions / "test.jsonl"),
        "--max-steps",
        "4",
        "--lr",
        "2e-3",
        "--warmup-steps",
        "2",
        "--dtype",
        "float32",
        "--eval-every",
        "2",
        "--save-every",
        "2",
    ]
    single = [
        sys.executable,
        "pretrain_siglip.py",
        *common,
        "--batch-size",
        "16",
        "--output-dir",
        str(tmp_path / "one"),
    ]
    multi = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "pretrain_siglip.py",
        *common,
        "--batch-size",
        "8",
        "--output-dir",
        str(tmp_path / "fsdp"),
    ]
    for cmd in (single, multi):
        run = subprocess.run(
            cmd, check=False, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stderr[-3000:]
    one, fsdp = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "fsdp")
    for key in ("train/loss", "eval/loss", "eval/shape_accuracy", "train/temperature"):
        a, b = [r[key] for r in one if key in r], [r[key] for r in fsdp if key in r]
        assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (key, a, b)
    from safetensors.torch import load_file

    wa, wb = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("one", "fsdp"))
    init = load_file(f"{small_encoder}/model.safetensors")
    trained = [k for k in wa if (wa[k] - init[k]).abs().max() > 1e-3]
    assert len(trained) > len(wa) // 2, trained  # the weights moved (the attention-pool head stays frozen)
    assert all(torch.equal(wa[k], init[k]) for k in wa if ".head." in k)
    # equal up to float summation order, which Adam's normalised first steps amplify on tiny gradient entries
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3
    assert [p.name for p in checkpoint_dirs(tmp_path / "fsdp")] == ["step_0000004"]
