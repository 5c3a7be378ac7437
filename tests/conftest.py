"""Shared fixtures: a tiny random-init model of SmolLM2's family saved as a real HF folder (so scripts load it through
the same path as any user model, including under torchrun), and a small slice of the bundled arithmetic task."""

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from common.models import load_tokenizer, tiny_model

    folder = tmp_path_factory.mktemp("tiny-smollm2")
    tiny_model("smollm2-135m", seed=0).save_pretrained(folder)
    load_tokenizer("smollm2-135m").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def arith_small(tmp_path_factory):
    """First 48 training and 8 held-out records of the bundled task."""
    folder = tmp_path_factory.mktemp("arith-small")
    for split, n in (("train", 48), ("test", 8)):
        lines = (ROOT / "data" / "arith" / f"{split}.jsonl").read_text().splitlines()[:n]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def subprocess_env(threads: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    env.pop("WORLD_SIZE", None)
    return env


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ shared models and data files
@pytest.fixture(scope="session")
def sharper_tiny_model_dir(tmp_path_factory):
    """The tiny model with its final-norm gain x6: logits a little less flat, so a few steps move sampling visibly."""
    import torch

    from common.models import load_tokenizer, tiny_model

    folder = tmp_path_factory.mktemp("tiny-sharper")
    model = tiny_model("smollm2-135m", seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)
    model.save_pretrained(folder)
    load_tokenizer("smollm2-135m").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def vlm_dir(tiny_model_dir, tmp_path_factory):
    """A tiny composed VLM (the tiny LM + a random-init siglip-tiny, 16 image tokens) saved with save_vlm."""
    from common.models import build_vlm
    from common.vision import save_vlm

    model, processor = build_vlm(tiny_model_dir, "siglip-tiny", image_size=64, pixel_shuffle=2, seed=0)
    return str(save_vlm(model, processor, tmp_path_factory.mktemp("tiny-vlm") / "vlm"))


@pytest.fixture(scope="session")
def pref_small(tmp_path_factory):
    """First 16 training and 8 held-out pairs of the bundled preference set."""
    folder = tmp_path_factory.mktemp("arith-pref-small")
    for split, n in (("train", 16), ("test", 8)):
        lines = (ROOT / "data" / "arith_pref" / f"{split}.jsonl").read_text().splitlines()[:n]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def write_captions(folder, n_train: int, n_test: int):
    """train.jsonl and test.jsonl of the first n_train / n_test easy-VQA caption records, images copied to images/."""
    import shutil

    from common.easy_vqa import easy_vqa_records

    (folder / "images").mkdir()
    for split, kind, n in (("train", "captions-train", n_train), ("test", "captions-test", n_test)):
        lines = []
        for k, r in enumerate(easy_vqa_records(kind)[:n]):
            shutil.copy(r["image"], folder / "images" / f"{split}{k}.png")
            lines.append(json.dumps({"image": f"images/{split}{k}.png", "caption": r["caption"]}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def captions_dir(tmp_path_factory):
    """train.jsonl (24 records) and test.jsonl (8) of easy-VQA captions, images copied to images/ beside them."""
    return write_captions(tmp_path_factory.mktemp("captions"), 24, 8)


def vowel_fraction(completions, prompts=None, answers=None, **kwargs):
    """A reward a random-init model can learn: the share of letters that are vowels (tokens differ a lot in it)."""
    out = []
    for c in completions:
        letters = [ch for ch in c.lower() if ch.isalpha()]
        out.append(sum(ch in "aeiou" for ch in letters) / len(letters) if letters else 0.0)
    return out


def answer_digits(completions, prompts=None, answers=None, **kwargs):
    """A reward that ignores the completion: the number of digits of the reference answer (equal across a prompt's
    completions, different across prompts)."""
    return [float(len(str(a))) for a in answers]


COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
QUESTIONS = ("what color is the shape?", "what is the color of the shape in this picture?", "which colour?")


def write_color_records(folder, n, seed):
    """n chats "what color is the shape?" -> colour, over PNGs of a coloured rectangle on white, referenced by paths
    relative to the .jsonl file (scripts must resolve them against the file's folder)."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(n):
        color = list(COLORS)[k % len(COLORS)]
        image = Image.new("RGB", (48, 48), (255, 255, 255))
        x, y = rng.randrange(0, 24), rng.randrange(0, 24)
        image.paste(COLORS[color], (x, y, x + 20, y + 20))
        image.save(folder / "images" / f"{seed}_{k}.png")
        user = [
            {"type": "image", "image": f"images/{seed}_{k}.png"},
            {"type": "text", "text": QUESTIONS[k % len(QUESTIONS)]},
        ]
        lines.append(
            json.dumps(
                {
                    "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": color}],
                    "answer": color,
                }
            )
        )
    path = folder / f"colors_{seed}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_pref_records(folder, n, seed, names=tuple(COLORS)):
    """n pairs over PNGs of a coloured rectangle: the same question every time, chosen = the colour, rejected = another
    of `names`; every colour is chosen as often as rejected, so only the image tells a pair's answers apart (with two
    names, the same two answers in both orders: a model ignoring the image is right on exactly half)."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(n):  # the wrong colour cycles through the other names, one step further each round of len(names)
        color, wrong = names[k % len(names)], names[(k + 1 + k // len(names) % (len(names) - 1)) % len(names)]
        image = Image.new("RGB", (48, 48), (255, 255, 255))
        x, y = rng.randrange(0, 12), rng.randrange(0, 12)
        image.paste(COLORS[color], (x, y, x + 36, y + 36))
        image.save(folder / "images" / f"{seed}_{k}.png")
        prompt = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": f"images/{seed}_{k}.png"},
                    {"type": "text", "text": "what color is the shape?"},
                ],
            }
        ]
        lines.append(json.dumps({"prompt": prompt, "chosen": color, "rejected": wrong, "answer": color}))
    path = folder / f"prefs_{seed}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def tiny_qwen_vl_folder(folder, family):
    """A random-init native Qwen2-VL (family "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") folder with SmolLM2's tokenizer
    plus Qwen's vision tokens."""
    import torch
    from transformers import Qwen2VLImageProcessor

    from common.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_tokens(specials, special_tokens=True)
    start, end, image, video = tokenizer.convert_tokens_to_ids(specials)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0),
    )
    ids = dict(image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            num_heads=2,
            fullatt_block_indexes=[1],
            window_size=56,
        )
    torch.manual_seed(0)
    Model(Config(text_config=text, vision_config=vision, **ids)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # no AutoProcessor offline: Qwen2-VL's video processor needs torchvision
    Qwen2VLImageProcessor().save_pretrained(folder)


def easy_pairs(path, n=32):
    """Pairs a tiny model can separate: the chosen answer always ends with ' apple', the rejected with ' stone'."""
    words = ["red", "blue", "green", "small", "big", "old", "new", "fast"]
    with open(path, "w") as f:
        for i in range(n):
            stem = f"{words[i % 8]} {words[(i * 3 + 1) % 8]} {i}"
            record = {"prompt": f"Say something, {i}.", "chosen": f"{stem} apple", "rejected": f"{stem} stone"}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="session")
