"""grpo.py on image prompts: a tiny composed VLM (random-init tiny Llama + siglip-tiny) samples, is scored by the VQA
reward and trains; the sampler's logps must equal the training forward's, which only holds when every row's images
reach its own image tokens in both passes."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, plain_greedy_accuracy, subprocess_env, tiny_qwen_vl_folder, write_color_records
from safetensors.torch import load_file

import grpo
from common.data import DataError, load_records
from common.rewards import vqa_reward
from common.rollout import build_batch, generate, prompt_records, token_logps
from common.run import read_metrics
from common.vision import load_vlm


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
    items = prompt_records(colors["train"], processor)
    prompts = [processor(m, add_generation_prompt=True) for m, _ in items[:4]]
    assert all(p["input_ids"].count(processor.image_token_id) == (16 if family == "composed" else 4) for p in prompts)
    torch.manual_seed(0)
    completions, _, sampler_logps = generate(model, processor, prompts, max_new_tokens=5)
    batch = build_batch([p["input_ids"] for p in prompts], completions, processor.tokenizer.pad_token_id, sampler_logps)

    def train_logps(rows_prompts):
        with torch.no_grad():
            return token_logps(model, batch, processor.image_inputs(rows_prompts, batch["input_ids"]))

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
        rewards=("vqa", f"{tmp_path}/length_reward.py:score"),
        dynamic_sampling=False,
        micro_batch_size=3,
        eval_samples=4,
        dtype="float32",
        save_rollouts=True,
    )
    result = grpo.main(args)
    items = [(r["messages"][:-1], r["answer"], r["_dir"]) for r in load_records(colors["test"])[:4]]
    assert result["step"] == 2 and result["accuracy_after"] == plain_greedy_accuracy(out / "model", items, 4)
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
    load_model = grpo.load_model
    monkeypatch.setattr(grpo, "load_model", lambda *a, **kw: calls.append(load_model(*a, **kw)) or calls[-1])
    (tmp_path / "length_reward.py").write_text(
        "def score(completions, **kw):\n    return [len(c) / 10 for c in completions]\n"
    )
    exported = []
    for checkpointing in (False, True):
        out = tmp_path / f"gc-{checkpointing}"
        grpo.main(
            grpo.Args(
                model_path=vlm_dir,
                dataset=colors["train"],
                output_dir=str(out),
                max_steps=1,
                prompts_per_step=2,
                group_size=4,
                max_new_tokens=4,
                lr=1e-3,
                rewards=("vqa", f"{tmp_path}/length_reward.py:score"),
                dynamic_sampling=False,
                eval_samples=0,
                dtype="float32",
                gradient_checkpointing=checkpointing,
            )
        )
        exported.append(load_file(out / "model" / "model.safetensors"))
    # the policy of each run (no reference: KL is off); only the second's composed LM checkpoints
    assert [m.language_model.is_gradient_checkpointing for m in calls] == [False, True]
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
        rewards=("vqa",),  # rewards are checked before the data: name only built-in ones here
        dtype="float32",
    )
    with pytest.raises(
        DataError, match=r"colors_0.jsonl:1: the prompt holds an image but --model-path is a text model"
    ):
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
