"""ppo.py on image prompts: a tiny composed VLM (random-init tiny Llama + siglip-tiny) as actor, a second copy with a
value head as critic; both must read each row's own image (the critic's values move when the images are swapped)."""

import contextlib
import math
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

import ppo
from common.metrics import read_metrics
from common.vision import build_vlm, load_vlm, save_vlm
from conftest import ROOT, subprocess_env
from test_sft_vlm import write_color_records


@pytest.fixture(scope="module")
def vlm_dir(tiny_model_dir, tmp_path_factory):
    model, processor = build_vlm(tiny_model_dir, "siglip-tiny", image_size=64, pixel_shuffle=2, seed=0)
    return str(save_vlm(model, processor, tmp_path_factory.mktemp("tiny-vlm") / "vlm"))


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colors")
    return {"train": write_color_records(folder, 8, seed=0), "test": write_color_records(folder, 4, seed=1)}


def test_ppo_trains_a_vlm_actor_and_critic_on_image_prompts(vlm_dir, colors, tmp_path):
    out = tmp_path / "run"
    # a random-init model never names the colour (vqa reward 0 everywhere): a text-length reward gives the critic targets
    (tmp_path / "length_reward.py").write_text("def score(completions, **kw):\n    return [len(c) / 10 for c in completions]\n")
    args = ppo.Args(model_path=vlm_dir, dataset=colors["train"], eval_dataset=colors["test"], output_dir=str(out),
                    rewards=("vqa", f"{tmp_path}/length_reward.py:score"), max_steps=2, prompts_per_step=4,
                    max_new_tokens=4, lr=1e-3, critic_lr=1e-3, lr_vision=0.0, micro_batch_size=2, eval_samples=4,
                    dtype="float32")
    result = ppo.main(args)
    assert result["step"] == 2 and 0.0 <= result["accuracy_after"] <= 1.0
    rows = [r for r in read_metrics(out) if "train/value_loss" in r]
    assert len(rows) == 2 and all(r["reward/vqa_failures"] == 0 for r in rows)
    assert all(math.isfinite(r["train/value_loss"]) and math.isfinite(r["train/explained_variance"]) for r in rows)
    assert rows[1]["train/value_mean"] != 0.0  # the zero-initialised head learned something after one step
    before, after = load_file(f"{vlm_dir}/model.safetensors"), load_file(out / "model" / "model.safetensors")
    vision = [k for k in before if k.startswith("vision_encoder.")]
    lm = [k for k in before if k.startswith("language_model.") and "layers.0." in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # --lr-vision 0 froze the actor's encoder
    assert any(not torch.equal(before[k], after[k]) for k in lm)  # the actor's LM trained
    reloaded, _ = load_vlm(out / "model")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in load_vlm(vlm_dir)[0].parameters())
    critic_vision = load_file(out / "critic" / "model.safetensors")
    assert any(not torch.equal(before[k], critic_vision[k]) for k in vision)  # the critic's encoder trained (critic lr)
    head = load_file(out / "critic" / "value_head.safetensors")["weight"]
    assert head.shape == (1, reloaded.config.hidden_size) and head.abs().sum() > 0


def test_vlm_critic_values_depend_on_the_image(vlm_dir, colors):
    vlm, processor = load_vlm(vlm_dir)
    critic = ppo.VLMCritic(vlm)
    assert critic.score.weight.abs().sum() == 0  # values start at 0, as the text critic's
    torch.nn.init.normal_(critic.score.weight, std=1.0)  # a non-trivial head, so values can differ at all
    items = ppo.prompt_records(colors["train"])
    prompts = [ppo.encode_prompt(processor.tokenizer, processor, m) for m, _ in items[:4]]
    assert all(p["input_ids"].count(vlm.image_token_id) == 16 for p in prompts)
    args = types.SimpleNamespace(temperature=1.0, top_p=1.0, max_new_tokens=3)
    torch.manual_seed(0)
    completions, _ = ppo.generate(vlm, processor.tokenizer, prompts, args, contextlib.nullcontext(), processor=processor)
    batch = ppo.build_batch([p["input_ids"] for p in prompts], completions, processor.tokenizer.pad_token_id)

    def values(rows_prompts):
        with torch.no_grad():
            return ppo.token_values(critic, batch, processor.image_inputs(rows_prompts, batch["input_ids"]))

    mine, again, swapped = values(prompts), values(prompts), values(prompts[1:] + prompts[:1])
    mask = batch["response_mask"]
    assert mask.any() and torch.equal(mine, again)
    assert (mine - swapped)[mask].abs().min() > 1e-4  # same tokens, other images: every value moves


def test_text_model_refuses_image_prompts_and_rm_refuses_a_vlm(tiny_model_dir, vlm_dir, colors, tmp_path):
    args = ppo.Args(model_path=tiny_model_dir, dataset=colors["train"], output_dir=str(tmp_path), max_steps=1,
                    prompts_per_step=2, eval_samples=0, rewards=("vqa",), dtype="float32")
    with pytest.raises(SystemExit, match="image but --model-path is a text model"):
        ppo.main(args)
    with pytest.raises(SystemExit, match="--mode rm supports text models"):
        ppo.main(ppo.Args(mode="rm", model_path=vlm_dir, output_dir=str(tmp_path / "rm"), dtype="float32"))


@pytest.mark.slow
def test_torchrun_fsdp2_two_processes_vlm(vlm_dir, colors, tmp_path):
    """2 ranks under FSDP2: actor, critic and reference VLMs sharded (vision blocks too); both exports gathered."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "ppo.py",
           "--model-path", vlm_dir, "--dataset", colors["train"], "--eval-dataset", colors["test"], "--eval-samples", "2",
           "--max-steps", "2", "--prompts-per-step", "4", "--max-new-tokens", "4", "--dtype", "float32", "--lr", "1e-3",
           "--lr-vision", "0", "--rewards", "vqa", "--output-dir", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path) if "train/value_loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["train/value_loss"]) for r in rows)
    before, after = load_file(f"{vlm_dir}/model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision_encoder."))
    assert (tmp_path / "critic" / "value_head.safetensors").exists() and "accuracy after training" in run.stdout
