"""grpo.py on image prompts: a tiny composed VLM (random-init tiny Llama + siglip-tiny) samples, is scored by the VQA
reward and trains; the sampler's logps must equal the training forward's, which only holds when every row's images
reach its own image tokens in both passes."""

import contextlib
import subprocess
import sys
import types

import pytest
import torch
from conftest import ROOT, subprocess_env
from safetensors.torch import load_file
from test_sft_vlm import write_color_records
from test_vision import tiny_qwen_vl_folder

import grpo
from common.metrics import read_metrics
from common.rewards import vqa_reward
from common.vision import build_vlm, checkpoint_vlm, load_vlm, save_vlm


@pytest.fixture(scope="module")
def vlm_dir(tiny_model_dir, tmp_path_factory):
    model, processor = build_vlm(tiny_model_dir, "siglip-tiny", image_size=64, pixel_shuffle=2, seed=0)
    return str(save_vlm(model, processor, tmp_path_factory.mktemp("tiny-vlm") / "vlm"))


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colors")
    return {"train": write_color_records(folder, 8, seed=0), "test": write_color_records(folder, 4, seed=1)}


def test_vqa_reward_follows_the_vqa_score():
    # 3 of 10 annotators said "red": leaving out one of them gives min(1, 2/3), any other min(1, 3/3) -> (3*2/3 + 7) / 10
    answers = ["red"] * 3 + ["blue"] * 7
    assert vqa_reward(
        ["Red.", "<think>hm</think><answer>red</answer>", "green"], answers=[answers] * 3
    ) == pytest.approx([0.9, 0.9, 0.0])
    assert vqa_reward(["two", "2", "no"], answers=["2", "2", None]) == [1.0, 1.0, 0.0]  # number words -> digits


@pytest.mark.parametrize("family", ["composed", "qwen2_vl"])
def test_vlm_sampler_logps_equal_training_logps_with_images_in_place(family, vlm_dir, colors, tmp_path):
    if family == "qwen2_vl":  # a native HF VLM: its own image tokens, pixel layout and 3-D M-RoPE positions
        tiny_qwen_vl_folder(tmp_path / family, family)
    model, processor = load_vlm(vlm_dir if family == "composed" else tmp_path / family)
    items, _ = grpo.prompt_records(colors["train"])
    prompts = [grpo.encode_prompt(processor.tokenizer, processor, m) for m, _ in items[:4]]
    assert all(p["input_ids"].count(processor.image_token_id) == (16 if family == "composed" else 4) for p in prompts)
    args = types.SimpleNamespace(
        temperature=1.0, top_p=1.0, fire_temperature=None, max_new_tokens=5, logprob_impl="fused"
    )
    torch.manual_seed(0)
    completions, _, sampler_logps = grpo.generate(
        model, processor.tokenizer, prompts, args, contextlib.nullcontext(), processor=processor
    )
    batch = grpo.build_batch(
        [p["input_ids"] for p in prompts], completions, processor.tokenizer.pad_token_id, sampler_logps
    )

    def train_logps(rows_prompts):
        with torch.no_grad():
            return grpo.token_logps(
                model, batch, args, image_inputs=processor.image_inputs(rows_prompts, batch["input_ids"])
            )

    mask = batch["response_mask"]
    assert mask.sum() == sum(len(c) for c in completions) > 0
    assert (train_logps(prompts) - batch["rollout_logps"])[mask].abs().max() < 1e-4
    swapped = prompts[1:] + prompts[:1]  # every row sees another row's image: the logps must move
    assert (train_logps(swapped) - batch["rollout_logps"])[mask].abs().max() > 1e-3


