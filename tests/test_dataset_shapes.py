"""The dataset shapes researchers arrive with (common/datasets.py): small local files (jsonl and parquet) with the exact
record shapes of Anthropic/hh-rlhf, trl-lib/ultrafeedback_binarized, HuggingFaceH4/ultrafeedback_binarized (a hub-layout
folder with its splits), Intel/orca_dpo_pairs, openai/gsm8k (a hub-layout folder with its `main` subset), an unpaired KTO
set (trl-lib/kto-mix-14k), a TRL vision preference set (trl-lib/rlaif-v: images column, bare image parts), a tool-calling
chat set and raw text; each trains two steps on a tiny model through the script that takes it. Then detection,
precedence and the one-line errors (file:line, the fields seen, the flag that settles it)."""

import io
import json
import re
from types import SimpleNamespace

import pytest
from conftest import COLORS

import dpo
import grpo
import reward_model
import sft
from common.chat import TextProcessor, build_sft_examples, tokenize_chat
from common.data import DataError, load_records, preference_parts, prompt_messages
from common.datasets import detect_format, load_data, prepare
from common.models import load_tokenizer
from common.rollout import prompt_records
from common.run import read_metrics

QUESTIONS = [
    (f"What is {a} plus {b}?", a + b) for a, b in ((2, 3), (7, 5), (4, 4), (9, 1), (6, 8), (3, 12), (10, 5), (8, 7))
]


def chat(*turns):
    return [{"role": role, "content": content} for role, content in zip(("user", "assistant") * 2, turns)]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


def png_bytes(color):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), COLORS[color]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """One file (or hub-layout folder) per shape; paths by name."""
    root, out = tmp_path_factory.mktemp("shapes"), {}
    answers = [(q, f"{q[8:-1]} is {s}.", f"{q[8:-1]} is {s + 1}.") for q, s in QUESTIONS]
    out["hh_rlhf"] = write_jsonl(root / "hh_rlhf.jsonl", [  # Anthropic/hh-rlhf: two whole plain-text dialogues
        {"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"}
        for q, good, bad in answers])  # fmt: skip
    out["trl_ultrafeedback"] = write_parquet(root / "trl_uf.parquet", [  # trl-lib/ultrafeedback_binarized
        {"chosen": chat(q, good), "rejected": chat(q, bad), "score_chosen": 8.0, "score_rejected": 3.5}
        for q, good, bad in answers])  # fmt: skip
    for split, part in (("train_prefs", answers), ("test_prefs", answers[:4])):  # HuggingFaceH4/ultrafeedback_binarized
        write_parquet(root / "h4_uf" / "data" / f"{split}-00000-of-00001.parquet", [
            {"prompt": q, "prompt_id": f"{i:064x}", "chosen": chat(q, good), "rejected": chat(q, bad),
             "messages": chat(q, good), "score_chosen": 9.0, "score_rejected": 2.0}
            for i, (q, good, bad) in enumerate(part)])  # fmt: skip
    out["h4_ultrafeedback"] = str(root / "h4_uf")
    out["orca"] = write_jsonl(root / "orca_dpo_pairs.jsonl", [  # Intel/orca_dpo_pairs
        {"system": "You are an AI assistant.", "question": q, "chosen": good, "rejected": bad}
        for q, good, bad in answers])  # fmt: skip
    for split, part in (("train", QUESTIONS), ("test", QUESTIONS[:3])):  # openai/gsm8k, subset main
        write_parquet(root / "gsm8k" / "main" / f"{split}-00000-of-00001.parquet", [
            {"question": q, "answer": f"Add them: <<{q[8:-1].replace(' plus ', '+')}={s}>>{s}.\n#### {s}"}
            for q, s in part])  # fmt: skip
    out["gsm8k"] = str(root / "gsm8k")
    out["kto"] = write_jsonl(root / "kto.jsonl", [  # trl-lib/kto-mix-14k: unpaired, conversational
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}], "label": ok}
        for q, good, bad in answers for a, ok in ((good, True), (bad, False))])  # fmt: skip
    out["vision"] = write_parquet(root / "rlaif_v.parquet", [  # trl-lib/rlaif-v: images column, bare image parts
        {"images": [{"bytes": png_bytes(color), "path": None}],
         "prompt": [{"role": "user", "content": [{"type": "image", "text": None},
                                                 {"type": "text", "text": "What color is the picture?"}]}],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": color}]}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}]}
        for color, wrong in zip(list(COLORS) * 2, list(COLORS)[1:] + list(COLORS)[:1] + list(COLORS))])  # fmt: skip
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
    out["tools"] = write_jsonl(root / "tool_chats.jsonl", [  # tool calling: tool_calls, the tool role, a tools column
        {"messages": [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]},
            {"role": "tool", "name": "get_weather", "content": f"TOOL-RESULT {t} degrees"},
            {"role": "assistant", "content": f"It is {t} degrees in {city}."}],
         "tools": [weather]}
        for city, t in (("Paris", 21), ("Oslo", 4), ("Lima", 18), ("Cairo", 33))])  # fmt: skip
    out["text"] = write_parquet(root / "text.parquet", [{"text": f"{q} The sum is {s}. " * 3} for q, s in QUESTIONS])
    return out


