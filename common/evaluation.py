"""The held-out evaluation every script runs before and after training: greedy answers to held-out problems, checked
against their references, on the in-distribution split (--eval-dataset) and, for the bundled arithmetic task, its
out-of-distribution split (data/arith/ood.jsonl: stories, problem structures and answer-format instructions that
training never shows; data/make_arith.py). After training the two evaluations are paired problem by problem: how many
only the trained model solves, how many only the model before it did, and the exact sign test of those two counts, so
that a reader can tell a gain from noise (200 problems: a 0.03 gain can be 6 problems won and 0 lost, or 20 won and 14
lost; only the first is unlikely to be chance).
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation

import torch
import torch.distributed as dist

from common.metrics import exact_match
from common.rewards import answer_correct
from common.rollout import generate, prompt_records
from common.run import reshard

BUNDLED_TEST_SPLITS = ("data/arith/test.jsonl", "data/arith_pref/test.jsonl")  # the bundled task's in-distribution
OOD_DATASET = "data/arith/ood.jsonl"  # ... and its out-of-distribution split (the --ood-dataset default)


def is_correct(text: str, answer) -> bool:
    """Whether a completion answers a held-out question, by what the reference is: a number (the arithmetic task,
    GSM8K) is compared with the completion's final answer (common/rewards.answer_correct); anything else (a VQA
    answer, a list of annotators' answers) by exact match after VQA normalisation."""
    try:
        numeric = not isinstance(answer, (list, tuple)) and math.isfinite(Decimal(str(answer).replace(",", "")))
    except InvalidOperation:
        numeric = False
    return answer_correct(text, str(answer)) if numeric else exact_match(text.strip(), answer) > 0


@torch.no_grad()
def answer_flags(model, processor, items, run, *, max_new_tokens, gather=True, batch_size=25) -> list[bool]:
    """Per held-out (prompt messages, answer) item (prompt_records': image paths resolved): is its greedy answer
    is_correct. Every rank answers every world_size-th item and the flags are summed over ranks, so it runs under
    torchrun as in one process; with gather=False (synced_gpus decoding) ranks run as many batches each, padded with a
    repeat of the first item."""
    mine = list(range(run.rank, len(items), run.world_size))
    n_batches = math.ceil(math.ceil(len(items) / run.world_size) / batch_size)
    flags = torch.zeros(len(items), device=run.device)  # [n_items]
    with run.autocast(model):
        for b in range(n_batches):
            chunk = mine[b * batch_size : (b + 1) * batch_size]
            prompts = [processor(items[i][0], add_generation_prompt=True) for i in chunk or [0]]
            completions, _, _ = generate(model, processor, prompts, max_new_tokens=max_new_tokens, greedy=True,
                                         gather=gather)  # fmt: skip
            texts = processor.tokenizer.batch_decode(completions, skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                flags[i] = float(is_correct(text, items[i][1]))
    if dist.is_initialized():
        dist.all_reduce(flags)
    reshard(model)
    return [bool(f) for f in flags.tolist()]


def answer_accuracy(model, processor, items, run, *, max_new_tokens, gather=True, batch_size=25) -> float:
    """Fraction of held-out items whose greedy answer is correct (answer_flags)."""
    flags = answer_flags(model, processor, items, run, max_new_tokens=max_new_tokens, gather=gather,
                         batch_size=batch_size)  # fmt: skip
    return sum(flags) / max(1, len(flags))


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: the probability, if neither model were better (each discordant problem a fair coin),
    of a split at least as uneven as wins : losses. 1.0 when there are no discordant problems."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def held_out_sets(args, processor, items, script) -> dict[str, list]:
    """The held-out sets by name: "" the in-distribution items the script built from --eval-dataset, and "ood" the
    --ood-dataset's (its default only when --eval-dataset is the bundled task's test split), each cut to
    --eval-samples."""
    sets = {"": items}
    ood = args.ood_dataset
    if ood == OOD_DATASET and args.eval_dataset not in BUNDLED_TEST_SPLITS:
        ood = None  # the default OOD split belongs to the bundled task only
    if ood and args.eval_samples > 0:
        ood_items = [it for it in prompt_records(ood, processor, script=script) if it[1] is not None]
        sets["ood"] = ood_items[: args.eval_samples]
    return sets


def evaluate(model, processor, sets, run, results, when, *, max_new_tokens, gather=True, before=None):
    """Greedy held-out accuracy of every set, stored in `results` (accuracy_<when>, ood_accuracy_<when>) and printed;
    returns the per-problem flags by set. With `before` (the flags an earlier evaluate returned on the same sets) the
    paired comparison too: <set>_solved_only_<when>, <set>_solved_only_before and <set>_sign_test_p."""
    flags = {}
    for name, items in sets.items():
        if not items:
            continue
        prefix = f"{name}_" if name else ""
        flags[name] = answer_flags(model, processor, items, run, max_new_tokens=max_new_tokens, gather=gather)
        results[f"{prefix}accuracy_{when}"] = sum(flags[name]) / len(items)
        line = f"[eval] held-out{' ' + name if name else ''} answer accuracy {when} training: "
        line += f"{results[f'{prefix}accuracy_{when}']:.3f} ({sum(flags[name])}/{len(items)})"
        if before and name in before:
            wins = sum(now and not then for now, then in zip(flags[name], before[name]))
            losses = sum(then and not now for now, then in zip(flags[name], before[name]))
            results |= {f"{prefix}solved_only_{when}": wins, f"{prefix}solved_only_before": losses,
                        f"{prefix}sign_test_p": sign_test(wins, losses)}  # fmt: skip
            line += f"; before {sum(before[name]) / len(items):.3f}: solved only {when} {wins}, only before {losses}, "
            line += f"sign test p = {results[prefix + 'sign_test_p']:.3g}"
        run.print(line)
    return flags