def test_grpo_trains_a_vlm_on_image_prompts_with_the_vqa_reward(vlm_dir, colors, tmp_path):
    out = tmp_path / "run"
    # a random-init model never names the colour (vqa reward 0 everywhere): a text-length reward gives advantages
    (tmp_path / "length_reward.py").write_text(
        "def score(completions, **kw):\n    return [len(c) / 10 for c in completions]\n"
    )
    args = grpo.Args(
        reward_fn=(f"{tmp_path}/length_reward.py:score",),
        model_path=vlm_dir,
        dataset=colors["train"],
        eval_dataset=colors["test"],
        output_dir=str(out),
        max_steps=2,
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=4,
        lr=1e-3,
        lr_vision=0.0,
        rewards=("vqa",),
        dynamic_sampling=False,
        micro_batch_size=3,
        eval_samples=4,
        dtype="float32",
        save_rollouts=True,
    )
    result = grpo.main(args)
    assert result["step"] == 2 and 0.0 <= result["accuracy_after"] <= 1.0
    rows = [r for r in read_metrics(out) if "reward/vqa_mean" in r]
    assert len(rows) == 2 and all(r["reward/vqa_failures"] == 0 for r in rows)
    before, after = load_file(f"{vlm_dir}/model.safetensors"), load_file(out / "model" / "model.safetensors")
    vision = [k for k in before if k.startswith("vision_encoder.")]
    lm = [k for k in before if k.startswith("language_model.") and "layers.0." in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # --lr-vision 0 froze the encoder
    assert any(not torch.equal(before[k], after[k]) for k in lm)  # the LM trained
    reloaded, _ = load_vlm(out / "model")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in load_vlm(vlm_dir)[0].parameters())
    assert "<image>" in (out / "rollouts.jsonl").read_text().splitlines()[0]


def test_gradient_checkpointing_reaches_a_vlms_lm_and_changes_no_number(vlm_dir, colors, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(grpo, "checkpoint_vlm", lambda model: calls.append(model) or checkpoint_vlm(model))
    (tmp_path / "length_reward.py").write_text(
        "def score(completions, **kw):\n    return [len(c) / 10 for c in completions]\n"
    )
    exported = []
    for checkpointing in (False, True):
        out = tmp_path / f"gc-{checkpointing}"
        grpo.main(
            grpo.Args(
                reward_fn=(f"{tmp_path}/length_reward.py:score",),
                model_path=vlm_dir,
                dataset=colors["train"],
                output_dir=str(out),
                max_steps=1,
                prompts_per_step=2,
                group_size=4,
                max_new_tokens=4,
                lr=1e-3,
                rewards=("vqa",),
                dynamic_sampling=False,
                eval_samples=0,
                dtype="float32",
                gradient_checkpointing=checkpointing,
            )
        )
        exported.append(load_file(out / "model" / "model.safetensors"))
    assert (
        len(calls) == 1 and calls[0].language_model.is_gradient_checkpointing
    )  # second run only: the composed VLM's LM
    before = load_file(f"{vlm_dir}/model.safetensors")
    assert any(not torch.equal(before[k], exported[1][k]) for k in before)  # it trained
    assert all(torch.allclose(exported[0][k], exported[1][k], atol=1e-6) for k in before)  # recomputation, same numbers


def test_text_model_refuses_image_prompts(tiny_model_dir, colors, tmp_path):
    args = grpo.Args(
        model_path=tiny_model_dir,
        dataset=colors["train"],
        output_dir=str(tmp_path),
        max_steps=1,
        prompts_per_step=2,
        group_size=2,
        eval_samples=0,
        rewards=("vqa",),
        dtype="float32",
    )
    with pytest.raises(SystemExit, match="image but --model-path is a text model"):
        grpo.main(args)


@pytest.mark.slow
def test_torchrun_fsdp2_on_image_prompts(vlm_dir, colors, tmp_path):
    """2 ranks under FSDP2: a composed VLM's generate (which bypasses forward) must gather the sharded root weights."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "grpo.py",
        "--model-path",
        vlm_dir,
        "--dataset",
        colors["train"],
        "--eval-dataset",
        colors["test"],
        "--eval-samples",
        "2",
        "--max-steps",
        "1",
        "--prompts-per-step",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "4",
        "--dtype",
        "float32",
        "--rewards",
        "vqa",
        "--no-dynamic-sampling",
        "--lr-vision",
        "0",
        "--output-dir",
        str(tmp_path),
    ]
    run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path) if "reward/vqa_mean" in r] == [1]
    before, after = load_file(f"{vlm_dir}/model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision_encoder."))
    assert "accuracy after training" in run.stdout
