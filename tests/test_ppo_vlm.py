"""ppo.py on image prompts: a tiny composed VLM (random-init tiny Llama + siglip-tiny) as actor, a second copy with a
value head as critic; both must read each row's own image (the critic's values move when the images are swapped).
The VLM reward model (--mode rm on image pairs) must learn pairs that only the image tells apart, export, reload to the
same scores, and score PPO's rollouts with their images."""

import contextlib
import json
import math
import subprocess
import sys
import types

import pytest
import torch
from conftest import ROOT, subprocess_env
from safetensors.torch import load_file
from test_dpo_vlm import write_pref_records
from test_sft_vlm import write_color_records

import ppo
from common.logprob import forward_hidden
from common.metrics import read_metrics
from common.vision import EASY_VQA_COLORS, EASY_VQA_SHAPES, build_vlm, checkpoint_vlm, load_images, load_vlm, save_vlm


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


def test_gradient_checkpointing_reaches_the_vlm_actor_and_critic(vlm_dir, colors, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ppo, "checkpoint_vlm", lambda model: calls.append(model) or checkpoint_vlm(model))
    (tmp_path / "length_reward.py").write_text(
        "def score(completions, **kw):\n    return [len(c) / 10 for c in completions]\n"
    )
    result = ppo.main(
        ppo.Args(
            model_path=vlm_dir,
            dataset=colors["train"],
            output_dir=str(tmp_path / "run"),
            rewards=(f"{tmp_path}/length_reward.py:score",),
            max_steps=1,
            prompts_per_step=4,
            max_new_tokens=4,
            lr=1e-3,
            critic_lr=1e-3,
            eval_samples=0,
            dtype="float32",
            gradient_checkpointing=True,
        )
    )
    assert result["step"] == 1
    assert (
        len(calls) == 2 and calls[0] is not calls[1] and all(m.language_model.is_gradient_checkpointing for m in calls)
    )
    pairs = write_pref_records(tmp_path / "pairs", 4, seed=0, names=("red", "blue"))  # --mode rm on a VLM too
    result = ppo.main(
        ppo.Args(
            mode="rm",
            model_path=vlm_dir,
            dataset=pairs,
            eval_samples=0,
            output_dir=str(tmp_path / "rm"),
            max_steps=1,
            pairs_per_step=4,
            micro_batch_size=8,
            dtype="float32",
            export=False,
            gradient_checkpointing=True,
        )
    )
    assert result["step"] == 1 and len(calls) == 3 and calls[2].language_model.is_gradient_checkpointing


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
    completions, _ = ppo.generate(
        vlm, processor.tokenizer, prompts, args, contextlib.nullcontext(), processor=processor
    )
    batch = ppo.build_batch([p["input_ids"] for p in prompts], completions, processor.tokenizer.pad_token_id)

    def values(rows_prompts):
        with torch.no_grad():
            return ppo.token_values(critic, batch, processor.image_inputs(rows_prompts, batch["input_ids"]))

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
    with pytest.raises(SystemExit, match="image but --model-path is a text model"):
        ppo.main(args)


# ------------------------------------------------------------------------------------------- the VLM reward model
def plain_score(vlm, head, processor, row, images=None):
    """The reward of one chat row ({"chat", "base_dir"}) computed without ppo.py: encoded alone, unpadded, with its own
    images (or `images`), then the head on the final hidden state of its last token."""
    example = processor(row["chat"], base_dir=row["base_dir"])
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        hidden = forward_hidden(
            vlm, ids, pixel_values=torch.cat([i["pixel_values"] for i in images or example["images"]])
        )
    return float(hidden[0, -1].float() @ head[0])


@pytest.fixture(scope="module")
def vlm_rm(vlm_dir, tmp_path_factory):
    """A VLM reward model trained by `ppo.py --mode rm` on 12 image pairs, with its in-memory model (caught at export)."""
    folder = tmp_path_factory.mktemp("vlm-rm")
    pairs = write_pref_records(folder / "data", 12, seed=0, names=("red", "blue"))
    caught = {}
    export = ppo.export_vlm_critic

    def catching_export(args, critic, processor, out, rank):
        caught["model"] = critic
        return export(args, critic, processor, out, rank)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppo, "export_vlm_critic", catching_export)
        result = ppo.main(
            ppo.Args(
                mode="rm",
                model_path=vlm_dir,
                dataset=pairs,
                eval_dataset=pairs,
                eval_samples=12,
                output_dir=str(folder / "run"),
                max_steps=24,
                pairs_per_step=12,
                micro_batch_size=24,
                lr=3e-4,
                dtype="float32",
            )
        )
    return {"pairs": pairs, "run": folder / "run", "result": result, "model": caught["model"]}


