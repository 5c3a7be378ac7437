"""Tests for the VQA answer metrics in common/metrics.py, against examples worked by hand from the official definitions:
VQA v2 accuracy (vqaEval.py), DocVQA ANLS, ChartQA relaxed accuracy (pix2struct), multiple choice, exact match, counting."""

import pytest

from common.metrics import (
    anls,
    counting_accuracy,
    exact_match,
    mc_accuracy,
    relaxed_correctness,
    select_option,
    vqa_normalize,
    vqa_score,
)


# ------------------------------------------------------------------------------------- VQA normalisation
@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Yes.", "yes"),  # period not followed by a digit: deleted; lower case
        ("2.5", "2.5"),  # period followed by a digit: kept
        ("3 p.m.", "3 pm"),
        ("1,000", "1000"),  # a digit,digit comma makes every mark be deleted, not spaced
        ("1,000 dogs, cats", "1000 dogs cats"),
        ("yes/no", "yes no"),  # a mark touching no space becomes a space
        ("hello, world", "hello world"),  # ", " touches a space: deleted
        ("x (y)z", "x y z"),  # "(" touches a space -> deleted; ")" does not -> space (each mark tested alone)
        ("red-and-white", "red and white"),
        ("The cat!", "cat"),  # "!" -> space, then the article goes
        (" An apple\n", "apple"),
        ("Two dogs", "2 dogs"),  # number words zero..ten -> digits
        ("none", "0"),
        ("dont", "don't"),  # contractions map
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("don't", "don't"),  # the apostrophe is not a punctuation mark in the VQA v2 list
    ],
)
def test_vqa_normalize(raw, normalised):
    assert vqa_normalize(raw) == normalised


# -------------------------------------------------------------------------------------------- VQA score
@pytest.mark.parametrize(
    "n_matching, expected",
    [
        # 10 answers, m of them equal to the prediction. Leaving out a matching annotator leaves m-1 matches, leaving out
        # another one leaves m; each subset scores min(1, matches/3) and the score is the mean of the 10 subsets:
        (0, 0.0),
        (1, (1 * min(1, 0 / 3) + 9 * min(1, 1 / 3)) / 10),  # = 3/10 = 0.3
        (2, (2 * min(1, 1 / 3) + 8 * min(1, 2 / 3)) / 10),  # = (2/3 + 16/3)/10 = 0.6
        (3, (3 * min(1, 2 / 3) + 7 * min(1, 3 / 3)) / 10),  # = (2 + 7)/10 = 0.9
        (4, (4 * min(1, 3 / 3) + 6 * min(1, 4 / 3)) / 10),  # = 1.0
    ],
)
def test_vqa_score_ten_answers(n_matching, expected):
    answers = ["2"] * n_matching + ["3", "4", "5", "6", "7", "8", "9", "10", "11", "12"][: 10 - n_matching]
    assert vqa_score("two", answers) == pytest.approx(expected)  # "two" normalises to "2"
    assert expected == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0][n_matching])  # the hand values of the comments


def test_vqa_score_fewer_answers_and_normalised_matching():
    # 3 unanimous answers: every leave-one-out subset holds 2 matches -> 2/3 each -> mean 2/3
    assert vqa_score("yes", ["yes", "yes", "yes"]) == pytest.approx(2 / 3)
    # 5 answers, 1 match: leaving it out -> 0; the 4 other subsets -> 1/3; mean (4/3)/5 = 4/15
    assert vqa_score("red", ["red", "blue", "blue", "green", "white"]) == pytest.approx(4 / 15)
    # a single answer has only an empty leave-one-out subset: exact match after normalisation
    assert vqa_score("Two.", ["2"]) == 1.0 and vqa_score("3", ["2"]) == 0.0
    assert vqa_score("dont know", ["don't know"] * 10) == 1.0  # 9 matches in every subset -> min(1, 3) = 1
    assert vqa_score("A dog.", "dog") == 1.0  # a bare string is one answer
    with pytest.raises(ValueError, match="no reference answers"):
        vqa_score("yes", [])


