"""Tests for common/data.py: loading every file kind and record format, validation errors, assistant-only labels
with the real SmolLM2 chat template, truncation/drop accounting, padding, packing, and the key property of
packing: a packed row gives the same per-token logprobs as each example run alone."""

import json
import random

import pytest
import torch

from common.chat import (
    TextProcessor,
    build_sft_examples,
    epoch_batches,
    pack_collate,
    pack_examples,
    pad_collate,
    tokenize_chat,
)
from common.data import DataError, content_text, image_paths, load_records, to_messages
from common.datasets import detect_format
from common.models import load_tokenizer, tiny_model

CHAT = [
    {"role": "system", "content": "You are a terse pirate."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris, matey."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid, arr."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def make_png(path):
    from PIL import Image

    Image.new("RGB", (4, 4), (255, 0, 0)).save(path)


# ------------------------------------------------------------------------------------------ loading
def test_load_every_file_kind_with_where(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    jsonl = write_jsonl(tmp_path / "a.jsonl", recs)
    (tmp_path / "b.json").write_text(json.dumps(recs))
    (tmp_path / "c.json").write_text(json.dumps({"data": recs}))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")

    loaded = load_records(jsonl)
    assert [r["prompt"] for r in loaded] == ["p0", "p1", "p2"]
    assert loaded[2]["_where"] == f"{jsonl}:3"
    assert load_records(str(tmp_path / "b.json"))[1]["_where"] == f"{tmp_path / 'b.json'}[1]"
    assert [r["completion"] for r in load_records(str(tmp_path / "c.json"))] == ["c0", "c1", "c2"]
    assert [r["prompt"] for r in load_records(str(tmp_path / "d.parquet"))] == ["p0", "p1", "p2"]
    folder = load_records(str(tmp_path))  # all four files, in sorted order
    assert (
        len(folder) == 12
        and folder[0]["_where"].endswith("a.jsonl:1")
        and folder[-1]["_where"].endswith("d.parquet[2]")
    )


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    assert [r["_where"] for r in load_records(str(path))] == [f"{path}:1", f"{path}:3"]


# -------------------------------------------------------------------------------- formats, messages
def test_detect_and_normalise_each_format(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    cases = {
        "messages": {"messages": msgs},
        "prompt_completion": {"prompt": "hi", "completion": "yo"},
        "message_answer": {"message": json.dumps(msgs[:1]), "answer": "yo"},
    }
    for fmt, record in cases.items():
        records = load_records(write_jsonl(tmp_path / f"{fmt}.jsonl", [record, record]))
        assert detect_format(records) == fmt
        assert to_messages(records[0], fmt) == msgs
    pref = load_records(write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "hi", "chosen": "yo", "rejected": "no"}]))
    assert detect_format(pref) == "preference"
    with pytest.raises(DataError, match="non-preference"):
        to_messages(pref[0], "preference")


def test_prompt_completion_with_message_lists(tmp_path):
    record = {
        "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        "completion": [{"role": "assistant", "content": "a"}],
    }
    records = load_records(write_jsonl(tmp_path / "pc.jsonl", [record]))
    assert detect_format(records) == "prompt_completion"
    assert [m["role"] for m in to_messages(records[0], "prompt_completion")] == ["system", "user", "assistant"]


def test_typed_parts_with_image(tmp_path):
    (tmp_path / "img").mkdir()
    make_png(tmp_path / "img" / "red.png")
    parts = [
        {"type": "image", "image": "img/red.png"},
        {"type": "text", "text": "What colour?"},
        {"type": "text", "text": "One word."},
    ]
    record = {"message": json.dumps([{"role": "user", "content": parts}]), "answer": 7}
    records = load_records(write_jsonl(tmp_path / "mm.jsonl", [record]))
    assert detect_format(records) == "message_answer"
    messages = to_messages(records[0], "message_answer")
    assert messages[0]["content"] == parts  # parts kept for vision models
    assert messages[1] == {"role": "assistant", "content": "7"}
    assert content_text(messages[0]["content"]) == "What colour?\nOne word."
    assert image_paths(messages, str(tmp_path)) == [str(tmp_path / "img" / "red.png")]
    url_part = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file://img/red.png"}}]}]
    assert image_paths(url_part, str(tmp_path)) == [str(tmp_path / "img" / "red.png")]


def test_image_not_found_names_record(tmp_path):
    parts = [{"type": "image", "image": "missing.png"}, {"type": "text", "text": "hi"}]
    path = write_jsonl(tmp_path / "mm.jsonl", [{"messages": [{"role": "user", "content": parts}]}])
    with pytest.raises(DataError, match=rf"{path}:1: image not found: 'missing.png'"):
        detect_format(load_records(path))


# --------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "lines, pattern",
    [
        (
            ['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": }'],
            r"x\.jsonl:2: malformed JSON \(Expecting value",
        ),
        (
            ['{"prompt": "a", "completion": "b"}', '["not", "an", "object"]'],
            r"x\.jsonl:2: expected a JSON object per line, got list",
        ),
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], r"x\.jsonl:2: missing field 'completion'"),
        (
            ['{"prompt": "a", "completion": 3}'],
            r"x\.jsonl:1: completion: expected a string or a list of messages, got int",
        ),
        (
            ['{"messages": [{"role": "user", "content": 5}]}'],
            r"x\.jsonl:1: messages\[0\]\.content: expected a string or a list",
        ),
        (
            ['{"messages": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}]}'],
            r"x\.jsonl:1: messages\[0\]\.content\[0\]: expected \{'type': 'text'",
        ),
        (
            ['{"message": "[{\\"role\\": \\"user\\"", "answer": "4"}'],
            r"x\.jsonl:1: message: expected a JSON string of a messages list",
        ),
        (
            ['{"question": "a", "response": "b"}'],
            r"unknown record format, keys found: \['question', 'response'\]. Accepted formats: messages",
        ),
        ([], r"x\.jsonl: empty file"),
    ],
)
def test_bad_input_errors(tmp_path, lines, pattern):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(DataError, match=pattern):
        detect_format(load_records(str(path)))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no such file or folder"):
        load_records(str(tmp_path / "nope") + "/")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_records(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder has no"):
        load_records(str(tmp_path / "empty"))


def test_unreachable_hub_name_is_clear(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # offline mode fails at once, like a machine without internet (instead of ~25 s of retries)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"could not load 'no-such-org/no-such-dataset-xyz'.*Accepted sources"):
        load_records("no-such-org/no-such-dataset-xyz")


# -------------------------------------------------------------------------------- tokenisation
def labelled_runs(example, tokenizer):
    """Decoded text of each contiguous run of target tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


def test_assistant_only_labels_multi_turn(tokenizer):
    example = tokenize_chat(CHAT, tokenizer, max_len=512)
    assert labelled_runs(example, tokenizer) == ["Paris, matey.<|im_end|>", "Madrid, arr.<|im_end|>"]
    target_text = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
    for other in ("pirate", "France", "Spain", "user", "system", "assistant"):
        assert other not in target_text
    # the ids are exactly the template's rendering, tokenised once
    assert (
        example["input_ids"]
        == tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    )


def test_labels_fallback_for_non_prefix_stable_template(tokenizer):
    # a template that marks only the last message differently: prefix renders no longer match the full text
    original = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if loop.last %}[final]\n{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    try:
        example = tokenize_chat(CHAT, tokenizer, max_len=512)
    finally:
        tokenizer.chat_template = original
    assert labelled_runs(example, tokenizer) == ["Paris, matey.<|im_end|>", "Madrid, arr.<|im_end|>"]


def test_truncate_and_drop_counts(tmp_path, tokenizer):
    short = {"prompt": "Hi", "completion": "Hello."}
    long = {"prompt": "Tell me a story.", "completion": "Once upon a time " * 40}
    prompt_only_fits = {"prompt": "word " * 60, "completion": "ok"}  # truncation removes every target
    path = write_jsonl(tmp_path / "d.jsonl", [short, long, short, prompt_only_fits])
    lengths = [
        len(tokenize_chat(to_messages(r, "prompt_completion"), tokenizer, max_len=10**6)["input_ids"])
        for r in (short, long, prompt_only_fits)
    ]
    max_len = 64
    assert lengths[0] <= max_len < lengths[2] < lengths[1]

    examples, stats = build_sft_examples(path, TextProcessor(tokenizer), max_len=max_len, overlong="truncate")
    assert (stats["n_records"], stats["n_examples"], stats["n_truncated"], stats["n_dropped"]) == (4, 3, 1, 0)
    assert stats["n_no_target"] == 1
    assert [len(e["input_ids"]) for e in examples] == [lengths[0], max_len, lengths[0]]
    assert stats["n_tokens"] == 2 * lengths[0] + max_len
    assert stats["n_target_tokens"] == sum(sum(label != -100 for label in e["labels"]) for e in examples)

    examples, stats = build_sft_examples(path, TextProcessor(tokenizer), max_len=max_len, overlong="drop")
    assert (stats["n_examples"], stats["n_truncated"], stats["n_dropped"]) == (2, 0, 2)
    with pytest.raises(
        DataError, match=r"empty dataset after filtering \(4 records, 4 dropped as over-long: raise --max-len"
    ):
        build_sft_examples(path, TextProcessor(tokenizer), max_len=4, overlong="drop")


# ------------------------------------------------------------------------------- padding, packing
def random_examples(n, seed=0, vocab=1000, lo=2, hi=40):
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt_len = rng.randint(1, length - 1)
        examples.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
    return examples


def test_pad_collate():
    examples = random_examples(3)
    batch = pad_collate(examples, pad_id=0)
    T = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (3, T)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == e["input_ids"] and (batch["input_ids"][row, n:] == 0).all()
        assert batch["labels"][row, :n].tolist() == e["labels"] and (batch["labels"][row, n:] == -100).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (T - n)
        assert batch["position_ids"][row].tolist() == list(range(n)) + [0] * (T - n)


def test_pack_examples_and_collate():
    examples = random_examples(50, seed=1)
    max_tokens = 64
    packs = pack_examples(examples, max_tokens)
    assert sorted(i for p in packs for i in p) == list(range(50))  # every example exactly once
    assert all(sum(len(examples[i]["input_ids"]) for i in p) <= max_tokens for p in packs)
    total = sum(len(e["input_ids"]) for e in examples)
    assert len(packs) <= -(-total // max_tokens) + 2  # near the lower bound: first-fit decreasing is tight
    assert pack_examples(examples, max_tokens) == packs  # deterministic

    batch = pack_collate([[examples[i] for i in p] for p in packs], pad_id=0, max_tokens=max_tokens)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (len(packs), max_tokens)
    for row, pack in enumerate(packs):
        t = 0
        for i in pack:  # each example lies whole, in order, inside its own row
            e, n = examples[i], len(examples[i]["input_ids"])
            assert batch["input_ids"][row, t : t + n].tolist() == e["input_ids"]
            assert batch["position_ids"][row, t : t + n].tolist() == list(range(n))
            assert batch["labels"][row, t].item() == -100  # never predict across examples
            assert batch["labels"][row, t + 1 : t + n].tolist() == e["labels"][1:]
            t += n
        if t < max_tokens:
            assert batch["position_ids"][row, t:].tolist() == list(range(max_tokens - t))
            assert (batch["labels"][row, t:] == -100).all()
    with pytest.raises(AssertionError, match="longer than max_tokens"):
        pack_examples(examples, 10)


def test_epoch_batches_deterministic_shuffle():
    batches = epoch_batches(10, 4, seed=3, epoch=0)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert epoch_batches(10, 4, seed=3, epoch=0) == batches
    assert epoch_batches(10, 4, seed=3, epoch=1) != batches


def token_logprobs(model, **batch):
    logits = model(**batch, use_cache=False).logits.float()  # [B, T, V]
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]  # [B, T-1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logprobs_equal_unpacked(attn):
    model = tiny_model(vocab_size=1000, attn_implementation=attn).eval()
    examples = random_examples(12, seed=2, hi=30)
    max_tokens = 64
    packs = pack_examples(examples, max_tokens)
    assert any(len(p) >= 3 for p in packs)  # the test only means something if rows hold several examples
    batch = pack_collate([[examples[i] for i in p] for p in packs], pad_id=0, max_tokens=max_tokens)
    padded = pad_collate(examples, pad_id=0)
    with torch.no_grad():
        packed_lp = token_logprobs(model, input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        padded_lp = token_logprobs(model, input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])
        for row, pack in enumerate(packs):
            t = 0
            for i in pack:
                n = len(examples[i]["input_ids"])
                alone_lp = token_logprobs(model, input_ids=torch.tensor([examples[i]["input_ids"]]))[0]  # [n-1]
                torch.testing.assert_close(packed_lp[row, t : t + n - 1], alone_lp, atol=1e-5, rtol=0)
                torch.testing.assert_close(padded_lp[i, : n - 1], alone_lp, atol=1e-5, rtol=0)
                t += n
    # the test has teeth: without position_ids restarting, packed examples see each other
    with torch.no_grad():
        leaky_lp = token_logprobs(model, input_ids=batch["input_ids"])
    assert (leaky_lp - packed_lp).abs().max() > 1e-3
