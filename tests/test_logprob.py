"""The fused linear logprob kernel against the naive log_softmax + gather reference.

Comparisons run in float64 so that any real bug (a wrong gradient term, a chunk boundary off by one,
a bad online log-sum-exp merge) shows up far above rounding noise.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.logprob import forward_hidden, fused_linear_logprobs, lm_head_params, naive_logprobs, sequence_logprobs

F64 = torch.float64
REPO = Path(__file__).resolve().parents[1]


def make_problem(n=37, hidden_size=16, vocab=101, dtype=F64, bias=True, seed=0, ignore_every=5):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=gen, dtype=dtype).requires_grad_()  # [N, H]
    weight = (torch.randn(vocab, hidden_size, generator=gen, dtype=dtype) / 2).requires_grad_()  # [V, H]
    b = torch.randn(vocab, generator=gen, dtype=dtype).requires_grad_() if bias else None  # [V]
    targets = torch.randint(0, vocab, (n,), generator=gen)  # [N]
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, b, targets


def values_and_grads(fn, hidden, weight, bias, targets, entropy=False, **kw):
    """Outputs plus grads of a random linear functional of them (exercises non-uniform upstream grads)."""
    gen = torch.Generator().manual_seed(1)
    out = fn(hidden, weight, targets, bias=bias, return_entropy=entropy, **kw)
    outs = out if entropy else (out,)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    params = [p for p in (hidden, weight, bias) if p is not None]
    return [o.detach() for o in outs], torch.autograd.grad(loss, params)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunks", [(8, 30), (1024, None), (5, 7)])
def test_matches_naive_float64(entropy, temperature, chunks):
    hidden, weight, bias, targets = make_problem()
    chunk_size, vocab_chunk_size = chunks
    fused_out, fused_grads = values_and_grads(
        fused_linear_logprobs,
        hidden,
        weight,
        bias,
        targets,
        entropy,
        temperature=temperature,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )
    naive_out, naive_grads = values_and_grads(
        naive_logprobs, hidden, weight, bias, targets, entropy, temperature=temperature
    )
    for f, n in zip(fused_out, naive_out):
        assert f.dtype == F64
        assert rel_err(f, n) <= 1e-6
    for f, n in zip(fused_grads, naive_grads):
        assert rel_err(f, n) <= 1e-6
    assert (fused_out[0] <= 0).all()
    ignored = targets == -100
    assert (fused_out[0][ignored] == 0).all() and (fused_out[0][~ignored] < 0).all()
    if entropy:
        assert (fused_out[1][ignored] == 0).all() and (fused_out[1][~ignored] > 0).all()


def test_values_match_independent_formula():
    # Not via naive_logprobs: logsumexp written out by hand with temperature and bias.
    hidden, weight, bias, targets = make_problem(n=6, vocab=13, ignore_every=0)
    logits = (hidden @ weight.T + bias) / 1.5
    expected = logits[torch.arange(6), targets] - logits.exp().sum(1).log()
    probs = logits.softmax(1)
    expected_entropy = -(probs * probs.log()).sum(1)
    got, got_entropy = fused_linear_logprobs(
        hidden, weight, targets, bias=bias, temperature=1.5, chunk_size=4, vocab_chunk_size=5, return_entropy=True
    )
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got_entropy, expected_entropy, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "n,vocab,chunk_size,vocab_chunk_size",
    [
        (1, 101, 1024, None),  # a single token
        (33, 101, 8, 16),  # N and V not multiples of their chunks
        (16, 64, 16, 64),  # exact multiples
        (9, 50, 100, 1000),  # chunks larger than the problem
    ],
)
def test_odd_shapes(n, vocab, chunk_size, vocab_chunk_size):
    hidden, weight, bias, targets = make_problem(n=n, vocab=vocab, ignore_every=0)
    fused_out, fused_grads = values_and_grads(
        fused_linear_logprobs,
        hidden,
        weight,
        bias,
        targets,
        True,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )
    naive_out, naive_grads = values_and_grads(naive_logprobs, hidden, weight, bias, targets, True)
    for f, n_ in zip(fused_out + list(fused_grads), naive_out + list(naive_grads)):
        assert f.shape == n_.shape and rel_err(f, n_) <= 1e-6


def test_all_targets_ignored_gives_zero_grads():
    hidden, weight, bias, targets = make_problem(n=10, bias=True)
    targets[:] = -100
    (logp, entropy), grads = values_and_grads(
        fused_linear_logprobs, hidden, weight, bias, targets, True, chunk_size=4, vocab_chunk_size=32
    )
    assert (logp == 0).all() and (entropy == 0).all()
    for g in grads:
        assert torch.isfinite(g).all() and (g == 0).all()


def test_bias_none_and_leading_dims():
    hidden, weight, _, targets = make_problem(n=12, bias=False)
    out = fused_linear_logprobs(hidden.view(3, 4, -1), weight, targets.view(3, 4), chunk_size=5)
    assert out.shape == (3, 4)
    assert rel_err(out.reshape(-1), naive_logprobs(hidden, weight, targets)) <= 1e-6


def test_no_grad_returns_no_graph():
    hidden, weight, bias, targets = make_problem()
    with torch.no_grad():
        logp, entropy = fused_linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True)
    assert logp.grad_fn is None and not logp.requires_grad and entropy.grad_fn is None
    assert rel_err(logp, naive_logprobs(hidden, weight, targets, bias=bias).detach()) <= 1e-6


def test_only_entropy_used_in_loss():
    # Backward with grad_logprobs=None (only the entropy feeds the loss).
    hidden, weight, bias, targets = make_problem()
    params = (hidden, weight, bias)
    _, entropy = fused_linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, chunk_size=8)
    fused = torch.autograd.grad(entropy.sum(), params)
    _, entropy_ref = naive_logprobs(hidden, weight, targets, bias=bias, return_entropy=True)
    naive = torch.autograd.grad(entropy_ref.sum(), params)
    for f, n in zip(fused, naive):
        assert rel_err(f, n) <= 1e-6


def test_bf16_close_to_float32():
    # The matmul runs in bf16 (like a bf16 lm_head), so logits carry bf16 rounding (~0.4% of their size):
    # use O(1) logits, as from a normed hidden state and a 1/sqrt(H)-scaled head.
    hidden, weight, bias, targets = make_problem(n=64, hidden_size=32, vocab=300, dtype=torch.float32)
    hidden_bf, weight_bf, bias_bf = (
        t.detach().bfloat16().requires_grad_() for t in (hidden, weight * 2 / 32**0.5, bias / 4)
    )
    logp_bf, entropy_bf = fused_linear_logprobs(
        hidden_bf, weight_bf, targets, bias=bias_bf, return_entropy=True, chunk_size=16, vocab_chunk_size=128
    )
    # float32 reference on the same (bf16-rounded) inputs, so only the kernel's own error is measured.
    ref = [t.detach().float().requires_grad_() for t in (hidden_bf, weight_bf, bias_bf)]
    logp_ref, entropy_ref = naive_logprobs(ref[0], ref[1], targets, bias=ref[2], return_entropy=True)
    assert logp_bf.dtype == torch.float32
    assert (logp_bf - logp_ref).abs().max() <= 1e-2 and (entropy_bf - entropy_ref).abs().max() <= 1e-2
    (logp_bf.sum() + entropy_bf.sum()).backward()
    (logp_ref.sum() + entropy_ref.sum()).backward()
    for p_bf, p_ref in zip((hidden_bf, weight_bf, bias_bf), ref):
        assert p_bf.grad.dtype == torch.bfloat16
        assert rel_err(p_bf.grad.float(), p_ref.grad) <= 2e-2


def test_autocast_bf16_matmul_with_fp32_params():
    hidden, weight, _, targets = make_problem(n=20, hidden_size=32, vocab=200, dtype=torch.float32, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = fused_linear_logprobs(hidden, weight, targets, chunk_size=8)
    logp.sum().backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    assert (logp - naive_logprobs(hidden, weight, targets)).abs().max() <= 5e-2


# ----------------------------------------------------------------------------- tiny Llama
def tiny_llama(seed=0, vocab_size=49152):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def tiny_batch(vocab_size=49152, batch=2, seq=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=gen)  # [B, T]
    labels = input_ids.clone()
    labels[:, :4] = -100  # a prompt that is not scored
    labels[1, -2:] = -100  # and some padding
    return input_ids, labels


def test_forward_hidden_is_final_norm_output_without_full_logits():
    model = tiny_llama()
    input_ids, _ = tiny_batch()
    head_input_shapes = []
    model.lm_head.register_forward_hook(lambda module, args, out: head_input_shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        hidden = forward_hidden(model, input_ids)  # [B, T, H]
        assert head_input_shapes == [(2, 1, 64)]  # only the last position went through the LM head
        expected = model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]  # post-norm in HF
    assert hidden.shape == (2, 12, 64) and torch.allclose(hidden, expected, atol=1e-6)


def test_sequence_logprobs_alignment_by_hand():
    model = tiny_llama()
    input_ids, labels = tiny_batch()
    with torch.no_grad():
        got = sequence_logprobs(model, input_ids, labels)
        logits = model(input_ids=input_ids).logits.double()  # [B, T, V]
    logp_all = logits.log_softmax(-1)
    assert got.shape == labels.shape and got.dtype == torch.float32
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            target = labels[b, t + 1].item() if t + 1 < labels.shape[1] else -100
            expected = 0.0 if target == -100 else logp_all[b, t, target].item()
            assert abs(got[b, t].item() - expected) <= 1e-5


@pytest.mark.parametrize("peft", [False, True])
def test_sequence_logprobs_fused_equals_naive(peft):
    model = tiny_llama()
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    input_ids, labels = tiny_batch()
    position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    trainable = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for impl in ("naive", "fused"):
        logp, entropy = sequence_logprobs(
            model, input_ids, labels, position_ids=position_ids, impl=impl, temperature=0.9, return_entropy=True
        )
        loss = -logp.sum() / (labels[:, 1:] != -100).sum() + 0.1 * entropy.mean()
        results[impl] = (logp.detach(), entropy.detach(), torch.autograd.grad(loss, trainable))
    (lf, ef, gf), (ln, en, gn) = results["fused"], results["naive"]
    assert (lf - ln).abs().max() <= 1e-5
    # entropy (~10.8 nats here) sums 49k float32 terms in a different order in each path: a few ulps apart, 1.3e-5
    # seen on an AVX2-only CPU, so the bound is relative (5e-6 of the value, ~50x float32's epsilon)
    assert ((ef - en).abs() <= 5e-6 * en.abs() + 1e-6).all()
    assert (lf[:, -1] == 0).all() and (lf[:, :3] == 0).all()
    for f, n in zip(gf, gn):
        assert rel_err(f, n) <= 1e-4
    if peft:
        weight, _ = lm_head_params(model)
        assert weight is model.get_base_model().model.embed_tokens.weight  # tied, found through the wrapper


@pytest.mark.slow
def test_fsdp2_two_ranks(tmp_path):
    out = tmp_path / "dist_logprob.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "tests" / "dist_logprob.py"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["lm_head_weight_is_full_tensor"], result
    assert result["logprob_max_rel_err"] <= 1e-5, result
    assert result["weight_grad_rel_err"] <= 1e-5, result
    assert result["ok"], result