def dpo_run(model, data, out, **overrides):
    base = dict(model_path=model, dataset=data, eval_dataset=None, output_dir=str(out), eval_samples=0, max_steps=2,
                lr=1e-3, warmup_steps=0, batch_size=4, max_len=128, dtype="float32", save_every=0, export=False,
                ref_cache_dir=str(out / "ref-cache"))  # fmt: skip
    dpo.main(dpo.Args(**{**base, **overrides}))
    return [r for r in read_metrics(out) if "train/loss" in r]


def sft_run(model, data, out, **overrides):
    base = dict(model_path=model, dataset=data, eval_dataset=None, output_dir=str(out), eval_samples=0, max_steps=2,
                lr=1e-3, warmup_steps=0, batch_size=2, max_len=128, dtype="float32", save_every=0, export=False)  # fmt: skip
    sft.main(sft.Args(**{**base, **overrides}))
    return [r for r in read_metrics(out) if "train/loss" in r]


def data_args(dataset, **flags):
    base = dict(dataset=dataset, eval_dataset=None, dataset_split=None, dataset_config=None, eval_split=None,
                eval_fraction=0.0, columns=None, answer_regex=None, seed=0)  # fmt: skip
    return SimpleNamespace(**{**base, **flags})


# ---------------------------------------------------------------------------------------- each shape trains
def test_hh_rlhf_implicit_plain_text_prompt_trains_dpo(shapes, tiny_model_dir, tmp_path, capsys):
    records = load_records(shapes["hh_rlhf"])
    assert detect_format(records, use="pairs") == "preference"
    prompt, chosen, rejected = preference_parts(records[0])
    # the common beginning, moved back to a word start: "2 plus 3 is 5." / "2 plus 3 is 6." share "2 plus 3 is "
    assert prompt == [{"role": "user", "content": "\n\nHuman: What is 2 plus 3?\n\nAssistant: 2 plus 3 is"}]
    assert (chosen[0]["content"], rejected[0]["content"]) == ("5.", "6.")
    rows = dpo_run(tiny_model_dir, shapes["hh_rlhf"], tmp_path)
    assert len(rows) == 2 and "8 with an implicit prompt" in capsys.readouterr().out


def test_trl_ultrafeedback_implicit_chat_prompt_trains_dpo_and_reward_model(shapes, tiny_model_dir, tmp_path):
    records = load_records(shapes["trl_ultrafeedback"])
    prompt, chosen, rejected = preference_parts(records[0])
    assert [m["role"] for m in prompt] == ["user"] and chosen[0]["role"] == rejected[0]["role"] == "assistant"
    assert len(dpo_run(tiny_model_dir, shapes["trl_ultrafeedback"], tmp_path / "dpo", eval_fraction=0.25)) == 2
    reward_model.main(reward_model.Args(model_path=tiny_model_dir, dataset=shapes["trl_ultrafeedback"],
                                        eval_dataset=None, output_dir=str(tmp_path / "rm"), max_steps=2,
                                        pairs_per_step=4, dtype="float32", export=False))  # fmt: skip
    assert len([r for r in read_metrics(tmp_path / "rm") if "train/loss" in r]) == 2


def test_h4_ultrafeedback_splits_and_precedence(shapes, tiny_model_dir, tmp_path, capsys):
    folder = shapes["h4_ultrafeedback"]
    train, held_out = load_data(data_args(folder, dataset_split="train_prefs", eval_split="test_prefs"))
    assert (len(train), len(held_out)) == (8, 4) and held_out[0]["_where"].endswith(
        "test_prefs-00000-of-00001.parquet[0]"
    )
    # dpo.py and reward_model.py: a preference pair (its string prompt beside whole chats: the chats' common turn)
    assert detect_format(train, use="pairs") == "preference"
    assert "ignored: messages" in capsys.readouterr().out
    assert preference_parts(train[0])[0] == chat(train[0]["prompt"])
    # sft.py: its messages chat; grpo.py and ppo.py: the prompt field
    assert detect_format(train, use="sft") == "messages"
    assert detect_format(train, use="prompts") == "prompt"
    rows = dpo_run(tiny_model_dir, folder, tmp_path, dataset_split="train_prefs", eval_split="test_prefs")
    assert len(rows) == 2 and "eval/loss" in rows[-1]  # held out: the test_prefs split


