"""dpo.py on image preference pairs, with a tiny composed VLM (random-init tiny Llama + siglip-tiny): the batched pair
logps equal one-example-at-a-time values only when every row's image reaches its own image tokens; training must raise
the reward accuracy with a frozen encoder left bit-identical; the reference cache must see the pixels, not just the tokens."""

import math

import pytest
import torch
from conftest import plain_greedy_accuracy, tiny_qwen_vl_folder, write_pref_records
from PIL import Image
from safetensors.torch import load_file

import dpo
from common.data import DataError, load_records
from common.logprob import sequence_logprobs
from common.run import read_metrics
from common.vision import ComposedVLM, load_vlm


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("color-prefs")
    return {"train": write_pref_records(folder, 12, seed=0), "test": write_pref_records(folder, 4, seed=1)}


def vlm_args(vlm_dir, prefs, out, **overrides):
    base = dict(
        model_path=vlm_dir,
        dataset=prefs.get("train"),
        eval_dataset=prefs.get("test"),
        output_dir=str(out),
        ref_cache_dir=str(out / "ref-cache"),
        eval_samples=0,
        max_steps=6,
        lr=3e-3,
        warmup_steps=1,
        batch_size=12,
        max_len=128,
        dtype="float32",
        save_every=0,
        eval_every=0,
        export=False,
    )
    return dpo.Args(**{**base, **overrides})


def train_rows(out) -> list[dict]:
    return [r for r in read_metrics(out) if "train/loss" in r]


def test_pair_logps_equal_one_sequence_at_a_time(vlm_dir, prefs):
    model, processor = load_vlm(vlm_dir)
    pairs, _ = dpo.build_pairs(prefs["train"], processor, max_len=128)
    chunk = pairs[:4]
    seqs = [p[side] for side in ("chosen", "rejected") for p in chunk]  # the batch's order: chosen 0..3, rejected 0..3
    assert all(s["input_ids"].count(processor.image_token_id) == 16 and len(s["images"]) == 1 for s in seqs)
    packed_batch = dpo.collate_pairs(chunk, processor, packing=True, max_len=128)
    assert packed_batch["input_ids"].shape[0] < len(seqs) and packed_batch["pixel_values"].shape[0] == len(seqs)
    with torch.no_grad():
        padded, counts = dpo.sequence_logps(model, dpo.collate_pairs(chunk, processor, packing=False, max_len=128))
        packed, _ = dpo.sequence_logps(model, packed_batch)

        def alone(seq, images):  # one unpadded sequence through the plain logprob path, no dpo.py code
            ids, labels = torch.tensor([seq["input_ids"]]), torch.tensor([seq["labels"]])
            return sequence_logprobs(
                model, ids, labels, impl="naive", **processor.image_inputs([{"images": images}])
            ).sum()

        expected = torch.stack([alone(s, s["images"]) for s in seqs])  # [8]
        other_image = torch.stack([alone(s, seqs[(k + 1) % 4]["images"]) for k, s in enumerate(seqs)])
    assert counts.tolist() == [sum(t != -100 for t in s["labels"][1:]) for s in seqs]
    assert (padded - expected).abs().max() < 1e-4, (padded, expected)
    assert (packed - expected).abs().max() < 1e-4, (packed, expected)
    assert (other_image - expected).abs().min() > 1e-4  # the pixels reach the answer: a wrong image moves every logp


def test_dpo_learns_image_pairs_with_a_frozen_encoder_and_exports(vlm_dir, prefs, tmp_path):
    result = dpo.main(
        vlm_args(vlm_dir, prefs, tmp_path, max_steps=12, lr_vision=0.0, export=True, eval_samples=4, max_new_tokens=2)
    )
    rows = train_rows(tmp_path)
    assert len(rows) == 12
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy is the reference at step 0
    assert rows[0]["train/rewards/accuracies"] == 0.0  # margins exactly 0
    accuracy = [r["train/rewards/accuracies"] for r in rows]
    loss = [r["train/loss"] for r in rows]
    assert min(accuracy[-3:]) >= 0.9 and loss[-1] < math.log(2) - 0.1, (accuracy, loss)
    assert result["preference_accuracy_after"] >= 0.75  # held-out pairs, other images: the answers follow the pixels
    assert {k for k in rows[-1] if k.startswith("train/lr_")} == {"train/lr_projector", "train/lr_lm"}
    before = load_file(f"{vlm_dir}/model.safetensors")
    after = load_file(tmp_path / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    vision = [k for k in before if k.startswith("vision_encoder.")]
    assert len(vision) > 10 and all(torch.equal(before[k], after[k]) for k in vision)
    for part in ("projector.", "language_model."):  # the trained parts did move
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part)), part
    items = [(r["prompt"], r["answer"], r["_dir"]) for r in load_records(prefs["test"])[:4]]
    assert result["accuracy_before"] == plain_greedy_accuracy(vlm_dir, items, 2)
    assert result["accuracy_after"] == plain_greedy_accuracy(tmp_path / "model", items, 2)
    # the export reloads and reproduces the final held-out eval (mean chosen logp over the 4 test pairs)
    model, processor = load_vlm(tmp_path / "model")
    assert isinstance(model, ComposedVLM)
    pairs, _ = dpo.build_pairs(prefs["test"], processor, max_len=128)
    with torch.no_grad():
        logps, _ = dpo.sequence_logps(
            model,
            dpo.collate_pairs(pairs, processor, packing=False, max_len=128),
        )
    final_eval = [r for r in read_metrics(tmp_path) if "eval/logps/chosen" in r][-1]
    assert logps[: len(pairs)].mean().item() == pytest.approx(final_eval["eval/logps/chosen"], abs=1e-4)


