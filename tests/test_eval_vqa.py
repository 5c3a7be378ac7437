"""eval_vqa.py end to end on tiny composed VLMs (random siglip-tiny + tiny SmolLM2-family LM, trained for a few steps
inside the test) and a tiny native Qwen2-VL: scores against common/metrics.py, hand-derived scores of a constant
answer, batching, torchrun, and the one-line errors."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, read_jsonl, subprocess_env, tiny_qwen_vl_folder

import eval_vqa
from common.data import DataError, load_records
from common.logprob import sequence_logprobs
from common.metrics import anls, counting_accuracy, exact_match, mc_accuracy, relaxed_correctness, vqa_score
from common.models import build_vlm
from common.vision import param_groups, save_vlm

ALL_METRICS = ("vqa_score", "exact_match", "anls", "relaxed_correctness", "counting_accuracy")


def train_tiny_vlm(lm_dir, chats, steps, folder, lr=3e-3, seed=0):
    """A tiny composed VLM fitted to `chats` (full batch, all parts trained), saved with save_vlm."""
    torch.manual_seed(seed)
    model, processor = build_vlm(lm_dir, "siglip-tiny", seed=seed)
    examples = [processor(chat) for chat in chats]
    batch = eval_vqa_batch(examples, processor)
    optimizer = torch.optim.AdamW(param_groups(model, lr))
    n_targets = (batch["labels"][:, 1:] != -100).sum()
    for _ in range(steps):
        kw = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
        loss = -sequence_logprobs(model, batch["input_ids"], batch["labels"], **kw).sum() / n_targets
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_vlm(model, processor, folder), loss.item()


def eval_vqa_batch(examples, processor):
    from common.chat import pad_collate

    return pad_collate(examples, processor.tokenizer.pad_token_id) | processor.image_inputs(examples)


@pytest.fixture(scope="module")
def qa_vlm(tiny_model_dir, tmp_path_factory):
    """Fitted for 40 steps to 24 easy-vqa training questions: answers vary with the question (yes, no, shapes...)."""
    chats = [r["messages"] for r in load_records("easy-vqa:train")[::50][:24]]
    folder, loss = train_tiny_vlm(tiny_model_dir, chats, 40, tmp_path_factory.mktemp("qa") / "vlm", seed=1)
    assert loss < 1.0, loss
    return str(folder)


@pytest.fixture(scope="module")
def yes_vlm(tiny_model_dir, tmp_path_factory):
    """Taught to answer every question "yes" (30 steps at a high lr: the loss falls from ln(49152) to ~0.003)."""
    chats = [
        r["messages"][:1] + [{"role": "assistant", "content": "yes"}] for r in load_records("easy-vqa:train")[::97][:16]
    ]
    folder, loss = train_tiny_vlm(tiny_model_dir, chats, 30, tmp_path_factory.mktemp("yes") / "vlm", lr=2e-2, seed=2)
    assert loss < 0.05, loss
    return str(folder)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two easy-vqa test images copied beside a data file, so records can name them by relative path."""
    folder = tmp_path_factory.mktemp("flat")
    for name in ("0.png", "1.png"):
        (folder / "img").mkdir(exist_ok=True)
        shutil.copy(load_records("easy-vqa:test")[0]["_dir"] + f"/images/{name}", folder / "img" / name)
    return folder


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def run(model_path, out, **overrides):
    args = dict(
        model_path=model_path, output_dir=str(out), max_samples=12, batch_size=4, max_new_tokens=4, dtype="float32"
    )
    summary = eval_vqa.main(eval_vqa.Args(**{**args, **overrides}))
    return summary, read_jsonl(out / "predictions.jsonl"), json.loads((out / "metrics.json").read_text())


def mean(values):
    return sum(values) / len(values)


