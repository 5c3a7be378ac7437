"""common/evaluation.py: the sign test against hand-computed binomial tails, the paired counts, which held-out sets a
script evaluates, and a real greedy evaluation of a tiny model matching its own answers checked one by one."""

import math
from types import SimpleNamespace

import pytest
import torch

import common.evaluation as evaluation
from common.evaluation import OOD_DATASET, evaluate, held_out_sets, sign_test
from common.run import Run

RUN = Run(0, 1, torch.device("cpu"), torch.float32)


def test_sign_test_by_hand():
    assert sign_test(0, 0) == 1.0
    assert sign_test(6, 0) == pytest.approx(2 / 2**6)  # all six discordant problems one way: 2 x (1/2)^6
    assert sign_test(3, 3) == 1.0
    # 17 lost, 8 gained (the OOD measurement): p = 2 P(X <= 8), X ~ Binomial(25, 1/2), quoted there as 0.11
    tail = sum(math.factorial(25) / (math.factorial(i) * math.factorial(25 - i)) for i in range(9)) / 2**25
    assert sign_test(8, 17) == sign_test(17, 8) == pytest.approx(2 * tail) == pytest.approx(0.108, abs=5e-4)


def test_evaluate_pairs_problems_and_stores_every_split(monkeypatch):
    answers = {"before": [[1, 1, 0, 0, 1], [0, 0]], "after": [[1, 0, 1, 1, 1], [1, 0]]}  # per set, per problem
    when_calls = []

    def fake_flags(model, processor, items, run, **kw):
        when = "before" if len(when_calls) < 2 else "after"
        when_calls.append(when)
        return [bool(x) for x in answers[when][0 if len(items) == 5 else 1]]

    monkeypatch.setattr(evaluation, "answer_flags", fake_flags)
    sets, results, printed = {"": [None] * 5, "ood": [None] * 2, "empty": []}, {}, []
    run = SimpleNamespace(print=printed.append)
    before = evaluate(None, None, sets, run, results, "before", max_new_tokens=4)
    evaluate(None, None, sets, run, results, "after", max_new_tokens=4, before=before)
    assert results["accuracy_before"] == 3 / 5 and results["accuracy_after"] == 4 / 5
    assert results["solved_only_after"] == 2 and results["solved_only_before"] == 1  # problems 3, 4 won; 2 lost
    assert results["sign_test_p"] == pytest.approx(sign_test(2, 1))
    assert results["ood_accuracy_before"] == 0 and results["ood_accuracy_after"] == 0.5
    assert results["ood_solved_only_after"] == 1 and results["ood_solved_only_before"] == 0
    assert not any(k.startswith("empty") for k in results)  # an empty set is skipped
    assert "solved only after 2, only before 1" in printed[2]


def test_held_out_sets_uses_the_default_ood_split_only_with_the_bundled_task():
    processor = SimpleNamespace(image_token_id=None)
    bundled = SimpleNamespace(ood_dataset=OOD_DATASET, eval_dataset="data/arith/test.jsonl", eval_samples=7)
    sets = held_out_sets(bundled, processor, ["x"], "sft.py")
    assert sets[""] == ["x"] and len(sets["ood"]) == 7 and all(a is not None for _, a in sets["ood"])
    other = SimpleNamespace(ood_dataset=OOD_DATASET, eval_dataset="my_test.jsonl", eval_samples=7)
    assert set(held_out_sets(other, processor, ["x"], "sft.py")) == {""}
    explicit = SimpleNamespace(ood_dataset="data/arith/test.jsonl", eval_dataset="my_test.jsonl", eval_samples=3)
    assert len(held_out_sets(explicit, processor, [], "sft.py")["ood"]) == 3
    off = SimpleNamespace(ood_dataset=None, eval_dataset="data/arith/test.jsonl", eval_samples=7)
    assert set(held_out_sets(off, processor, ["x"], "sft.py")) == {""}


def test_answer_flags_match_the_models_own_greedy_answers(sharper_tiny_model_dir):
    from common.evaluation import answer_flags, is_correct
    from common.models import load_model, load_processor
    from common.rollout import generate

    processor, model = load_processor(sharper_tiny_model_dir), load_model(sharper_tiny_model_dir)
    items = [([{"role": "user", "content": f"What is {k} + 1?"}], str(k + 1)) for k in range(6)]
    prompts = [processor(m, add_generation_prompt=True) for m, _ in items]
    completions, _, _ = generate(model, processor, prompts, max_new_tokens=8, greedy=True)
    texts = processor.tokenizer.batch_decode(completions, skip_special_tokens=True)
    # the model's own answers as references: every flag must be True; shifted references: none may be
    own = [(m, t) for (m, _), t in zip(items, texts)]
    assert answer_flags(model, processor, own, RUN, max_new_tokens=8, batch_size=4) == [is_correct(t, t) for t in texts]
    wrong = [(m, "no such answer 123456789") for m, _ in items]
    assert answer_flags(model, processor, wrong, RUN, max_new_tokens=8, batch_size=4) == [False] * 6
