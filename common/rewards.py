"""Answer extraction and correctness for verifiable-reward tasks (the bundled arithmetic task, GSM8K-style data).

A completion's answer is, in order of preference: the text after the last "####", the content of the last
\\boxed{...}, or else the last number anywhere in the text. The fallback keeps scoring fair for a model that has
not yet learned the "####" format (e.g. the base model before SFT).

The RL reward functions below it (math-verify, format, exact match, VQA score, user and remote rewards) serve grpo.py and ppo.py.
"""

import importlib
import importlib.util
import json
import logging
import math
import re
import threading
import time
import urllib.request
from collections import Counter
from decimal import Decimal, InvalidOperation
from pathlib import Path

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


# ------------------------------------------------------------------------------------ RL reward functions
# Every reward function takes (completions, prompts, answers) lists of equal length (prompts are chat message lists or
# strings, answers may be None) plus keyword extras, and returns one float per completion. `safe_rewards` calls them so
# that an exception or a non-finite value costs that sample its reward (0.0) and a count, never the training run.
VERIFY_STATS: Counter = Counter()  # math_verify_correct's outcomes, counted by name:
VERIFY_OUTCOMES = ("verified", "no_parse", "error", "timeout", "missing_lib")  # fixed: ranks all-reduce them in order
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _math_verify(candidate: str, answer: str) -> bool | None:
    """math-verify's verdict, or None when it extracts no expression from the candidate. Its own timeouts use
    signal.alarm, which raises outside the main thread (and other projects then silently score 0), so both are
    disabled here and math_verify_correct bounds the time itself."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that the timeout is off
    predicted = parse(candidate, parsing_timeout=None)
    if not predicted:
        return None
    return bool(verify(parse(str(answer), parsing_timeout=None), predicted, timeout_seconds=None))


def math_verify_correct(text: str, answer: str, timeout_s: float = 5.0) -> bool:
    """Symbolic answer check with math-verify (Kydlíček, HF 2025): "0.5", "\\frac{1}{2}" and "\\boxed{1/2}" all match 1/2.

    The candidate is the content of the last <answer>...</answer>, else the line after the last "####", else the whole
    text. It runs in a daemon thread joined with `timeout_s`: a pathological expression can't hang training (the thread
    is abandoned). When math-verify is missing, errors, times out or finds no expression, the verdict falls back to
    `answer_correct` and VERIFY_STATS counts why."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        candidate = tags[-1]
    elif "####" in text:
        candidate = text.rsplit("####", 1)[1].strip().split("\n", 1)[0]
    else:
        candidate = text
    if importlib.util.find_spec("math_verify") is None:
        VERIFY_STATS["missing_lib"] += 1
        return answer_correct(candidate, answer)
    result: list = []

    def work():
        try:
            result.append(_math_verify(candidate, answer))
        except BaseException as e:  # sympy can raise nearly anything on odd input
            result.append(e)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(timeout_s)
    outcome = result[0] if result else None
    if not result or isinstance(outcome, BaseException) or outcome is None:
        VERIFY_STATS["timeout" if not result else "error" if outcome is not None else "no_parse"] += 1
        return answer_correct(candidate, answer)
    VERIFY_STATS["verified"] += 1
    return outcome


def math_reward(completions, prompts=None, answers=None, **kwargs) -> list[float]:
    """1.0 when the completion's final answer equals the reference symbolically (math_verify_correct), else 0.0."""
    return [float(a is not None and math_verify_correct(c, str(a))) for c, a in zip(completions, answers)]


_THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
_HASH_LINE = re.compile(r"\n####\s*-?[\d,]+(?:\.\d+)?\s*$")


def format_reward(completions, prompts=None, answers=None, **kwargs) -> list[float]:
    """1.0 for `<think>...</think><answer>...</answer>` (DeepSeek-R1's format) or for a reasoning text whose last line is
    `#### <number>` (GSM8K's, the bundled task's); 0.0 otherwise. It checks form only, never correctness."""
    return [float(bool(_THINK_ANSWER.match(c) or _HASH_LINE.search("\n" + c.rstrip()))) for c in completions]


def exact_match_reward(completions, prompts=None, answers=None, **kwargs) -> list[float]:
    """1.0 when the completion (or its <answer> tag) equals the reference after lower-casing and collapsing spaces."""

    def norm(s):
        tags = _ANSWER_TAG.findall(s)
        return " ".join((tags[-1] if tags else s).lower().split()).rstrip(".")

    return [float(a is not None and norm(c) == norm(str(a))) for c, a in zip(completions, answers)]


def vqa_reward(completions, prompts=None, answers=None, **kwargs) -> list[float]:
    """VQA v2 accuracy (common/metrics.vqa_score) of the completion, or of its <answer> tag, against the reference
    answer(s): a list of annotators' answers, or one answer (then exact match after VQA normalisation)."""
    from common.metrics import vqa_score

    def answer_part(s):
        tags = _ANSWER_TAG.findall(s)
        return tags[-1] if tags else s

    return [
        0.0 if a is None else vqa_score(answer_part(c), a if isinstance(a, list) else [str(a)])
        for c, a in zip(completions, answers)
    ]