def test_orca_dpo_pairs_columns_train_dpo(shapes, tiny_model_dir, tmp_path):
    records = load_data(data_args(shapes["orca"], columns="prompt=question"))[0]
    assert preference_parts(records[0])[0] == chat("What is 2 plus 3?")
    assert len(dpo_run(tiny_model_dir, shapes["orca"], tmp_path, columns="prompt=question")) == 2


def test_gsm8k_subset_split_answer_regex_train_grpo(shapes, tiny_model_dir, tmp_path):
    flags = dict(dataset_config="main", eval_split="test", columns="prompt=question", answer_regex="#### (.*)")
    train, held_out = load_data(data_args(shapes["gsm8k"], **flags))
    processor = TextProcessor(load_tokenizer("smollm2-135m"))
    items = prompt_records(train, processor)
    assert items[0] == (chat("What is 2 plus 3?"), "5") and len(items) == 8 and len(held_out) == 3
    grpo.main(grpo.Args(model_path=tiny_model_dir, dataset=shapes["gsm8k"], eval_dataset=None, output_dir=str(tmp_path),
                        max_steps=2, prompts_per_step=2, group_size=2, max_new_tokens=8, dtype="float32",
                        rewards=("math",), export=False, micro_batch_size=4, eval_samples=2, **flags))  # fmt: skip
    assert len([r for r in read_metrics(tmp_path) if "reward/mean" in r]) == 2
    # sft.py on the same files: the question and the worked answer, the final number the accuracy's reference
    flags["columns"] = "prompt=question,completion=answer"
    train, _ = load_data(data_args(shapes["gsm8k"], **flags))
    assert detect_format(train, use="sft") == "prompt_completion" and train[0]["answer"] == "5"


def test_unpaired_kto_trains_dpo(shapes, tiny_model_dir, tmp_path, capsys):
    rows = dpo_run(tiny_model_dir, shapes["kto"], tmp_path, loss_type="kto", eval_fraction=0.25,
                   desirable_weight=1.0, undesirable_weight=1.33)  # fmt: skip
    assert len(rows) == 2 and "train/kl" in rows[0] and "train/rewards/margins" in rows[0]
    assert "12 examples (" in capsys.readouterr().out
    assert 0 <= rows[-1]["eval/rewards/accuracies"] <= 1 and "eval/logps_accuracy" not in rows[-1]  # no pairs
    with pytest.raises(DataError, match=r"kto\.jsonl:1: unpaired records .* --loss-type kto"):
        dpo_run(tiny_model_dir, shapes["kto"], tmp_path / "sigmoid")


def test_trl_vision_preferences_fill_bare_image_parts_and_train_dpo(shapes, vlm_dir, tmp_path):
    records = prepare(load_records(shapes["vision"]), shapes["vision"], {}, None)
    image = records[0]["prompt"][0]["content"][0]["image"]
    assert image.size == (32, 32) and image.convert("RGB").getpixel((0, 0)) == COLORS["red"]
    assert detect_format(records, use="pairs") == "preference"
    assert len(dpo_run(vlm_dir, shapes["vision"], tmp_path, batch_size=2)) == 2


