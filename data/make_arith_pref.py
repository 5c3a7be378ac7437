"""Build the bundled preference set for dpo.py from the arithmetic task (stdlib only, seeded, deterministic).

    python data/make_arith_pref.py --seed 0 --n-train 320 --out data/arith_pref

Reads `data/arith/{train,test}.jsonl` (messages + answer, solutions written as "a op b = c" steps ending in "#### N")
and writes `train.jsonl` / `test.jsonl`, one preference pair per line:

    {"prompt": "<the user turn>", "chosen": "<the correct worked solution>",
     "rejected": "<the same solution with one step's result off by 1-3, carried through to a wrong '#### N'>",
     "answer": "<the correct answer>"}

The rejected solution is a *plausible* mistake: the same words and the same steps, one result nudged by a small
amount, and every later step that used that result recomputed from the wrong value (so the rest is consistent
arithmetic on a wrong number, and the final answer is wrong). That makes the pair differ in a few tokens only,
which is what preference learning is good at and what a reward margin can measure. `answer` lets dpo.py score
task accuracy by greedy generation.
"""

import argparse
import json
import random
import re
from pathlib import Path

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _apply(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else a}[op]


def corrupt(solution: str, answer: str, rng: random.Random) -> str | None:
    """A wrong worked solution: one step's result off by ±1..3, later steps recomputed from it. None if impossible."""
    body, _, _ = solution.rpartition("####")
    steps = list(STEP.finditer(body))
    if not steps:
        return None
    for _ in range(20):
        k = rng.randrange(len(steps))
        delta = rng.choice([-3, -2, -1, 1, 2, 3])
        changed: dict[int, int] = {}  # original result -> wrong result, carried into later steps
        pieces, cursor, final = [], 0, None
        for j, m in enumerate(steps):
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            a2, b2 = changed.get(a, a), changed.get(b, b)
            c2 = _apply(a2, op, b2) if (a2, b2) != (a, b) else c
            if j == k:
                c2 = c2 + delta
            if c2 < 0:
                break
            if c2 != c:
                changed[c] = c2
            pieces.append(body[cursor : m.start()] + f"{a2} {op} {b2} = {c2}")
            cursor, final = m.end(), c2
        else:
            if str(final) != str(answer):
                return "".join(pieces) + body[cursor:] + f"#### {final}"
    return None


def build(records: list[dict], rng: random.Random) -> list[dict]:
    pairs = []
    for r in records:
        prompt, solution = r["messages"][0]["content"], r["messages"][1]["content"]
        rejected = corrupt(solution, r["answer"], rng)
        if rejected is not None:
            pairs.append({"prompt": prompt, "chosen": solution, "rejected": rejected, "answer": r["answer"]})
    return pairs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=320, help="pairs from the first N training problems")
    parser.add_argument("--source", default=str(Path(__file__).parent / "arith"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "arith_pref"))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, limit in (("test", None), ("train", args.n_train)):
        records = [
            json.loads(line) for line in (Path(args.source) / f"{split}.jsonl").read_text().splitlines() if line.strip()
        ]
        pairs = build(records[:limit], rng)
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
        print(f"{split}: {len(pairs)} pairs from {len(records[:limit])} problems -> {out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