def test_vlm_reward_model_learns_pairs_only_the_image_tells_apart(vlm_rm):
    result, rows = vlm_rm["result"], [r for r in read_metrics(vlm_rm["run"]) if "train/loss" in r]
    assert len(rows) == 24 and rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero head: margins 0
    assert result["pair_accuracy_before"] == 0.0  # every margin exactly 0 counts as wrong
    assert result["pair_accuracy_after"] >= 0.9, result  # text alone (same question, both orders) caps this at 0.5
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.05


def test_vlm_reward_model_export_reloads_to_the_same_scores(vlm_rm):
    folder = vlm_rm["run"] / "model"
    assert (folder / "value_head.safetensors").exists() and ppo.is_vlm(folder)
    reloaded, processor = ppo.load_vlm_critic(folder, "cpu")
    pairs = ppo.preference_pairs(vlm_rm["pairs"], processor.tokenizer, 512, processor)[:4]
    rows = [side for pair in pairs for side in pair]
    trained = vlm_rm["model"].eval()
    pad = processor.tokenizer.pad_token_id
    got = ppo.score_rows(reloaded, rows, pad, "cpu", contextlib.nullcontext(), 8, processor)
    want = ppo.score_rows(trained, rows, pad, "cpu", contextlib.nullcontext(), 8, processor)
    assert got.abs().max() > 1e-3 and (got - want).abs().max() < 1e-4, (got, want)
    # ...and without ppo.py's batching: the saved VLM and head, one example at a time
    vlm, _ = load_vlm(folder)
    head = load_file(folder / "value_head.safetensors")["weight"]
    alone = torch.tensor([plain_score(vlm, head, processor, r) for r in rows])
    assert (alone - want).abs().max() < 1e-4, (alone, want)


def test_ppo_scores_rollouts_with_the_vlm_reward_model_and_their_images(vlm_dir, vlm_rm, colors, tmp_path, monkeypatch):
    caught = []
    score_rows = ppo.score_rows

    def catching_score_rows(value_model, rows, *a, **k):
        out = score_rows(value_model, rows, *a, **k)
        caught.append((rows, out))
        return out

    monkeypatch.setattr(ppo, "score_rows", catching_score_rows)
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
    for messages, _ in ppo.prompt_records(colors["train"]):
        prompts[load_images(messages)[0].tobytes()] = messages[0]["content"][1]["text"]
    images = [processor(row["chat"], base_dir=row["base_dir"])["images"] for row in rows]
    for k, row in enumerate(rows):  # each rollout was scored with its own prompt's image, which the score depends on
        user, answer = row["chat"]
        assert answer["role"] == "assistant" and len(images[k]) == 1
        assert prompts[load_images([user], row["base_dir"])[0].tobytes()] == user["content"][1]["text"]
        assert plain_score(vlm, head, processor, row) == pytest.approx(float(scores[k]), abs=1e-4)
    other_images = [plain_score(vlm, head, processor, row, images[(k + 1) % len(rows)]) for k, row in enumerate(rows)]
    assert max(abs(o - float(s)) for o, s in zip(other_images, scores)) > 1e-4


def test_reward_model_data_errors(tiny_model_dir, vlm_dir, vlm_rm, colors, tmp_path):
    text_pairs = tmp_path / "text_pairs.jsonl"
    text_pairs.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    with pytest.raises(SystemExit, match=r"text_pairs\.jsonl:1: the pair holds no image but --model-path is a VLM"):
        ppo.main(
            ppo.Args(mode="rm", model_path=vlm_dir, dataset=str(text_pairs), output_dir=str(tmp_path), dry_run=True)
        )
    with pytest.raises(SystemExit, match=r"prefs_0\.jsonl:1: the pair holds an image but --model-path is a text"):
        ppo.main(
            ppo.Args(
                mode="rm", model_path=tiny_model_dir, dataset=vlm_rm["pairs"], output_dir=str(tmp_path), dry_run=True
            )
        )
    with pytest.raises(SystemExit, match="is a VLM reward model.*--model-path is a text model"):
        ppo.main(
            ppo.Args(
                model_path=tiny_model_dir,
                reward_model=str(vlm_rm["run"] / "model"),
                output_dir=str(tmp_path),
                dataset=colors["train"],
                dry_run=True,
            )
        )


def test_easy_vqa_pairs_kinds():
    from common.data import detect_format, load_records

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
