"""ppo.py on image prompts: a tiny composed VLM (random-init tiny Llama + siglip-tiny) as actor, a second copy with a
value head as critic; both must read each row's own image (the critic's values move when the images are swapped). A VLM
reward model (reward_model.py on image pairs, tests/test_reward_model.py) must score PPO's rollouts with their images."""

import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, plain_greedy_accuracy, subprocess_env, write_color_records
from safetensors.torch import load_file

import ppo
from common.data import DataError, load_records
from common.easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES
from common.logprob import forward_hidden
from common.rollout import build_batch, generate, prompt_records
from common.run import read_metrics
from common.value import VLMCritic, token_values
from common.vision import load_vlm
from common.vlm_processor import load_images


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colors")
    return {"train": write_color_records(folder, 8, seed=0), "test": write_color_records(folder, 4, seed=1)}


def test_ppo_trains_a_vlm_actor_and_critic_on_image_prompts(vlm_dir, colors, tmp_path):
    out = tmp_path / "run"
    # a random-init model never names the colour (vqa reward 0 everywhere): a text-length reward gives the critic targets
    (tmp_path / "length_reward.py").write_text(
        "def score(completions, **kw):\n    return [len(c) / 10 for c in completions]\n"
    )
    args = ppo.Args(
        model_path=vlm_dir,
        dataset=colors["train"],
        eval_dataset=colors["test"],
        output_dir=str(out),
        rewards=("vqa", f"{tmp_path}/length_reward.py:score"),
        max_steps=2,
        prompts_per_step=4,
        max_new_tokens=4,
        lr=1e-3,
        critic_lr=1e-3,
        lr_vision=0.0,
        micro_batch_size=2,
        eval_samples=4,
        dtype="float32",
    )
    result = ppo.main(args)
    items = [(r["messages"][:-1], r["answer"], r["_dir"]) for r in load_records(colors["test"])[:4]]
    assert result["step"] == 2 and result["accuracy_after"] == plain_greedy_accuracy(out / "model", items, 4)
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


def test_gradient_checkpointing_reaches_the_vlm_actor_and_critic(vlm_dir, colors, tmp_path, monkeypatch):
    loaded = []
    load_model, load_value_model = ppo.load_model, ppo.load_value_model
    monkeypatch.setattr(ppo, "load_model", lambda *a, **kw: loaded.append(load_model(*a, **kw)) or loaded[-1])
    monkeypatch.setattr(ppo, "load_value_model", lambda *a, **kw: loaded.append(load_value_model(*a, **kw)[0]) or
                        (loaded[-1], None))  # fmt: skip
    (tmp_path / "length_reward.py").write_text(
        "def score(completions, **kw):\n    return [len(c) / 10 for c in completions]\n"
    )
    args = ppo.Args(model_path=vlm_dir, dataset=colors["train"], output_dir=str(tmp_path / "run"),
                    rewards=(f"{tmp_path}/length_reward.py:score",), max_steps=1, prompts_per_step=4, max_new_tokens=4,
                    lr=1e-3, critic_lr=1e-3, eval_samples=0, dtype="float32", kl_coef=0.0, gradient_checkpointing=True)  # fmt: skip
    assert ppo.main(args)["step"] == 1
    actor, critic = loaded
    assert actor.language_model.is_gradient_checkpointing and critic.vlm.language_model.is_gradient_checkpointing


def test_vlm_critic_values_depend_on_the_image(vlm_dir, colors):
    vlm, processor = load_vlm(vlm_dir)
    critic = VLMCritic(vlm)
    assert critic.score.weight.abs().sum() == 0  # values start at 0, as the text critic's
    torch.nn.init.normal_(critic.score.weight, std=1.0)  # a non-trivial head, so values can differ at all
    items = prompt_records(colors["train"], processor)
    prompts = [processor(m, add_generation_prompt=True) for m, _ in items[:4]]
    assert all(p["input_ids"].count(vlm.image_token_id) == 16 for p in prompts)
    torch.manual_seed(0)
    completions, _, _ = generate(vlm, processor, prompts, max_new_tokens=3)
    batch = build_batch([p["input_ids"] for p in prompts], completions, processor.tokenizer.pad_token_id)

    def values(rows_prompts):
        with torch.no_grad():
            return token_values(critic, batch, processor.image_inputs(rows_prompts, batch["input_ids"]))

    mine, again, swapped = values(prompts), values(prompts), values(prompts[1:] + prompts[:1])
    mask = batch["response_mask"]
    assert mask.any() and torch.equal(mine, again)
    assert (mine - swapped)[mask].abs().min() > 1e-4  # same tokens, other images: every value moves


def test_text_model_refuses_image_prompts(tiny_model_dir, colors, tmp_path):
    args = ppo.Args(
        model_path=tiny_model_dir,
        dataset=colors["train"],
        output_dir=str(tmp_path),
        max_steps=1,
        prompts_per_step=2,
        eval_samples=0,
        rewards=("vqa",),
        dtype="float32",
    )
    with pytest.raises(
        DataError, match=r"colors_0\.jsonl:1: the prompt holds an image but --model-path is a text model"
    ):
        ppo.main(args)


# ------------------------------------------------------------------------------------------- the VLM reward model
def plain_score(vlm, head, processor, chat, images=None):
    """The reward of one (messages, image folder) chat computed without the scripts: encoded alone, unpadded, with its
    own images (or `images`), then the head on the final hidden state of its last token."""
    example = processor(chat[0], base_dir=chat[1])
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        hidden = forward_hidden(
            vlm, ids, pixel_values=torch.cat([i["pixel_values"] for i in images or example["images"]])
        )
    return float(hidden[0, -1].float() @ head[0])


