"""Composed VLM (encoder + projector + LM), its processor, save/load, native Qwen2-VL through the same API, easy-vqa."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_qwen_vl_folder
from PIL import Image

from common.chat import IGNORE, pack_collate, pad_collate
from common.easy_vqa import easy_vqa_records
from common.logprob import sequence_logprobs
from common.models import build_vlm
from common.vision import (
    ComposedVLM,
    Projector,
    is_vlm,
    load_vlm,
    param_groups,
    pixel_shuffle,
    save_vlm,
    vlm_generate,
)
from common.vlm_processor import NativeVLMProcessor


@pytest.fixture(scope="module")
def vlm(tiny_model_dir):
    return build_vlm(tiny_model_dir, "siglip-tiny", image_size=64, pixel_shuffle=2, seed=0)


@pytest.fixture(scope="module")
def captions():
    return easy_vqa_records("captions-train")


def caption_chat(record):
    return [
        {"role": "user", "content": [{"type": "image", "image": record["image"]}]},
        {"role": "assistant", "content": record["caption"]},
    ]


def model_kwargs(batch):
    return {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}


def test_pixel_shuffle_and_pool_on_a_hand_made_grid():
    x = torch.arange(16 * 2, dtype=torch.float32).view(1, 16, 2)  # a 4x4 grid of 2-d features: patch k = [2k, 2k+1]
    out = pixel_shuffle(x, 2)
    assert out.shape == (1, 4, 8)
    for i in range(2):
        for j in range(2):
            block = [x[0, (2 * i + dy) * 4 + 2 * j + dx] for dy in range(2) for dx in range(2)]
            assert torch.equal(out[0, i * 2 + j], torch.cat(block))
    assert out[0, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]  # patches 0, 1, 4, 5
    pool = Projector(2, 2, kind="linear", pool=2)
    pool.mlp = torch.nn.Identity()
    pooled = pool(x)  # [1, 4, 2]: mean of each 2x2 block
    assert torch.allclose(pooled[0, 3], torch.stack([x[0, k] for k in (10, 11, 14, 15)]).mean(0))


def test_image_token_count_mismatch_is_a_clear_error(vlm):
    model, processor = vlm
    ids = torch.full((1, 20), processor.image_token_id)
    ids[0, 15:] = 5  # 15 image tokens for one image of 16
    with pytest.raises(ValueError, match=r"15 image tokens but 1 images x 16 tokens_per_image = 16"):
        model(ids, pixel_values=torch.zeros(1, 3, 64, 64))


def test_image_features_land_exactly_at_the_placeholders(vlm, captions):
    model, processor = vlm
    two = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": captions[0]["image"]},
                {"type": "text", "text": "and"},
                {"type": "image", "image": captions[1]["image"]},
            ],
        },
        {"role": "assistant", "content": "ok"},
    ]
    examples = [processor(two), processor(caption_chat(captions[2]))]
    batch = pad_collate(examples, processor.tokenizer.pad_token_id) | processor.image_inputs(examples)
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])  # [2, T, H]
        patches = model.vision_encoder(pixel_values=batch["pixel_values"]).last_hidden_state  # SigLIP: no CLS token
        features = model.projector.mlp(pixel_shuffle(patches, 2))  # [3, 16, H], by hand
        tokens = model.language_model.get_input_embeddings()(batch["input_ids"])
    is_image = batch["input_ids"] == processor.image_token_id
    assert is_image.sum(1).tolist() == [32, 16]
    rows, cols = is_image.nonzero(as_tuple=True)  # row-major: row 0's two images, then row 1's
    assert torch.equal(embeds[rows, cols], features.reshape(48, -1))
    assert torch.equal(embeds[~is_image], tokens[~is_image])
    # the first image's 16 tokens are contiguous and come before the text "and"
    first = cols[:16]
    assert torch.equal(first, torch.arange(first[0], first[0] + 16))


def test_clip_and_dinov2_drop_their_prefix_tokens(tiny_model_dir, captions):
    for encoder in ("clip-tiny", "dinov2-tiny"):
        model, processor = build_vlm(tiny_model_dir, encoder, pixel_shuffle=1, pool=2, seed=1)
        pixels = processor.image_inputs([processor(caption_chat(captions[0]))])["pixel_values"]
        with torch.no_grad():
            hidden = model.vision_encoder(pixel_values=pixels).last_hidden_state
            assert hidden.shape[1] == 65  # CLS + 8x8 patches
            assert torch.equal(model.image_features(pixels), model.projector(hidden[:, 1:]))
        assert processor.tokens_per_image == 16


def test_processor_labels_truncation_and_padding(vlm, captions, tmp_path):
    model, processor = vlm
    example = processor(caption_chat(captions[0]))
    targets = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    assert processor.tokenizer.decode(targets) == captions[0]["caption"] + "<|im_end|>"
    assert example["input_ids"].count(processor.image_token_id) == 16 and len(example["images"]) == 1
    start = example["input_ids"].index(processor.image_token_id)
    cut = processor(caption_chat(captions[0]), max_len=start + 5)  # would cut the image in half: cut before it
    assert cut["truncated"] and cut["input_ids"] == example["input_ids"][:start] and cut["images"] == []
    assert processor(caption_chat(captions[0]), max_len=start + 5, overlong="drop") is None
    prompt = processor(caption_chat(captions[0])[:1], add_generation_prompt=True)
    assert all(label == IGNORE for label in prompt["labels"])
    assert processor.tokenizer.decode(prompt["input_ids"]).endswith("<|im_start|>assistant\n")
    Image.new("RGB", (64, 32), (255, 0, 0)).save(tmp_path / "wide.png")  # 2:1 -> padded to 64x64 with the mean colour
    pixels = processor.preprocess(Image.open(tmp_path / "wide.png"))
    assert pixels.shape == (3, 64, 64)
    assert (
        pixels[:, :14].abs().max() < 0.01
        and pixels[:, 18:46].sub(torch.tensor([1.0, -1, -1])[:, None, None]).abs().max() < 0.01
    )


def test_save_load_round_trip_gives_identical_logits(vlm, captions, tiny_model_dir, tmp_path):
    model, processor = vlm
    folder = save_vlm(model, processor, tmp_path / "vlm")
    assert is_vlm(folder) and not is_vlm(tiny_model_dir) and not Path(str(folder) + ".tmp").exists()
    loaded, loaded_processor = load_vlm(folder)
    examples = [processor(caption_chat(r)) for r in captions[:2]]
    again = [loaded_processor(caption_chat(r)) for r in captions[:2]]
    assert [e["input_ids"] for e in again] == [e["input_ids"] for e in examples]
    batch = pad_collate(examples, processor.tokenizer.pad_token_id) | processor.image_inputs(examples)
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], **model_kwargs(batch)).logits
        b = loaded(input_ids=batch["input_ids"], **model_kwargs(batch)).logits
    assert torch.equal(a, b)


def test_save_over_an_existing_folder_replaces_it_and_a_crash_keeps_the_old_one(tiny_model_dir, tmp_path, monkeypatch):
    import os

    first, processor = build_vlm(tiny_model_dir, "siglip-tiny", seed=0)
    second, _ = build_vlm(tiny_model_dir, "siglip-tiny", seed=1)
    folder = save_vlm(first, processor, tmp_path / "vlm")
    save_vlm(second, processor, folder)
    reloaded, _ = load_vlm(folder)
    assert torch.equal(reloaded.projector.mlp[0].weight, second.projector.mlp[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vlm"]  # no .tmp / .old left behind
    # a crash at the final rename (after the old folder was moved aside) leaves the old weights whole in vlm.old
    real_rename = os.rename

    def crash_on_publish(src, dst):
        if str(src).endswith(".tmp"):
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_publish)
    with pytest.raises(KeyboardInterrupt):
        save_vlm(first, processor, folder)
    monkeypatch.undo()
    kept, _ = load_vlm(tmp_path / "vlm.old")
    assert torch.equal(kept.projector.mlp[0].weight, second.projector.mlp[0].weight)


def test_gradient_reaches_the_projector_not_frozen_parts(tiny_model_dir, captions):
    model, processor = build_vlm(tiny_model_dir, seed=2)
    groups = param_groups(model, 1e-3, lr_vision=0.0, lr_lm=0.0, weight_decay=0.1)
    assert {g["name"] for g in groups} == {"projector"}
    assert {g["weight_decay"] for g in groups} == {0.0, 0.1}  # biases undecayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.projector.parameters()))
    examples = [processor(caption_chat(captions[0]))]
    batch = pad_collate(examples, processor.tokenizer.pad_token_id) | processor.image_inputs(examples)
    logps = sequence_logprobs(model, batch["input_ids"], batch["labels"], **model_kwargs(batch))
    (-logps.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.vision_encoder.parameters())
    assert all(p.grad is None for p in model.language_model.parameters())


@pytest.mark.slow
def test_tiny_vlm_learns_captions(tiny_model_dir, captions):
    torch.manual_seed(0)
    model, processor = build_vlm(tiny_model_dir, seed=3)
    examples = [processor(caption_chat(r)) for r in captions[:4]]
    batch = pad_collate(examples, processor.tokenizer.pad_token_id) | processor.image_inputs(examples)
    optimizer = torch.optim.AdamW(param_groups(model, 3e-3))
    n_targets = (batch["labels"][:, 1:] != IGNORE).sum()
    losses = []
    for _ in range(20):
        loss = -sequence_logprobs(model, batch["input_ids"], batch["labels"], **model_kwargs(batch)).sum() / n_targets
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_packed_rows_match_unpacked(vlm, captions):
    model, processor = vlm
    examples = [processor(caption_chat(r)) for r in captions[3:5]]
    n = [len(e["input_ids"]) for e in examples]
    packed = pack_collate([examples], processor.tokenizer.pad_token_id, sum(n) + 5) | processor.image_inputs(examples)
    with torch.no_grad():
        row = sequence_logprobs(
            model,
            packed["input_ids"],
            packed["labels"],
            position_ids=packed["position_ids"],
            pixel_values=packed["pixel_values"],
        )[0]
        for k, (e, start) in enumerate(zip(examples, (0, n[0]))):
            single = pad_collate([e], processor.tokenizer.pad_token_id) | processor.image_inputs([e])
            alone = sequence_logprobs(model, single["input_ids"], single["labels"], **model_kwargs(single))[0]
            assert (alone != 0).sum() >= 4
            assert torch.allclose(row[start : start + n[k] - 1], alone[:-1], atol=1e-5)


def test_generate_returns_new_tokens_equal_to_greedy_decoding(vlm, captions):
    model, processor = vlm
    prompts = [
        processor(caption_chat(captions[0])[:1], add_generation_prompt=True),
        processor(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe this picture, please:"},
                        {"type": "image", "image": captions[1]["image"]},
                    ],
                }
            ],
            add_generation_prompt=True,
        ),
    ]
    ids = torch.tensor([prompts[0]["input_ids"]])
    pixels = processor.image_inputs(prompts[:1])["pixel_values"]
    new = vlm_generate(model, ids, torch.ones_like(ids), pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert new.shape == (1, 3)
    with torch.no_grad():
        for _ in range(3):  # full recompute, no cache
            ids = torch.cat([ids, model(ids, pixel_values=pixels).logits[:, -1:].argmax(-1)], 1)
    assert new.tolist() == ids[:, -3:].tolist()
    # batched prompts of different lengths, left-padded, score like each alone
    T = max(len(p["input_ids"]) for p in prompts)
    ids = torch.tensor(
        [[processor.tokenizer.pad_token_id] * (T - len(p["input_ids"])) + p["input_ids"] for p in prompts]
    )
    mask = torch.tensor([[0] * (T - len(p["input_ids"])) + [1] * len(p["input_ids"]) for p in prompts])
    assert mask[0].sum() < T
    kw = dict(max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True)
    both = model.generate(ids, attention_mask=mask, **processor.image_inputs(prompts), **kw).scores
    for row, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p["input_ids"]]), **processor.image_inputs([p]), **kw).scores
        assert all(torch.allclose(b[row], a[0], atol=1e-4) for b, a in zip(both, alone))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_native_qwen_vl_through_load_vlm(family, captions, tmp_path):
    tiny_qwen_vl_folder(tmp_path / family, family)
    assert is_vlm(tmp_path / family)
    model, processor = load_vlm(tmp_path / family)
    assert isinstance(processor, NativeVLMProcessor) and not isinstance(model, ComposedVLM)
    examples = [processor(caption_chat(r)) for r in captions[:2]]
    # a 64x64 image -> 56x56 (multiples of 28) -> 4x4 patches of 14 -> 2x2 merged tokens
    assert [e["input_ids"].count(processor.image_token_id) for e in examples] == [4, 4]
    batch = pad_collate(examples, processor.tokenizer.pad_token_id)
    batch |= processor.image_inputs(examples, batch["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], **model_kwargs(batch)).logits
        assert logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
        other = dict(model_kwargs(batch), pixel_values=batch["pixel_values"].flip(0))  # swap the two images
        assert not torch.allclose(model(input_ids=batch["input_ids"], **other).logits, logits)  # the images are used
        fused = sequence_logprobs(model, batch["input_ids"], batch["labels"], **model_kwargs(batch))
        naive = sequence_logprobs(model, batch["input_ids"], batch["labels"], impl="naive", **model_kwargs(batch))
    assert torch.allclose(fused, naive, atol=1e-5) and (fused != 0).sum() > 5
    save_vlm(model, processor, tmp_path / "copy")
    again, _ = load_vlm(tmp_path / "copy")
    with torch.no_grad():
        assert torch.equal(again(input_ids=batch["input_ids"], **model_kwargs(batch)).logits, logits)


def test_easy_vqa_records_counts_and_captions():
    import importlib.util

    root = Path(importlib.util.find_spec("easy_vqa").submodule_search_locations[0], "data")
    for split, n_images in (("train", 4000), ("test", 1000)):
        questions = json.loads((root / split / "questions.json").read_text())
        qa, caps = easy_vqa_records(split), easy_vqa_records(f"captions-{split}")
        assert len(caps) == n_images and len({c["image"] for c in caps}) == n_images
        assert len(qa) == len(questions)
        assert all(Path(c["image"]).is_file() for c in caps[:50])
        for record, (question, answer, image_id) in zip(qa[:200], questions):
            user, assistant = record["messages"]
            assert user["content"][0]["image"] == str(root / split / "images" / f"{image_id}.png")
            assert user["content"][1]["text"] == question and assistant["content"] == answer == record["answer"]
        by_image = {c["image"]: c["caption"] for c in caps}
        for question, answer, image_id in questions:  # "what ...?" answers (a colour or a shape) are in the caption
            if question.startswith("what"):
                assert answer in by_image[str(root / split / "images" / f"{image_id}.png")].rstrip(".").split()
    assert len({c["caption"].split(" a ")[0] for c in caps}) >= 3  # phrasing varies
    with pytest.raises(ValueError, match="unknown kind"):
        easy_vqa_records("validation")


@pytest.mark.parametrize("family", ["siglip", "clip", "dinov2", "siglip-full", "clip-full"])
def test_a_pretrained_encoder_folder_becomes_the_vlm_encoder(family, tiny_model_dir, captions, tmp_path):
    """--vision-encoder <folder>: a SigLIP / CLIP vision model, a whole SigLIP / CLIP model (its vision tower) or
    DINOv2 saved with save_pretrained is loaded (common/encoders.load_encoder) with its weights, image size and
    preprocessor mean/std, and survives save_vlm / load_vlm; meta=True builds the same architecture without weights."""
    import transformers as tf

    from common.encoders import load_encoder

    sizes = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8, image_size=32)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    vision = dict(intermediate_size=64, **sizes)
    torch.manual_seed(0)
    saved = {"siglip": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**vision)),
             "clip": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**vision)),
             "dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(mlp_ratio=2, **sizes)),
             "siglip-full": lambda: tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision)),
             "clip-full": lambda: tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision))}[family]()  # fmt: skip
    saved.save_pretrained(tmp_path / "encoder")
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    if family == "siglip":  # the preprocessor_config.json save_encoder writes; the others fall back to the family's
        (tmp_path / "encoder" / "preprocessor_config.json").write_text(
            json.dumps({"image_mean": mean, "image_std": std})
        )
    model, processor = build_vlm(tiny_model_dir, str(tmp_path / "encoder"), pixel_shuffle=2, seed=0)
    assert processor.image_size == 32 and processor.tokens_per_image == 4  # 4x4 patches, shuffled 2x2
    if family == "siglip":
        assert (processor.image_mean, processor.image_std) == (mean, std)
    pixels = processor.image_inputs([processor(caption_chat(captions[0]))])["pixel_values"]  # [1, 3, 32, 32]
    reference = saved.vision_model if family.endswith("full") else saved
    with torch.no_grad():
        assert torch.equal(model.vision_encoder(pixel_values=pixels).last_hidden_state,
                           reference(pixel_values=pixels).last_hidden_state)  # fmt: skip
        features = model.image_features(pixels)
    meta = load_encoder(str(tmp_path / "encoder"), meta=True)[0]
    assert all(p.is_meta for p in meta.parameters())
    assert {k: v.shape for k, v in meta.state_dict().items()} == {
        k: v.shape for k, v in model.vision_encoder.state_dict().items()
    }
    save_vlm(model, processor, tmp_path / "vlm")
    loaded, loaded_processor = load_vlm(tmp_path / "vlm")
    assert (loaded_processor.image_size, loaded_processor.image_mean) == (32, processor.image_mean)
    with torch.no_grad():
        assert torch.equal(loaded.image_features(pixels), features)
