"""VQA answer metrics of the vision scripts: VQA accuracy, ANLS, relaxed accuracy, multiple choice, exact match,
counting; a question's metrics by name (score), and their means by answer and question type (summarise, format_table).
"""

from __future__ import annotations

import re
from collections import Counter

from common.easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES

# --------------------------------------------------------------------------------------------- VQA metrics
# Answer normalisation of the official VQA evaluation (vqaEval.py of github.com/GT-Vision-Lab/VQA, with the punctuation
# list and straight apostrophes of the VQA v2 challenge copy, Cloud-CV/VQA-Challenge; MMF and lmms-eval use the same).
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
_PERIOD = re.compile(
    r"\.(?!\d)"
)  # official "(?!<=\d)(\.)(?!\d)": its lookbehind is a typo (a lookahead that always holds)
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# The official contractions map sends each apostrophe-dropped spelling to the full one ("dont" -> "don't"; "couldnt've"
# and "couldn'tve" -> "couldn't've": exactly one apostrophe missing). Those keys are generated from the full forms; this
# reproduces the official map's reachable (lower-case) entries except its one reversed entry "somebody'd" -> "somebodyd".
_FULL_FORMS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've "
    "he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't not've "
    "o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's "
    "someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've "
    "there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's "
    "what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
_CONTRACTIONS = {full[:i] + full[i + 1 :]: full for full in _FULL_FORMS for i, c in enumerate(full) if c == "'"}


