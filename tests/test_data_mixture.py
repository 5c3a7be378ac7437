"""Tests for weighted dataset mixtures (`--dataset a.jsonl:0.7 --dataset b.jsonl:0.3`) and the `easy-vqa:<kind>` source
of common/data.py."""

import dataclasses
import json
import re
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from common.cli import cli
from common.data import DataError, load_mixture, load_records, parse_source_spec
from common.datasets import detect_format


@pytest.fixture
def two_files(tmp_path):
    """a.jsonl: 10 records a0..a9; b.jsonl: 4 records b0..b3 (record k on line k+1)."""
    paths = []
    for name, n in (("a", 10), ("b", 4)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"{name}{k}", "completion": "x"}) + "\n" for k in range(n)))
        paths.append(str(path))
    return paths


def source_counts(records):
    return Counter(r["prompt"][0] for r in records)


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("a.jsonl:0.7", ("a.jsonl", 0.7)),
        ("a.jsonl:3", ("a.jsonl", 3.0)),
        ("a.jsonl", ("a.jsonl", None)),
        ("easy-vqa:train", ("easy-vqa:train", None)),  # "train" is not a number: part of the source
        ("easy-vqa:captions-train:2", ("easy-vqa:captions-train", 2.0)),  # only the last colon can hold a weight
        ("HuggingFaceH4/no_robots:0.25", ("HuggingFaceH4/no_robots", 0.25)),
        ("org/name", ("org/name", None)),
    ],
)
def test_parse_source_spec(spec, parsed):
    assert parse_source_spec(spec) == parsed


@pytest.mark.parametrize(
    "spec", ["a.jsonl:0", "a.jsonl:-1", "a.jsonl:x7", "a.jsonl:nan", "a.jsonl:inf", "easy-vqa:train:x"]
)
def test_bad_weight_names_the_spec(spec):
    with pytest.raises(DataError, match=f"dataset '{spec}': weight"):
        parse_source_spec(spec)


def test_without_weights_is_plain_loading(two_files):
    a, b = two_files
    assert load_mixture(a) == load_records(a)  # same records, same order, same _where
    assert load_mixture([a]) == load_records(a)
    assert load_mixture([a, b]) == load_records(a) + load_records(b)  # concatenation in the given order


def test_weighted_mixture_has_exact_shares_and_keeps_where(two_files):
    a, b = two_files
    mixture = load_mixture([f"{a}:0.7", f"{b}:0.3"], total=1000)
    # 1000 * 0.7 = 700 from a (10 records -> each exactly 70 times), 300 from b (4 records -> each exactly 75 times)
    assert source_counts(mixture) == {"a": 700, "b": 300}
    per_record = Counter(r["prompt"] for r in mixture)
    assert {per_record[f"a{k}"] for k in range(10)} == {70} and {per_record[f"b{k}"] for k in range(4)} == {75}
    for r in mixture:  # record k of each file still says it came from line k+1
        assert r["_where"] == f"{a if r['prompt'][0] == 'a' else b}:{int(r['prompt'][1:]) + 1}"
    assert {r["prompt"][0] for r in mixture[:50]} == {"a", "b"}  # shuffled, not a block of a then b


def test_default_total_upsamples_small_and_subsamples_big(two_files):
    a, b = two_files
    # default total = 10 + 4 = 14; weights 1:1 -> 7 each: a gives 7 distinct records of its 10, b gives each of its
    # 4 records once plus 3 of them a second time
    mixture = load_mixture([f"{a}:1", f"{b}:1"])
    assert source_counts(mixture) == {"a": 7, "b": 7}
    per_record = Counter(r["prompt"] for r in mixture)
    assert len([p for p in per_record if p[0] == "a"]) == 7 and max(per_record[f"a{k}"] for k in range(10)) == 1
    assert sorted(per_record[f"b{k}"] for k in range(4)) == [1, 2, 2, 2]
    # unnormalised weights 1:3 of 100 -> 25 and 75; 25 = 2*10 + 5, 75 = 18*4 + 3
    mixture = load_mixture([f"{a}:1", f"{b}:3"], total=100)
    per_record = Counter(r["prompt"] for r in mixture)
    assert source_counts(mixture) == {"a": 25, "b": 75}
    assert {per_record[f"a{k}"] for k in range(10)} == {2, 3} and {per_record[f"b{k}"] for k in range(4)} == {18, 19}
    # uneven split: 14 * 2/3 = 9.33 and 4.67 -> floors 9 and 4, the larger remainder (0.67, b) gets the 14th record
    assert source_counts(load_mixture([f"{a}:2", f"{b}:1"])) == {"a": 9, "b": 5}