# --------------------------------------------------------------------------------------------------- ANLS
def test_anls_hand_examples():
    assert anls("Hello", ["hallo"]) == pytest.approx(1 - 1 / 5)  # 1 substitution / max len 5: NL 0.2 -> 0.8
    assert anls("kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)  # classic Levenshtein 3 (k->s, e->i, +g) / 7
    assert anls(" ABCD ", ["abcd"]) == 1.0  # lower-cased and stripped
    assert anls("ab", ["ac"]) == 0.0  # NL = 1/2 is not < 0.5: the DocVQA threshold cuts it to 0
    assert anls("abcd", ["abce"], threshold=0.2) == 0.0 and anls("abcd", ["abce"]) == pytest.approx(0.75)
    assert anls("Hello", ["xyz", "hallo"]) == pytest.approx(0.8)  # best over the answers
    assert anls("", ["abc"]) == 0.0 and anls("", [""]) == 1.0


# ----------------------------------------------------------------------------------------- relaxed accuracy
@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("104", ["100"], 1.0),  # |104-100|/100 = 4% <= 5%
        ("95", ["100"], 1.0),  # exactly 5%
        ("106", ["100"], 0.0),  # 6%
        ("45%", ["0.45"], 1.0),  # pix2struct: "45%" is 0.45
        ("45", ["45%"], 0.0),  # ... so 45 vs 0.45 is off by a factor 100
        ("0", ["0"], 1.0),  # a zero answer has no relative error: exact string match
        ("0.0", ["0"], 0.0),
        ("Yes", ["yes"], 1.0),  # non-numbers: case-insensitive exact match
        ("yes.", ["yes"], 0.0),
        ("104", ["12", "100"], 1.0),  # best over the answers
    ],
)
def test_relaxed_correctness(prediction, answers, expected):
    assert relaxed_correctness(prediction, answers) == expected


def test_relaxed_tolerance_argument():
    assert relaxed_correctness("110", ["100"], tolerance=0.1) == 1.0
    assert relaxed_correctness("110", ["100"]) == 0.0


# ----------------------------------------------------------------------------------------- multiple choice
OPTIONS = ["dog", "cat", "horse"]


@pytest.mark.parametrize(
    "prediction, index",
    [
        ("B", 1),
        ("(B)", 1),
        ("B.", 1),
        ("b", 1),
        ("C) horse", 2),
        ("(a) dog", 0),
        ("Answer: C", 2),
        ("The answer is B.", 1),
        ("cat", 1),
        ("Horse.", 2),
        ("It is a cat.", 1),  # option text: the whole answer, or the only option inside it
        ("A cat.", 1),  # "A" followed by a word is the article, not option A
        ("dog or cat", -1),
        ("zebra", -1),
        ("D", -1),  # two options named, none, a letter past the options
    ],
)
def test_select_option(prediction, index):
    assert select_option(prediction, OPTIONS) == index


def test_mc_accuracy():
    assert mc_accuracy("B", OPTIONS, 1) == 1.0
    assert mc_accuracy("A", OPTIONS, 1) == 0.0
    assert mc_accuracy("no idea", OPTIONS, 1) == 0.0


# ------------------------------------------------------------------------------------ exact match, counting
def test_exact_match_uses_vqa_normalisation():
    assert exact_match("Two", ["2"]) == 1.0
    assert exact_match("the red one.", ["blue", "red 1"]) == 1.0
    assert exact_match("blue", ["red"]) == 0.0


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("There are three dogs.", 3, 1.0),
        ("3", "three", 1.0),
        ("I count 1,000 stars", 1000, 1.0),
        ("7", "7", 1.0),
        ("four", 3, 0.0),
        ("many", 3, 0.0),
        ("2 dogs and 3 cats", 3, 0.0),  # the first number counts
    ],
)
def test_counting_accuracy(prediction, answer, expected):
    assert counting_accuracy(prediction, answer) == expected