REWARD_FUNCTIONS = {"math": math_reward, "format": format_reward, "exact": exact_match_reward, "vqa": vqa_reward}


def load_reward_fn(spec: str):
    """A reward function by name: a built-in (math, format, exact), `package.module:function`, or `path/file.py:function`."""
    if spec in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[spec]
    if ":" not in spec:
        raise ValueError(f"reward function {spec!r}: expected one of {', '.join(REWARD_FUNCTIONS)} or module:function")
    module_name, fn_name = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        loader_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {module_name} has no callable {fn_name!r}")
    return fn


def remote_reward(url: str, timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5):
    """A reward function that POSTs {"prompts", "completions", "answers"} as JSON to `url` and reads {"rewards": [...]}.

    Each attempt has `timeout_s`; failed attempts are retried `retries` times with exponential backoff, then it raises
    (and safe_rewards scores the batch 0 and counts it)."""

    def reward(completions, prompts=None, answers=None, **kwargs):
        body = json.dumps({"prompts": prompts, "completions": completions, "answers": answers}).encode()
        for attempt in range(retries + 1):
            try:
                request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    rewards = json.loads(response.read())["rewards"]
                if len(rewards) != len(completions):
                    raise ValueError(f"{url} returned {len(rewards)} rewards for {len(completions)} completions")
                return [float(r) for r in rewards]
            except Exception:
                if attempt == retries:
                    raise
                time.sleep(backoff_s * 2**attempt)

    reward.__name__ = "remote"
    return reward


def safe_rewards(fn, completions, prompts, answers) -> tuple[list[float], int]:
    """(rewards, number of samples that failed). The batch call comes first; if it raises or returns the wrong length,
    each sample is retried alone. A sample whose call raises or gives a non-finite value scores 0.0 and is counted."""
    try:
        values = list(fn(completions, prompts=prompts, answers=answers))
        if len(values) != len(completions):
            raise ValueError("wrong number of rewards")
    except Exception:
        values = []
        for c, p, a in zip(completions, prompts, answers):
            try:
                values.append(fn([c], prompts=[p], answers=[a])[0])
            except Exception:
                values.append(None)
    out, failures = [], 0
    for v in values:
        try:
            v = float(v)
            ok = math.isfinite(v)
        except (TypeError, ValueError):
            ok = False
        out.append(v if ok else 0.0)
        failures += not ok
    return out, failures


def reward_functions(specs, url=None, timeout_s: float = 30.0, retries: int = 3) -> tuple[list[str], list]:
    """(names, functions) of a script's --rewards (built-in names or module:function specs) and --reward-url, in that
    order (the order --reward-weights follows)."""
    functions = [load_reward_fn(spec) for spec in specs]
    if url:
        functions.append(remote_reward(url, timeout_s, retries))
    return list(specs) + (["remote"] if url else []), functions


def reward_setup(args) -> tuple[list[str], list, list[float]]:
    """(names, functions, weights) of grpo.py's and ppo.py's rewards: --rewards, --reward-url, then --reward-model
    (named reward_model; a model, which the script scores with, so no function), weighted by --reward-weights (default
    all 1). One-line errors for a weight count that does not match and for a VLM reward model with a text policy."""
    from common.vision import is_vlm

    names, functions = reward_functions(args.rewards, args.reward_url, args.reward_timeout, args.reward_retries)
    names += ["reward_model"] if args.reward_model else []
    weights = list(args.reward_weights) if args.reward_weights else [1.0] * len(names)
    if len(weights) != len(names) or not names:
        listed = ", ".join(names) or "none: pass --rewards, --reward-url or --reward-model"
        raise SystemExit(f"error: {len(names)} rewards ({listed}) but {len(weights)} weights")
    if args.reward_model and is_vlm(args.reward_model) and not is_vlm(args.model_path):
        raise SystemExit(f"error: --reward-model {args.reward_model} is a VLM reward model, which scores a prompt with "
                         "its image, but --model-path is a text model (its prompts hold no images)")  # fmt: skip
    return names, functions, weights


def score_completions(functions, completions, prompts, answers):
    """([rows, n_functions] float32 rewards, failures per function): every function on the whole batch through
    safe_rewards, so a failing reward costs its samples 0.0 and a count, never the run."""
    import torch

    columns, failures = [], []
    for fn in functions:
        values, failed = safe_rewards(fn, completions, prompts, answers)
        columns.append(values)
        failures.append(failed)
    rewards = torch.tensor(columns, dtype=torch.float32).reshape(len(functions), len(completions)).T  # [rows, fns]
    return rewards, failures
