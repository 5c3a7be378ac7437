"""How much of PPO's return could a critic on the policy's own features explain? (issue 18, item 1)

Samples --samples completions (temperature 1) for each of --prompts training prompts from a policy (default: sft.py's
export), scores them with the verifiers ppo.py uses by default (math + format), and reports:
  * the between-prompt share of the score variance: 1 - mean within-prompt variance / total variance, the explained
    variance a perfect per-prompt baseline would reach (what a critic that knew each prompt's difficulty could do);
  * the held-out explained variance of a ridge probe (a linear value head, fit in closed form: the best a zero-init
    head on frozen features could converge to) on the policy's final hidden states, at every response token (ppo.py's
    train/explained_variance, with the KL part left out) and at the first response position (the prompt alone).
The probe is fit on three quarters of the prompts and scored on the other quarter. Not a timing; ~5 min on 2 cores.

    python bench/critic_probe.py                  # after python sft.py
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.models import load_model, load_processor  # noqa: E402
from common.rewards import reward_functions, score_completions  # noqa: E402
from common.rollout import generate, prompt_records  # noqa: E402
from common.run import setup  # noqa: E402


@dataclass
class Args:
    model_path: str = "runs/sft/model"
    """the policy whose rollouts and features are probed"""
    dataset: str = "data/arith/train.jsonl"
    """prompts with answers"""
    prompts: int = 128
    """prompts drawn (seeded)"""
    samples: int = 4
    """completions per prompt"""
    max_new_tokens: int = 96
    """completion budget, as ppo.py's default"""
    seed: int = 1
    """prompt draw and sampling seed"""


def explained_variance(target, prediction) -> float:
    return float(1 - (target - prediction).var() / target.var())


def ridge_ev(x_train, y_train, x_test, y_test, lam):
    """Held-out explained variance of ridge regression on standardised features."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    w = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1]), a.T @ (y_train - y_train.mean()))
    return explained_variance(y_test, b @ w + y_train.mean())


def main(args: Args):
    run = setup(args.seed, "auto")
    processor, model = load_processor(args.model_path), load_model(args.model_path, device=run.device)
    items = prompt_records(args.dataset, processor, script="critic_probe.py")
    chosen = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed))[: args.prompts].tolist()
    _, reward_fns = reward_functions(("math", "format"), None, 30.0, 0)  # ppo.py's default verifiers
    rows = []  # (prompt index, token ids of prompt + completion, prompt length, score)
    for start in range(0, len(chosen), 16):
        batch = [items[i] for i in chosen[start : start + 16]]
        encoded = [processor(m, add_generation_prompt=True) for m, _ in batch for _ in range(args.samples)]
        torch.manual_seed(args.seed * 100003 + start)
        with run.autocast(model):
            completions, _, _ = generate(model, processor, encoded, max_new_tokens=args.max_new_tokens)
        texts = processor.tokenizer.batch_decode(completions, skip_special_tokens=True)
        msgs = [m for m, _ in batch for _ in range(args.samples)]
        answers = [a for _, a in batch for _ in range(args.samples)]
        scores = score_completions(reward_fns, texts, msgs, answers)[0].sum(1)  # [rows]
        for j, (p, c) in enumerate(zip(encoded, completions)):
            rows.append((start + j // args.samples, p["input_ids"] + c, len(p["input_ids"]), float(scores[j])))
        print(f"sampled {len(rows)} completions", flush=True)

    features = []  # [completion tokens, H] per row: the states whose next token is a completion token
    with torch.no_grad(), run.autocast(model):
        for _, ids, n_prompt, _ in rows:
            hidden = model.model(input_ids=torch.tensor([ids], device=run.device), use_cache=False).last_hidden_state
            features.append(hidden[0, n_prompt - 1 : len(ids) - 1].float().cpu())

    scores = torch.tensor([r[3] for r in rows])
    by_prompt = defaultdict(list)
    for r in rows:
        by_prompt[r[0]].append(r[3])
    within = sum(torch.tensor(v).var().item() for v in by_prompt.values()) / len(by_prompt)
    print(f"score mean {scores.mean():.3f}, variance {scores.var():.4f}; within-prompt variance {within:.4f} -> "
          f"between-prompt share (a perfect per-prompt baseline's explained variance) {1 - within / scores.var():.3f}")  # fmt: skip
    test = [r[0] % 4 == 0 for r in rows]
    tokens = [torch.cat([f for f, t in zip(features, test) if t == side]) for side in (False, True)]
    targets = [torch.cat([torch.full((len(f),), r[3]) for f, r, t in zip(features, rows, test) if t == side])
               for side in (False, True)]  # fmt: skip
    first = torch.stack([f[0] for f in features])
    is_test = torch.tensor(test)
    for lam in (10.0, 100.0, 1000.0, 10000.0):
        ev_tokens = ridge_ev(tokens[0], targets[0], tokens[1], targets[1], lam)
        ev_prompt = ridge_ev(first[~is_test], scores[~is_test], first[is_test], scores[is_test], lam)
        print(f"ridge {lam:g}: held-out explained variance, every response token {ev_tokens:.3f}; "
              f"first response position (the prompt alone) {ev_prompt:.3f}")  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Args))