def test_ppo_scores_rollouts_with_the_vlm_reward_model_and_their_images(vlm_dir, vlm_rm, colors, tmp_path, monkeypatch):
    caught = []
    score_chats = ppo.score_chats

    def catching_score_chats(value_model, processor, chats, *a, **k):
        out = score_chats(value_model, processor, chats, *a, **k)
        caught.append((chats, out))
        return out

    monkeypatch.setattr(ppo, "score_chats", catching_score_chats)
    rm_folder = vlm_rm["run"] / "model"
    args = ppo.Args(
        model_path=vlm_dir,
        reward_model=str(rm_folder),
        rewards=(),
        dataset=colors["train"],
        output_dir=str(tmp_path),
        max_steps=1,
        prompts_per_step=4,
        max_new_tokens=3,
        micro_batch_size=2,
        eval_samples=0,
        kl_coef=0.0,
        dtype="float32",
        export=False,
    )
    assert ppo.main(args)["step"] == 1
    ((rows, scores),) = caught
    logged = [r for r in read_metrics(tmp_path) if "reward/reward_model_mean" in r][0]
    assert logged["reward/reward_model_mean"] == pytest.approx(float(scores.mean()), abs=1e-6)
    assert logged["reward/mean"] == pytest.approx(float(scores.mean()), abs=1e-6)  # the only reward
    vlm, processor = load_vlm(rm_folder)
    head = load_file(rm_folder / "value_head.safetensors")["weight"]
    prompts = {}  # each training prompt's pixels -> its question
    for messages, _ in prompt_records(colors["train"], processor):
        prompts[load_images(messages)[0].tobytes()] = messages[0]["content"][1]["text"]
    images = [processor(row[0], base_dir=row[1])["images"] for row in rows]
    for k, row in enumerate(rows):  # each rollout was scored with its own prompt's image, which the score depends on
        user, answer = row[0]
        assert answer["role"] == "assistant" and len(images[k]) == 1
        assert prompts[load_images([user], row[1])[0].tobytes()] == user["content"][1]["text"]
        assert plain_score(vlm, head, processor, row) == pytest.approx(float(scores[k]), abs=1e-4)
    other_images = [plain_score(vlm, head, processor, row, images[(k + 1) % len(rows)]) for k, row in enumerate(rows)]
    assert max(abs(o - float(s)) for o, s in zip(other_images, scores)) > 1e-4


def test_a_vlm_reward_model_needs_a_vlm_policy(tiny_model_dir, vlm_rm, colors, tmp_path):
    with pytest.raises(SystemExit, match="is a VLM reward model.*--model-path is a text model"):
        ppo.main(ppo.Args(model_path=tiny_model_dir, reward_model=str(vlm_rm["run"] / "model"), output_dir=str(tmp_path),
                          dataset=colors["train"], dry_run=True))  # fmt: skip


def test_easy_vqa_pairs_kinds():
    from common.data import load_records
    from common.datasets import detect_format

    pairs, again = load_records("easy-vqa:pairs-test"), load_records("easy-vqa:pairs-test")
    chats = load_records("easy-vqa:test")
    assert detect_format(pairs) == "preference" and len(pairs) == len(chats) > 1000
    strip = lambda r: {k: v for k, v in r.items() if k != "_dir"}  # noqa: E731
    assert [strip(r) for r in pairs] == [strip(r) for r in again]  # deterministic
    rejected_for = {}
    for pair, chat in zip(pairs, chats):
        chosen, rejected = pair["chosen"], pair["rejected"]
        assert chosen == pair["answer"] == chat["answer"] and pair["prompt"] == chat["messages"][:1]
        assert rejected != chosen
        kind = next(g for g in (("yes", "no"), EASY_VQA_COLORS, EASY_VQA_SHAPES) if chosen in g)
        assert rejected in kind  # a wrong answer of the same kind
        rejected_for.setdefault(chosen, set()).add(rejected)
    assert rejected_for["yes"] == {"no"} and rejected_for["no"] == {"yes"}
    assert all(
        len(rejected_for[c]) == len(EASY_VQA_COLORS) - 1 for c in EASY_VQA_COLORS
    )  # varied, not one fixed colour
    assert all(len(rejected_for[s]) == len(EASY_VQA_SHAPES) - 1 for s in EASY_VQA_SHAPES)


@pytest.mark.slow
def test_torchrun_fsdp2_two_processes_vlm(vlm_dir, colors, tmp_path):
    """2 ranks under FSDP2: actor, critic and reference VLMs sharded (vision blocks too); both exports gathered."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "ppo.py",
        "--model-path",
        vlm_dir,
        "--dataset",
        colors["train"],
        "--eval-dataset",
        colors["test"],
        "--eval-samples",
        "2",
        "--max-steps",
        "2",
        "--prompts-per-step",
        "4",
        "--max-new-tokens",
        "4",
        "--dtype",
        "float32",
        "--lr",
        "1e-3",
        "--lr-vision",
        "0",
        "--rewards",
        "vqa",
        "--output-dir",
        str(tmp_path),
    ]
    run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path) if "train/value_loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["train/value_loss"]) for r in rows)
    before, after = load_file(f"{vlm_dir}/model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision_encoder."))
    assert (tmp_path / "critic" / "value_head.safetensors").exists() and "accuracy after training" in run.stdout