def test_tool_calls_trained_and_tool_results_masked(shapes, tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer("smollm2-135m")
    record = load_records(shapes["tools"])[0]
    example = tokenize_chat(record["messages"], tokenizer, max_len=1024, tools=record["tools"])
    text = tokenizer.decode(example["input_ids"])
    trained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
    # SmolLM2's template drops tool_calls: they are written into the turn as JSON, and trained
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert call in trained and "It is 21 degrees in Paris." in trained
    assert "TOOL-RESULT" in text and "TOOL-RESULT" not in trained  # the tool's result is context, not a target
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text  # the tools, in the system turn
    assert len(sft_run(tiny_model_dir, shapes["tools"], tmp_path)) == 2


def test_raw_text_trains_sft_without_chat_template(shapes, tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer("smollm2-135m")
    tokenizer.chat_template = None  # a base model's tokenizer: raw text needs no template
    records = load_records(shapes["text"])
    examples, stats = build_sft_examples(records, TextProcessor(tokenizer), max_len=24)
    ids = tokenizer(records[0]["text"])["input_ids"] + [tokenizer.eos_token_id]
    pieces = [ids[i : i + 24] for i in range(0, len(ids), 24)]  # a long text is cut into max_len pieces
    assert stats["format"] == "text" and len(pieces) > 1 and [e["input_ids"] for e in examples[: len(pieces)]] == pieces
    assert all(e["labels"] == e["input_ids"] for e in examples)  # every token a target
    rows = sft_run(tiny_model_dir, shapes["text"], tmp_path, max_len=64)
    assert len(rows) == 2 and rows[0]["train/padding_fraction"] < 0.5  # packed


# ------------------------------------------------------------------------------------ detection and errors
@pytest.mark.parametrize(
    "record, use, pattern",
    [
        ({"text": "a", "messages": chat("hi", "yo")}, "sft",
         r"x\.jsonl:1: ambiguous record for sft\.py: fields \['messages', 'text'\] fit both text and messages; "
         r"drop the field not meant with --columns text= or --columns messages="),
        ({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "sft",
         r"x\.jsonl:1: sft\.py needs .*fields seen: \['chosen', 'prompt', 'rejected'\]; .*--columns completion=chosen"),
        ({"prompt": "2+2?", "completion": "4", "label": False}, "sft", r"x\.jsonl:1: .*dpo\.py --loss-type kto"),
        ({"prompt": "2+2?", "answer": "4"}, "sft", r"x\.jsonl:1: .*grpo\.py and ppo\.py .*--columns completion=NAME"),
        ({"messages": chat("hi", "yo")}, "pairs", r"x\.jsonl:1: dpo\.py needs preference records"),
        ({"text": "a"}, "prompts", r"x\.jsonl:1: .*raw text has no prompt"),
        ({"question": "2+2?", "response": "4"}, "sft", r"fields seen: \['question', 'response'\]; map yours with --columns"),
        ({"chosen": "same", "rejected": "same"}, "pairs", r"x\.jsonl:1: implicit prompt: .*--columns prompt=NAME"),
        ({"chosen": chat("a", "b"), "rejected": "x"}, "pairs", r"x\.jsonl:1: implicit prompt: .* must both be text or both chats"),
        ({"prompt": "p", "completion": "c", "label": "yes"}, "pairs", r"x\.jsonl:1: label: expected true .* got 'yes'"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "sft",
         r"x\.jsonl:1: a bare image part .* `images` column"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]}, "sft",
         r"x\.jsonl:1: messages\[0\]\.tool_calls: expected"),
    ],
)  # fmt: skip
def test_bad_and_ambiguous_records_are_one_line_errors(tmp_path, record, use, pattern):
    path = write_jsonl(tmp_path / "x.jsonl", [record])
    script = {"sft": "sft.py", "pairs": "dpo.py", "prompts": "grpo.py"}[use]
    with pytest.raises(DataError, match=pattern) as error:
        detect_format(prepare(load_records(path), path, {}, None), use=use, script=script)
    assert "\n" not in str(error.value)


def test_one_shape_per_dataset_and_the_log(tmp_path, capsys):
    mixed = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d", "chosen": "e", "rejected": "f"}]
    path = write_jsonl(tmp_path / "x.jsonl", mixed)
    with pytest.raises(DataError, match=r"x\.jsonl:2: a preference record, but the first \(.*x\.jsonl:1\) made the "
                                        r"data prompt_completion; drop or map fields with --columns"):  # fmt: skip
        detect_format(load_records(path), use="any")
    # grpo.py and ppo.py take the prompt of any record that has one
    assert detect_format(load_records(path), use="prompts") == "prompt"
    assert "ignored: completion" in capsys.readouterr().out


def test_columns_answer_regex_and_images(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "2+2?", "answer": "2 and 2.\n#### 4", "text": "t"}])
    [r] = prepare(load_records(path), path, {"prompt": "question", "completion": "answer", "text": None}, "#### (.*)")
    assert r["prompt"] == r["question"] == "2+2?" and r["completion"] == "2 and 2.\n#### 4"  # copies: both stay
    assert r["answer"] == "4" and "text" not in r  # the reference read out; text= dropped the field
    with pytest.raises(
        DataError, match=r"x\.jsonl:1: answer '2 and 2\.\\n#### 4' does not match --answer-regex 'ANSWER: \(\.\*\)'"
    ):
        prepare(load_records(path), path, {}, "ANSWER: (.*)")
    with pytest.raises(DataError, match=r"x\.jsonl:1: --columns prompt=qestion: no record of .* has a field 'qestion' "
                                        r"\(fields: \['answer', 'question', 'text'\]\)"):  # fmt: skip
        load_data(data_args(path, columns="prompt=qestion"))
    with pytest.raises(DataError, match=r"--columns 'prompt': expected new=old pairs"):
        load_data(data_args(path, columns="prompt"))
    # a preference set trains SFT on its chosen side only when asked
    pref = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    [r] = load_data(data_args(pref, columns="completion=chosen"))[0]
    assert detect_format([r], use="sft") == "prompt_completion" and detect_format([r], use="pairs") == "preference"
    images = {"images": ["a.png", "b.png"], "messages": [{"role": "user", "content": [{"type": "image"}]}]}
    with pytest.raises(DataError, match=r"x\.jsonl:1: 2 images in `images` but 1 bare image parts to fill"):
        prepare(load_records(write_jsonl(tmp_path / "x.jsonl", [images])), "x", {}, None)