def test_seeded_and_comma_string_form(two_files):
    a, b = two_files
    specs = [f"{a}:0.5", f"{b}:0.5"]
    first = load_mixture(specs, seed=3)
    assert load_mixture(specs, seed=3) == first
    assert load_mixture(f"{a}:0.5,{b}:0.5", seed=3) == first  # a `dataset: str` Args field
    assert [r["prompt"] for r in load_mixture(specs, seed=4)] != [r["prompt"] for r in first]


def test_mixture_errors(two_files, tmp_path):
    a, b = two_files
    with pytest.raises(DataError, match="a weight to every source or to none"):
        load_mixture([f"{a}:0.7", b])
    with pytest.raises(DataError, match=r"weight must be a positive number, got '0'"):
        load_mixture([f"{a}:0.7", f"{b}:0"])
    # a bad record keeps naming its own file:line after mixing
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "c0", "completion": "x"}\n{"prompt": "c1"}\n')
    with pytest.raises(
        DataError, match=rf"{re.escape(str(bad))}:2: "
    ):  # missing 'completion', or unknown format if first
        detect_format(load_mixture([f"{a}:1", f"{bad}:1"], total=50))


def test_tuple_field_from_the_command_line(two_files):
    @dataclasses.dataclass
    class Args:
        dataset: tuple[str, ...] = ("data/arith/train.jsonl",)
        """training data, `source[:weight]` each"""

    a, b = two_files
    args = cli(Args, ["--dataset", f"{a}:0.7", f"{b}:0.3"])
    assert source_counts(load_mixture(args.dataset, total=100)) == {"a": 70, "b": 30}


# ------------------------------------------------------------------------------------------------ easy-vqa
def test_easy_vqa_source_reads_the_easy_vqa_module(monkeypatch, two_files):
    calls = []

    def fake_easy_vqa_records(kind):
        calls.append(kind)
        return [{"prompt": f"q{k}", "completion": "circle", "_where": f"easy-vqa:{kind}[{k}]"} for k in range(3)]

    monkeypatch.setitem(sys.modules, "common.easy_vqa", types.SimpleNamespace(easy_vqa_records=fake_easy_vqa_records))
    assert [r["_where"] for r in load_records("easy-vqa:train")] == [f"easy-vqa:train[{k}]" for k in range(3)]
    mixture = load_mixture(["easy-vqa:captions-train:3", f"{two_files[0]}:1"], total=8)
    assert calls == ["train", "captions-train"] and source_counts(mixture) == {"q": 6, "a": 2}


def test_easy_vqa_source_real():
    pytest.importorskip("easy_vqa")
    records = load_records("easy-vqa:test")
    assert len(records) > 1000 and records[0]["_where"] == "easy-vqa:test[0]"
    with pytest.raises(DataError, match="unknown kind 'validation'"):
        load_records("easy-vqa:validation")


def test_easy_vqa_chats_hold_each_images_questions_in_order():
    """One chat per image: its questions and answers as questions.json lists them (read here directly), the image only
    in the first user turn, every question in exactly one chat."""
    easy_vqa = pytest.importorskip("easy_vqa")
    root = Path(easy_vqa.__file__).parent / "data" / "test"
    by_image = {}
    for q, a, i in json.loads((root / "questions.json").read_text()):
        by_image.setdefault(i, []).append((q, a))
    chats = load_records("easy-vqa:chats-test")
    assert len(chats) == len(by_image) and sum(len(c["messages"]) for c in chats) == 2 * sum(
        map(len, by_image.values())
    )
    for chat in chats[:50]:
        i = int(chat["_where"].split("(image ")[1].rstrip(")"))
        users, answers = chat["messages"][0::2], chat["messages"][1::2]
        assert [(u["content"][-1]["text"], a["content"]) for u, a in zip(users, answers)] == by_image[i]
        assert users[0]["content"][0] == {"type": "image", "image": str(root / "images" / f"{i}.png")}
        assert all(len(u["content"]) == 1 for u in users[1:]) and {m["role"] for m in answers} == {"assistant"}


def test_repeated_dataset_flags_become_one_mixture_spec():
    from common.cli import _join_repeated_datasets

    assert _join_repeated_datasets(["--dataset", "a.jsonl:0.7", "--lr", "1", "--dataset=b.jsonl:0.3"]) == [
        "--dataset",
        "a.jsonl:0.7,b.jsonl:0.3",
        "--lr",
        "1",
    ]
    assert _join_repeated_datasets(["--dataset", "a.jsonl", "--eval-dataset", "t.jsonl"]) == [
        "--dataset",
        "a.jsonl",
        "--eval-dataset",
        "t.jsonl",
    ]