def vqa_normalize(text: str) -> str:
    """An answer as the official VQA evaluation compares it: processPunctuation then processDigitArticle.

    Punctuation is deleted when it touches a space or the text holds a digit,digit comma ("1,000" -> "1000"), else
    replaced by a space ("yes/no" -> "yes no"); a period is deleted unless a digit follows ("2.5" stays). Then lower
    case, number words zero..ten (and "none") -> digits, articles a/an/the dropped, "dont" -> "don't" etc."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out, comma_in_number = text, _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:  # the official script tests the *input* text for each mark, not the partly cleaned one
        out = out.replace(p, "" if (p + " " in text or " " + p in text or comma_in_number) else " ")
    words = [_NUMBER_WORDS.get(w, w) for w in _PERIOD.sub("", out).lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _as_list(answers) -> list[str]:
    answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
    if not answers:
        raise ValueError("no reference answers to score against")
    return answers


def vqa_score(prediction: str, answers) -> float:
    """VQA v2 accuracy (Antol et al. 2015; Goyal et al. 2017; official vqaEval.py): the mean over the leave-one-
    annotator-out subsets of min(1, #subset answers equal to the prediction / 3), on normalised answers.

    With fewer than 10 answers the same mean runs over the given answers (3 unanimous answers score 2/3). One answer
    has only an empty subset, so it is scored by exact match instead. The official script normalises only the
    prediction in full (the released annotations are already normalised); here both sides are, which changes nothing
    for official annotations and lets raw answers match."""
    gts = [vqa_normalize(a) for a in _as_list(answers)]
    pred = vqa_normalize(prediction)
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(g == pred for g in gts)
    # leaving annotator i out removes one match exactly when annotator i gave the prediction
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction: str, answers, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of DocVQA (Biten et al. 2019, Eq. 1; Mathew et al. 2021), one
    question: max over answers of 1 - NL if NL < threshold else 0, NL = Levenshtein / max(len), on lower-cased,
    stripped strings."""
    pred, best = prediction.strip().lower(), 0.0
    for answer in _as_list(answers):
        answer = answer.strip().lower()
        nl = _levenshtein(pred, answer) / max(len(pred), len(answer), 1)
        best = max(best, 1 - nl if nl < threshold else 0.0)
    return best


def _to_float(text: str) -> float | None:
    try:  # "45%" is 0.45, as in pix2struct's ChartQA metric, so "45%" matches "0.45" but not "45"
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, answers, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (Masry et al. 2022, Sec. 5.1; pix2struct's metrics.relaxed_correctness): a number
    within `tolerance` relative error of a non-zero numeric answer, otherwise a case-insensitive exact match; best over
    the answers. Strings are stripped first."""
    pred = prediction.strip()
    for answer in _as_list(answers):
        answer = answer.strip()
        p, t = _to_float(pred), _to_float(answer)
        if (abs(p - t) / abs(t) <= tolerance) if (p is not None and t) else pred.lower() == answer.lower():
            return 1.0
    return 0.0


def select_option(prediction: str, options) -> int:
    """Index of the multiple-choice option a free-form answer picks, -1 if none (or several) can be read off.

    A letter ("B", "(B)", "B.", "B) cat", "Answer: B") gives its index; else the option whose normalised text is the
    whole answer, else the only option whose text occurs as words inside it (MMBench/SEED-style answer matching)."""
    text = re.sub(r"^(the\s+)?answer(\s+is)?\s*:?\s*", "", prediction.strip(), flags=re.I)
    m = re.fullmatch(r"\(?([A-Za-z])[).:]?", text) or re.match(r"\(([A-Za-z])\)|([A-Z])[).:](\s|$)", text)
    if m:
        index = ord((m.group(1) or m.group(2)).upper()) - ord("A")
        if 0 <= index < len(options):
            return index
    pred, normalised = vqa_normalize(text), [vqa_normalize(str(o)) for o in options]
    if pred in normalised:
        return normalised.index(pred)
    inside = [i for i, o in enumerate(normalised) if o and re.search(rf"(^|\s){re.escape(o)}(\s|$)", pred)]
    return inside[0] if len(inside) == 1 else -1


def mc_accuracy(prediction: str, options, answer_index: int) -> float:
    """1.0 when select_option picks the correct option, else 0.0."""
    return float(select_option(prediction, options) == answer_index)


def exact_match(prediction: str, answers) -> float:
    """1.0 when the VQA-normalised prediction equals one of the VQA-normalised answers."""
    return float(vqa_normalize(prediction) in {vqa_normalize(a) for a in _as_list(answers)})


def _first_number(text: str) -> float | None:
    m = re.search(r"-?\d+(\.\d+)?", vqa_normalize(text))  # number words and 1,000 are digits after normalising
    return float(m.group()) if m else None


def counting_accuracy(prediction: str, answer) -> float:
    """1.0 when the first number in the prediction (digits, or a word zero..ten) equals the answer (CountBench /
    TallyQA-style counting accuracy)."""
    target = _first_number(str(answer))
    return float(target is not None and _first_number(prediction) == target)


# ------------------------------------------------------------------------------------------ summaries
def answer_type(answers: list[str]) -> str:
    """VQA v2's answer types: yes/no, number or other, from the most common normalised reference answer."""
    top = Counter(vqa_normalize(a) for a in answers).most_common(1)[0][0]
    return "yes/no" if top in ("yes", "no") else "number" if re.fullmatch(r"-?\d+(\.\d+)?", top) else "other"


def easy_vqa_question_type(answer: str) -> str:
    """easy-vqa asks three kinds of question, told apart by their answer: yes/no, a colour, or a shape."""
    return (
        "yes/no"
        if answer in ("yes", "no")
        else "color"
        if answer in EASY_VQA_COLORS
        else "shape"
        if answer in EASY_VQA_SHAPES
        else "other"
    )


def score(metric: str, prediction: str, record: dict) -> float:
    """One question's score under one metric of common/metrics.py."""
    if metric == "mc_accuracy":
        return mc_accuracy(prediction, record["options"], record["answer_index"])
    if metric == "counting_accuracy":
        return counting_accuracy(prediction, Counter(record["answers"]).most_common(1)[0][0])
    return {
        "vqa_score": vqa_score,
        "exact_match": exact_match,
        "anls": anls,
        "relaxed_correctness": relaxed_correctness,
    }[metric](prediction, record["answers"])


def summarise(rows: list[dict], metrics: list[str]) -> dict:
    """Means of the per-question scores: overall, per answer type and (where rows have one) per question type."""

    def means(group):
        return {"n": len(group), **{m: sum(r["scores"][m] for r in group) / max(1, len(group)) for m in metrics}}

    out = {"overall": means(rows)}
    for key in ("answer_type", "question_type"):
        types = sorted({r[key] for r in rows if key in r})
        if types:
            out[f"by_{key}"] = {t: means([r for r in rows if r.get(key) == t]) for t in types}
    return out


def format_table(summary: dict, metrics: list[str]) -> str:
    """Rows = metrics; columns = all questions, then each answer type and each question type (n in the header)."""
    columns = [("all", summary["overall"])] + [
        (f"{'A' if key == 'by_answer_type' else 'Q'}:{t}", group)
        for key in ("by_answer_type", "by_question_type")
        for t, group in summary.get(key, {}).items()
    ]
    width = max(12, *(len(name) + 2 for name in metrics))
    header = "metric".ljust(width) + "".join(
        f"{name} (n={g['n']})".rjust(max(10, len(name) + 10)) for name, g in columns
    )
    lines = [header, "-" * len(header)]
    for m in metrics:
        lines.append(m.ljust(width) + "".join(f"{g[m]:.4f}".rjust(max(10, len(name) + 10)) for name, g in columns))
    return "\n".join(lines) + "\n(A: answer type, Q: question type)"
