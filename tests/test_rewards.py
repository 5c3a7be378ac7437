"""Answer extraction/correctness (common/rewards.py) and an independent check of the bundled arithmetic data."""

import importlib.util
import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from common.rewards import accuracy, answer_correct, extract_answer

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
ARITH_DIR = DATA_DIR / "arith"
# load the generator by path: data/ is a folder of files, not a package (and "data" is a common module name)
_spec = importlib.util.spec_from_file_location("make_arith", DATA_DIR / "make_arith.py")
make_arith = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_arith)
make_arith_main = make_arith.main
# "a op b = c" as the generator writes each step; checked by re-evaluating, not by trusting the generator.
EQUATION = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Tom starts with 23 apples. 23 + 14 = 37. 37 - 9 = 28.\n#### 28", "28"),
        ("#### 5\nsome chatter 7 #### 12 and 99", "12"),  # the last #### wins; first number after it
        ("#### 1,234", "1234"),
        ("#### -3", "-3"),
        ("#### 28.0", "28"),
        ("#### 2.50", "2.5"),
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{ 7 }", "7"),  # last box, spaces stripped
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces kept intact
        ("He has 12 cards, then 1,500 more", "1500"),  # last-number fallback with a thousands comma
        ("It dropped to -4 degrees.", "-4"),  # a free-standing minus is a sign
        ("37-9 gives 28", "28"),
        ("the difference 40-25", "25"),  # a minus glued to a number is subtraction, not a sign
        ("I cannot tell.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_hash_answer_beats_boxed_and_later_numbers():
    assert extract_answer("\\boxed{3}\n#### 4\nThe answer is: 5") == "4"


def test_answer_correct_is_numeric_when_possible():
    assert answer_correct("#### 28.0", "28")
    assert answer_correct("The total is 1,200", "1200")
    assert answer_correct("\\boxed{0.5}", "0.50")
    assert not answer_correct("#### 28", "29")
    assert not answer_correct("no number here", "28")
    assert answer_correct("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}")  # non-numeric: exact normalised match
    assert not answer_correct("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}")


def test_accuracy():
    assert accuracy(["#### 1", "2", "nothing", "\\boxed{4}"], ["1", "3", "5", "4"]) == 0.5
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        accuracy(["#### 1"], [])


def _read(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _evaluate(a, op, b):
    return {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a, b)}[op]


@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_bundled_arith_records_are_well_formed_and_correct(split):
    records = _read(ARITH_DIR / f"{split}.jsonl")
    assert len(records) == {"train": 4000, "test": 200, "ood": 200}[split]
    for record in records:
        assert set(record) == {"messages", "answer"}
        user, assistant = record["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"].strip() and "####" not in user["content"]
        solution = assistant["content"]
        assert re.fullmatch(r"-?\d+", record["answer"])
        assert solution.endswith(f"\n#### {record['answer']}")
        assert extract_answer(solution) == record["answer"]
        equations = EQUATION.findall(solution)
        assert equations, solution
        for a, op, b, c in equations:
            assert _evaluate(int(a), op, int(b)) == int(c), solution
        # the final step's result is the answer (the solution actually derives it)
        assert equations[-1][3] == record["answer"], solution


def test_bundled_splits_do_not_overlap():
    def problems(split):
        return [r["messages"][0]["content"] for r in _read(ARITH_DIR / f"{split}.jsonl")]

    train, test = problems("train"), problems("test")
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)


def _skeleton(text):
    """A problem's first sentence with its numbers and names taken out: the story it opens."""
    text = re.sub(r"\d+", "N", text)
    return re.sub("|".join(make_arith.NAMES), "X", text).split(".")[0]


def test_ood_split_uses_stories_structures_and_instructions_training_never_shows():
    def records(split):
        return _read(ARITH_DIR / f"{split}.jsonl")

    train, ood = records("train"), records("ood")
    train_openings = {_skeleton(r["messages"][0]["content"]) for r in train}
    assert (
        not {_skeleton(r["messages"][0]["content"]) for r in ood} & train_openings
    )  # no training story opens an OOD one
    train_text = " ".join(r["messages"][0]["content"] for r in train)
    with_instruction = [r for r in ood if any(i in r["messages"][0]["content"] for i in make_arith.OOD_INSTRUCTIONS)]
    assert 0.3 < len(with_instruction) / len(ood) < 0.7
    assert not any(i in train_text for i in make_arith.OOD_INSTRUCTIONS)
    # training shows its own preambles and instructions (a third of the problems each), none of which OOD uses
    ood_text = " ".join(r["messages"][0]["content"] for r in ood)
    for phrases in (make_arith.TRAIN_INSTRUCTIONS, make_arith.TRAIN_PREAMBLES):
        share = sum(any(p in r["messages"][0]["content"] for p in phrases) for r in train) / len(train)
        assert 0.25 < share < 0.42 and not any(p in ood_text for p in phrases)
    # problem structures mixed differently: both have 1-, 2- and 3-step problems, OOD over twice the share of 3-step
    steps = lambda rs: [len(EQUATION.findall(r["messages"][1]["content"])) for r in rs]  # noqa: E731
    assert set(steps(train)) == set(steps(ood)) == {1, 2, 3}
    three_step_share = lambda rs: steps(rs).count(3) / len(rs)  # noqa: E731
    assert three_step_share(ood) > 2 * three_step_share(train)


def test_training_stories_come_with_different_numbers_of_steps():
    # a story whose opening always meant the same number of steps lets SFT read the structure off the story; the
    # structure variants tell most stories with one, two and three steps, so only the stated quantities decide
    steps_by_story = {}
    for r in _read(ARITH_DIR / "train.jsonl"):
        problem = r["messages"][0]["content"]
        for preamble in make_arith.TRAIN_PREAMBLES:
            problem = problem.removeprefix(preamble + " ")
        opening = " ".join(_skeleton(problem).split()[:3])  # "A shop has", "X has N"
        n_steps = len(EQUATION.findall(r["messages"][1]["content"]))
        steps_by_story.setdefault(opening, set()).add(n_steps)
    assert steps_by_story["A shop has"] == {1, 2, 3}
    assert steps_by_story["X earns N"] == {1, 2, 3}
    assert steps_by_story["X has N"] == {1, 2, 3}  # give_away, buy_and_give / containers, packs_collection
    assert steps_by_story["X picked N"] == {1, 2}
    assert steps_by_story["A library has"] == {1, 2}


def test_generator_is_deterministic_and_matches_bundled_files(tmp_path):
    args = ["--seed", "0", "--n-train", "50", "--n-test", "20", "--n-ood", "200"]
    make_arith_main(args + ["--out", str(tmp_path / "a")])
    make_arith_main(args + ["--out", str(tmp_path / "b")])
    for name in ("train.jsonl", "test.jsonl", "ood.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # the test split is drawn first, so it equals the bundled one's prefix regardless of --n-train
    bundled_test = (ARITH_DIR / "test.jsonl").read_text(encoding="utf-8").splitlines()
    assert (tmp_path / "a" / "test.jsonl").read_text(encoding="utf-8").splitlines() == bundled_test[:20]
    # the OOD split has its own random stream: the bundled file whatever --n-train and --n-test are
    assert (tmp_path / "a" / "ood.jsonl").read_bytes() == (ARITH_DIR / "ood.jsonl").read_bytes()
    make_arith_main(["--seed", "1", "--n-train", "50", "--n-test", "20", "--out", str(tmp_path / "c")])
    assert (tmp_path / "c" / "train.jsonl").read_bytes() != (tmp_path / "a" / "train.jsonl").read_bytes()