def test_reference_cache_reused_and_keyed_on_pixels(vlm_dir, tmp_path, capsys):
    data = write_pref_records(tmp_path / "data", 8, seed=2)  # this test repaints an image: its own copy
    cache = tmp_path / "cache"
    common = dict(dataset=data, eval_dataset=None, ref_cache_dir=str(cache), max_steps=1, batch_size=8)
    first = dpo.main(vlm_args(vlm_dir, {}, tmp_path / "a", **common))
    assert first["ref_cache_hit"] == {"train": False} and len(list(cache.glob("*.pt"))) == 1
    capsys.readouterr()
    # packed this time: the cached (padded) reference must still equal the packed policy at step 0
    second = dpo.main(vlm_args(vlm_dir, {}, tmp_path / "b", packing=True, **common))
    assert second["ref_cache_hit"] == {"train": True} and "cached reference logps" in capsys.readouterr().out
    assert train_rows(tmp_path / "b")[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)

    _, processor = load_vlm(vlm_dir)

    def key():
        pairs, _ = dpo.build_pairs(data, processor, max_len=128)
        return dpo.reference_cache_key(vlm_dir, pairs, ("chosen", "rejected"), 128, torch.float32), pairs

    old_key, old_pairs = key()
    assert [p.stem for p in cache.glob("*.pt")] == [old_key]
    image_file = tmp_path / "data" / "images" / "2_3.png"  # repainted in place: same name, same tokens
    image = Image.open(image_file)
    image.putpixel((40, 40), (0, 0, 0))
    image.save(image_file)
    new_key, new_pairs = key()
    assert [p["chosen"]["input_ids"] for p in new_pairs] == [p["chosen"]["input_ids"] for p in old_pairs]
    assert new_key != old_key
    third = dpo.main(vlm_args(vlm_dir, {}, tmp_path / "c", **common))
    assert third["ref_cache_hit"] == {"train": False} and len(list(cache.glob("*.pt"))) == 2


def test_text_model_refuses_image_pairs(tiny_model_dir, prefs, tmp_path):
    with pytest.raises(DataError, match=r"prefs_0\.jsonl:1: the chat holds an image but --model-path is a text model"):
        dpo.main(
            dpo.Args(
                model_path=tiny_model_dir,
                dataset=prefs["train"],
                eval_dataset=None,
                output_dir=str(tmp_path),
                dry_run=True,
            )
        )


@pytest.mark.slow
def test_native_vlm_trains_unpacked_on_image_pairs(prefs, tmp_path, capsys):
    """Qwen2-VL computes its own M-RoPE positions (image_inputs sets position_ids=None): --packing falls back to padding,
    and the policy still equals the cached reference at step 0."""
    tiny_qwen_vl_folder(tmp_path / "qwen2_vl", "qwen2_vl")
    result = dpo.main(
        vlm_args(
            str(tmp_path / "qwen2_vl"),
            prefs,
            tmp_path / "run",
            max_steps=4,
            max_len=256,
            packing=True,
            export=True,
            eval_samples=2,
            max_new_tokens=2,
        )
    )
    assert "--no-packing" in capsys.readouterr().out
    loss = [r["train/loss"] for r in train_rows(tmp_path / "run")]
    assert loss[0] == pytest.approx(math.log(2), abs=1e-4) and loss[-1] < loss[0], loss
    assert result["preference_accuracy_after"] >= 0.75
    assert not isinstance(load_vlm(tmp_path / "run" / "model")[0], ComposedVLM)
