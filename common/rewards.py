"""Answer extraction and correctness for verifiable-reward tasks (the bundled arithmetic task, GSM8K-style data).

A completion's answer is, in order of preference: the text after the last "####", the content of the last
\\boxed{...}, or else the last number anywhere in the text. The fallback keeps scoring fair for a model that has
not yet learned the "####" format (e.g. the base model before SFT).
"""

import re
from decimal import Decimal, InvalidOperation

# A sign only counts when it is not glued to a preceding word/number: "37-9" is a subtraction, not "-9".
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _normalise(text: str) -> str:
    """Strip spaces, commas and a leading "$"; write numbers canonically ("28.0" -> "28", "-3" stays "-3")."""
    text = text.strip().replace(",", "").replace(" ", "").removeprefix("$").rstrip(".")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return text
    if not value.is_finite():
        return text
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, honouring nested braces (e.g. \\boxed{\\frac{1}{2}})."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unbalanced: treat as no box


def extract_answer(text: str) -> str | None:
    """Normalised final answer of a completion, or None when it contains no answer at all."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().split("\n", 1)[0]
        match = _NUMBER.search(tail)
        if match:
            return _normalise(match.group())
        if tail:
            return _normalise(tail)
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return _normalise(boxed)
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def answer_correct(text: str, answer: str) -> bool:
    """Whether the completion's extracted answer equals the reference (numerically if both are numbers)."""
    predicted, reference = extract_answer(text), _normalise(str(answer))
    if predicted is None:
        return False
    try:
        return Decimal(predicted) == Decimal(reference)
    except InvalidOperation:
        return predicted == reference


def accuracy(completions: list[str], answers: list[str]) -> float:
    """Fraction of completions whose answer is correct; 0.0 for an empty batch."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    if not completions:
        return 0.0
    return sum(answer_correct(c, a) for c, a in zip(completions, answers)) / len(completions)