def test_rows_scores_and_means_match_common_metrics(qa_vlm, tmp_path):
    summary, rows, saved = run(qa_vlm, tmp_path, metrics=ALL_METRICS)
    assert saved == summary and len(rows) == 12 and [r["index"] for r in rows] == list(range(12))
    gold = load_records("easy-vqa:test")
    expected = [gold[i * len(gold) // 12] for i in range(12)]  # evenly spaced subset
    assert [r["answers"] for r in rows] == [[g["answer"]] for g in expected]
    assert [r["question"] for r in rows] == [g["messages"][0]["content"][1]["text"] for g in expected]
    assert all(r["image"] == g["messages"][0]["content"][0]["image"] for r, g in zip(rows, expected))
    assert len({r["prediction"] for r in rows}) >= 3, rows  # the answers depend on the question: a real test
    for r in rows:
        p, a = r["prediction"], r["answers"]
        assert r["scores"] == {
            "vqa_score": vqa_score(p, a),
            "exact_match": exact_match(p, a),
            "anls": anls(p, a),
            "relaxed_correctness": relaxed_correctness(p, a),
            "counting_accuracy": counting_accuracy(p, a[0]),
        }
    for m in ALL_METRICS:
        assert saved["overall"][m] == pytest.approx(mean([r["scores"][m] for r in rows]))
    assert saved["overall"]["n"] == 12
    assert sum(g["n"] for g in saved["by_answer_type"].values()) == 12 and "yes/no" in saved["by_answer_type"]
    for key, field in (("by_answer_type", "answer_type"), ("by_question_type", "question_type")):
        for name, group in saved[key].items():
            subset = [r for r in rows if r[field] == name]
            assert group["n"] == len(subset) and group["vqa_score"] == pytest.approx(
                mean([r["scores"]["vqa_score"] for r in subset])
            )
    assert set(saved["by_question_type"]) <= {"yes/no", "color", "shape"}
    assert 0.0 < saved["overall"]["exact_match"]  # 40 steps on 24 questions: some yes/no answers land


def test_batched_left_padding_matches_one_at_a_time(qa_vlm, tmp_path):
    _, one, _ = run(qa_vlm, tmp_path / "b1", batch_size=1)
    _, four, _ = run(qa_vlm, tmp_path / "b4", batch_size=4)
    assert len({len(r["question"]) for r in one[:4]}) > 1  # the first batch really is padded
    assert [r["prediction"] for r in four] == [r["prediction"] for r in one]
    _, beams, _ = run(qa_vlm, tmp_path / "beam", batch_size=4, num_beams=2)
    assert len(beams) == 12 and all(isinstance(r["prediction"], str) for r in beams)


def test_constant_answer_scores_by_hand(yes_vlm, images, tmp_path):
    flat = [("yes",) * 1, ("yes",) * 3 + ("no",) * 7, ("yes",) * 2 + ("no",) * 8, ("no",) * 10, ("yess",), ("yeah",)]
    data = write_jsonl(
        images / "flat.jsonl",
        [
            {"image": f"img/{k % 2}.png", "question": "is there a shape?", "answers": list(a)}
            for k, a in enumerate(flat)
        ],
    )
    summary, rows, _ = run(
        yes_vlm, tmp_path / "out", dataset=data, metrics=ALL_METRICS, prompt_suffix=" Answer with one word."
    )
    assert [r["prediction"] for r in rows] == ["yes"] * 6
    assert [r["image"] for r in rows] == [str(images / "img" / f"{k % 2}.png") for k in range(6)]
    # VQA accuracy averages min(1, matches among the other 9 annotators / 3) over the 10 leave-one-out subsets:
    # 3 of 10 say yes -> (3 * 2/3 + 7 * 1) / 10 = 0.9; 2 of 10 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert [r["scores"]["vqa_score"] for r in rows] == pytest.approx([1.0, 0.9, 0.6, 0.0, 0.0, 0.0])
    assert [r["scores"]["exact_match"] for r in rows] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # ANLS: "yess" is 1 edit over 4 characters -> 0.75; "yeah" is 2/4 = 0.5, not below the 0.5 threshold -> 0
    assert [r["scores"]["anls"] for r in rows] == pytest.approx([1.0, 1.0, 1.0, 0.0, 0.75, 0.0])
    assert all(r["scores"]["counting_accuracy"] == 0.0 for r in rows)
    assert summary["overall"]["vqa_score"] == pytest.approx(2.5 / 6)
    # majority answers: yes, no, no, no -> yes/no; yess, yeah -> other
    assert summary["by_answer_type"]["yes/no"]["vqa_score"] == pytest.approx(2.5 / 4)
    assert summary["by_answer_type"]["other"] == {
        "n": 2,
        **{m: pytest.approx(0.375 if m == "anls" else 0.0) for m in ALL_METRICS},
    }
    # multiple choice: mc_accuracy joins by itself; "yes" picks option B
    mc = write_jsonl(
        images / "mc.jsonl",
        [
            {
                "image": "img/0.png",
                "question": "is there a shape?",
                "options": ["no", "yes", "maybe"],
                "answer_index": k,
            }
            for k in (1, 0)
        ],
    )
    summary, rows, _ = run(yes_vlm, tmp_path / "mc", dataset=mc, metrics=("exact_match",))
    assert (
        [r["scores"]["mc_accuracy"] for r in rows]
        == [1.0, 0.0]
        == [mc_accuracy("yes", ["no", "yes", "maybe"], k) for k in (1, 0)]
    )
    assert (
        rows[0]["question"] == "is there a shape?\nA. no\nB. yes\nC. maybe" and summary["overall"]["mc_accuracy"] == 0.5
    )


def test_right_answers_score_one(yes_vlm, tmp_path):
    """The "yes" model on the easy-vqa test questions whose answer is yes: every metric is 1."""
    yes = [r for r in load_records("easy-vqa:test")[:60] if r["answer"] == "yes"][:8]
    data = write_jsonl(tmp_path / "yes.jsonl", [{k: v for k, v in r.items() if not k.startswith("_")} for r in yes])
    summary, rows, _ = run(yes_vlm, tmp_path / "out", dataset=data, max_samples=0)
    assert len(rows) == 8 and summary["overall"] == {"n": 8, "vqa_score": 1.0, "exact_match": 1.0}


def test_native_qwen2_vl_batched_matches_single(tmp_path):
    tiny_qwen_vl_folder(tmp_path / "qwen", "qwen2_vl")
    _, one, _ = run(str(tmp_path / "qwen"), tmp_path / "b1", max_samples=6, batch_size=1)
    _, three, saved = run(str(tmp_path / "qwen"), tmp_path / "b3", max_samples=6, batch_size=3)
    assert len(three) == 6 and saved["overall"]["n"] == 6
    assert [r["prediction"] for r in three] == [r["prediction"] for r in one]


def test_bad_model_paths_and_data_are_clear_errors(qa_vlm, tiny_model_dir, images, tmp_path):
    with pytest.raises(SystemExit, match="model folder '/no/such/vlm' does not exist"):
        run("/no/such/vlm", tmp_path)
    with pytest.raises(SystemExit, match=r"is not a vision-language model \(config.json says model_type 'llama'"):
        run(tiny_model_dir, tmp_path)
    data = write_jsonl(
        images / "bad.jsonl",
        [{"image": "img/0.png", "question": "q?", "answers": ["yes"]}, {"image": "img/0.png", "question": "q?"}],
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: answers: expected a reference answer"):
        run(qa_vlm, tmp_path, dataset=data)
    data = write_jsonl(images / "missing.jsonl", [{"image": "img/404.png", "question": "q?", "answer": "yes"}])
    with pytest.raises(DataError, match=r"missing.jsonl:1: image not found: 'img/404.png'"):
        run(qa_vlm, tmp_path, dataset=data)
    with pytest.raises(DataError, match=r"missing.jsonl:1: mc_accuracy needs options and answer_index"):
        run(qa_vlm, tmp_path, dataset=data, metrics=("mc_accuracy",))
    for flags, expected in (
        (["--model-path", "/no/such/vlm"], "error: model folder '/no/such/vlm' does not exist"),
        (["--model-path", tiny_model_dir], "is not a vision-language model"),
        (["--model-path", qa_vlm, "--dataset", data], "missing.jsonl:1: image not found"),
    ):
        proc = subprocess.run(
            [sys.executable, "eval_vqa.py", *flags, "--output-dir", str(tmp_path / "cli")],
            cwd=ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 1 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(qa_vlm, tmp_path):
    flags = [
        "--model-path",
        qa_vlm,
        "--max-samples",
        "10",
        "--batch-size",
        "3",
        "--max-new-tokens",
        "4",
        "--dtype",
        "float32",
    ]
    for name, launcher in (
        ("one", [sys.executable]),
        ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]),
    ):
        proc = subprocess.run(
            [*launcher, "eval_vqa.py", *flags, "--output-dir", str(tmp_path / name)],
            cwd=ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert one == two and one["overall"]["n"] == 10
    assert read_jsonl(tmp_path / "one" / "predictions.jsonl") == read_jsonl(tmp_path / "two" / "predictions.jsonl")