def vlm_rm(vlm_dir, tmp_path_factory):
    """A VLM reward model trained by reward_model.py on 12 image pairs, with its in-memory model (caught at export)."""
    import reward_model

    folder = tmp_path_factory.mktemp("vlm-rm")
    pairs = write_pref_records(folder / "data", 12, seed=0, names=("red", "blue"))
    caught = {}
    export = reward_model.export_value_model

    def catching_export(model, *args, **kwargs):
        caught["model"] = model
        return export(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reward_model, "export_value_model", catching_export)
        result = reward_model.main(
            reward_model.Args(
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
            )  # fmt: skip
        )
    return {"pairs": pairs, "run": folder / "run", "result": result, "model": caught["model"]}


def plain_greedy_accuracy(model_path, items, max_new_tokens) -> float:
    """Held-out answer accuracy computed the plain way, one prompt at a time (no batching, no padding, no sharding),
    to check a script's reported accuracy against. items: (prompt messages, reference answer[, image folder])."""
    import torch

    from common.evaluation import is_correct
    from common.models import load_model, load_processor
    from common.rollout import stop_ids
    from common.vision import vlm_generate

    processor, model = load_processor(str(model_path)), load_model(str(model_path)).eval()
    right = 0
    for messages, answer, *folder in items:
        prompt = processor(messages, base_dir=folder[0] if folder else ".", add_generation_prompt=True)
        ids = torch.tensor([prompt["input_ids"]])
        with torch.no_grad():
            new = vlm_generate(model, ids, torch.ones_like(ids), **processor.image_inputs([prompt], ids),
                               max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                               eos_token_id=stop_ids(processor.tokenizer, model),
                               pad_token_id=processor.tokenizer.pad_token_id)[0].tolist()  # fmt: skip
        right += is_correct(processor.tokenizer.decode(new, skip_special_tokens=True), answer)
    return right / len(items)