def test_splits_subsets_and_held_out_fraction(shapes, tmp_path):
    with pytest.raises(DataError, match=r"kto\.jsonl is one file, without splits or subsets: --dataset-split"):
        load_data(data_args(shapes["kto"], dataset_split="train"))
    with pytest.raises(
        DataError, match=r"no subset 'socratic' \(--dataset-config\) in this folder; subfolders: \['main'\]"
    ):
        load_data(data_args(shapes["gsm8k"], dataset_config="socratic"))
    with pytest.raises(DataError, match=r"no \.jsonl/\.json/\.parquet file names the split 'validation'"):
        load_data(data_args(shapes["gsm8k"], dataset_config="main", eval_split="validation"))
    with pytest.raises(DataError, match="--eval-split and --eval-fraction both"):
        load_data(data_args(shapes["kto"], eval_split="test", eval_fraction=0.1))
    train, held_out = load_data(data_args(shapes["kto"], eval_fraction=0.25))
    again, _ = load_data(data_args(shapes["kto"], eval_fraction=0.25))
    other, _ = load_data(data_args(shapes["kto"], eval_fraction=0.25, seed=1))
    where = [r["_where"] for r in train]
    assert (len(train), len(held_out)) == (12, 4) and not set(where) & {r["_where"] for r in held_out}
    assert where == [r["_where"] for r in again] != [r["_where"] for r in other]
    # a datasets save_to_disk folder: its splits by name
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a b"}] * 3),
                          "test": datasets.Dataset.from_list([{"text": "c"}])}).save_to_disk(tmp_path / "saved")  # fmt: skip
    train, held_out = load_data(data_args(str(tmp_path / "saved"), eval_split="test"))
    assert [r["text"] for r in held_out] == ["c"] and len(train) == 3


def test_every_script_takes_the_same_data_flags():
    import dataclasses

    import eval_vqa
    import ppo
    import pretrain_captioner

    flags = ("dataset_split", "dataset_config", "eval_split", "eval_fraction", "columns", "answer_regex")
    docs = {}
    for module in (sft, dpo, reward_model, grpo, ppo, pretrain_captioner, eval_vqa):
        fields = {f.name: f for f in dataclasses.fields(module.Args)}
        names = [f for f in flags if f in fields]
        assert names == list(flags) or (module is eval_vqa and "eval_split" not in names), module.__name__
        source = open(module.__file__).read()
        for name in names:
            docs.setdefault(name, set()).add(re.search(rf"    {name}: .*\n    \"\"\"(.*)\"\"\"", source).group(1))
    assert all(len(texts) == 1 for texts in docs.values()), docs


def test_reward_model_and_sft_refuse_what_they_cannot_take(shapes):
    processor = TextProcessor(load_tokenizer("smollm2-135m"))
    with pytest.raises(
        DataError, match=r"kto\.jsonl:1: reward_model\.py needs preference records \(chosen, rejected\)"
    ):
        reward_model.preference_pairs(shapes["kto"], processor, 256)
    with pytest.raises(DataError, match=r"kto\.jsonl:1: .*KTO data for dpo\.py --loss-type kto"):
        build_sft_examples(shapes["kto"], processor, max_len=64)
    assert prompt_messages(load_records(shapes["kto"])[0], "unpaired") == chat("What is 2 plus 3?")
