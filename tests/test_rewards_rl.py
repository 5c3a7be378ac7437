"""RL reward functions of common/rewards.py: math-verify answers, format, exact match, user and HTTP rewards, and the
wrapper that turns a failing reward into a counted 0."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from common import rewards
from common.rewards import (
    VERIFY_STATS,
    exact_match_reward,
    format_reward,
    load_reward_fn,
    math_reward,
    math_verify_correct,
    remote_reward,
    safe_rewards,
)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("Half of it: \\boxed{\\frac{1}{2}}", "0.5"),
        ("<think>2/4 simplifies</think><answer>1/2</answer>", "0.5"),
        ("Tom has 23 + 14 = 37.\n#### 37", "37"),
        ("#### 1,234", "1234"),
        ("so x = 39.0", "39"),
        ("\\boxed{\\frac{78}{2}}", "39"),
    ],
)
def test_math_equivalent_forms_are_correct(text, answer):
    assert math_verify_correct(text, answer)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("#### 38", "37"),  # wrong
        ("<answer>2/3</answer>", "0.5"),  # wrong fraction
        ("I do not know.", "37"),  # missing
        ("", "37"),  # empty
        ("The result is 37.\n#### 36", "37"),  # the marked answer counts, not an earlier number
    ],
)
def test_math_wrong_or_missing_answers_are_incorrect(text, answer):
    assert not math_verify_correct(text, answer)


def test_math_reward_scores_a_batch_and_none_answers():
    assert math_reward(["#### 4", "#### 5", "#### 4"], answers=["4", "4", None]) == [1.0, 0.0, 0.0]


def test_math_verify_works_off_the_main_thread():
    """math-verify's own signal.alarm timeout raises in threads (and callers that catch it score 0): ours must not."""
    before = dict(VERIFY_STATS)
    out = []
    worker = threading.Thread(target=lambda: out.append(math_verify_correct("\\boxed{\\frac{1}{2}}", "0.5")))
    worker.start()
    worker.join()
    assert out == [True]
    assert VERIFY_STATS["verified"] == before.get("verified", 0) + 1
    assert VERIFY_STATS["error"] == before.get("error", 0)


def test_math_verify_timeout_and_error_fall_back_and_are_counted(monkeypatch):
    before = dict(VERIFY_STATS)
    monkeypatch.setattr(rewards, "_math_verify", lambda c, a: time.sleep(2))
    t0 = time.time()
    assert math_verify_correct("#### 12", "12", timeout_s=0.2)  # the fallback (answer_correct) still scores it
    assert time.time() - t0 < 1.5
    assert VERIFY_STATS["timeout"] == before.get("timeout", 0) + 1

    def boom(c, a):
        raise RecursionError("sympy blew up")

    monkeypatch.setattr(rewards, "_math_verify", boom)
    assert not math_verify_correct("#### 13", "12")
    assert math_verify_correct("#### 12", "12")
    assert VERIFY_STATS["error"] == before.get("error", 0) + 2


def test_format_reward():
    good = ["<think>3 + 4 = 7</think>\n<answer>7</answer>", "3 + 4 = 7.\n#### 7", "#### -1,200.5\n"]
    bad = [
        "<answer>7</answer>",
        "<think>7</think>",
        "#### seven",
        "7",
        "#### 7 and more text",
        "<think>a</think><answer>7",
    ]
    assert format_reward(good) == [1.0] * len(good)
    assert format_reward(bad) == [0.0] * len(bad)


def test_exact_match_reward():
    assert exact_match_reward(
        ["Paris.", " the  CAT ", "<answer>blue</answer>", "dog"], answers=["paris", "The cat", "Blue", "cat"]
    ) == [1.0, 1.0, 1.0, 0.0]


def sample_user_reward(completions, prompts=None, answers=None, **kwargs):
    return [float(len(c)) for c in completions]


def test_load_reward_fn_builtin_module_and_file(tmp_path):
    assert load_reward_fn("math") is math_reward
    assert load_reward_fn("test_rewards_rl:sample_user_reward")(["ab", "c"]) == [2.0, 1.0]
    file = tmp_path / "my_rewards.py"
    file.write_text("def score(completions, **kw):\n    return [c.count('x') for c in completions]\n")
    assert load_reward_fn(f"{file}:score")(["xx", "y"]) == [2, 0]
    with pytest.raises(ValueError, match="no callable"):
        load_reward_fn(f"{file}:nope")
    with pytest.raises(ValueError, match="module:function"):
        load_reward_fn("nonsense")


def test_safe_rewards_counts_failures_and_never_raises():
    def flaky(completions, prompts=None, answers=None):
        if len(completions) > 1:
            raise RuntimeError("batch call fails")
        c = completions[0]
        if c == "raise":
            raise ValueError("bad sample")
        return [float("nan") if c == "nan" else ("oops" if c == "str" else 1.0)]

    values, failures = safe_rewards(flaky, ["ok", "raise", "nan", "str", "ok"], [None] * 5, [None] * 5)
    assert values == [1.0, 0.0, 0.0, 0.0, 1.0] and failures == 3
    values, failures = safe_rewards(lambda c, **k: [0.5] * len(c), ["a", "b"], [None] * 2, [None] * 2)
    assert values == [0.5, 0.5] and failures == 0


class _RewardServer:
    """A local JSON reward service: reward = completion length; fails its first `fail_first` requests with HTTP 500."""

    def __init__(self, fail_first=0):
        self.requests, self.fail_first = [], fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                if len(outer.requests) <= outer.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                data = json.dumps({"rewards": [len(c) for c in body["completions"]]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/score"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_remote_reward_json_roundtrip_and_retries():
    server = _RewardServer(fail_first=2)
    try:
        fn = remote_reward(server.url, timeout_s=5, retries=2, backoff_s=0.01)
        assert fn(["abc", "de"], prompts=["p1", "p2"], answers=["1", None]) == [3.0, 2.0]
        assert len(server.requests) == 3  # two 500s, then success
        assert server.requests[-1] == {"prompts": ["p1", "p2"], "completions": ["abc", "de"], "answers": ["1", None]}
    finally:
        server.close()


def test_remote_reward_down_is_counted_not_fatal():
    server = _RewardServer(fail_first=100)
    try:
        fn = remote_reward(server.url, timeout_s=5, retries=1, backoff_s=0.01)
        values, failures = safe_rewards(fn, ["a", "b"], ["p", "q"], [None, None])
        assert values == [0.0, 0.0] and failures == 2
        assert len(server.requests) == 2 + 2 * 2  # the batch call, then one call per sample, each tried twice
    finally:
        server.close()
