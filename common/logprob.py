"""Per-token log-probabilities without materialising the [tokens, vocab] logits.

Every training script needs log p(target | prefix) for each token, and the naive way (`log_softmax(hidden @ W.T)`
then gather) builds several N x V float32 tensors: at 16k tokens and a 49k vocab that is 3 GiB each.
`fused_linear_logprobs` walks over chunks of tokens (and of the vocab) with an online log-sum-exp instead, keeping only
[N] float32 statistics. Its backward recomputes each chunk's logits from the saved hidden states and per-token
logsumexp, so memory stays flat in N at the cost of one extra matmul. No gradient work happens in forward, so a no-grad
call (reference model, rollouts) costs no more than the naive one.

    logits = (hidden @ weight.T + bias) / temperature            # never built in full
    logprob[i] = logits[i, targets[i]] - logsumexp(logits[i])    # 0 where targets == ignore_index
    entropy[i] = logsumexp(logits[i]) - sum_v p[i, v] * logits[i, v]

Model helpers: `forward_hidden` runs a HF causal LM (plain, PEFT-wrapped or FSDP2-wrapped) up to its final norm,
`lm_head_params` returns the output-embedding weight/bias, `sequence_logprobs` puts them together with the usual
one-token shift.

How scripts arrange that the LM-head weight is unsharded under FSDP2 (`fully_shard` on each decoder layer, then on the
root model): `forward_hidden` calls the *whole* model, so FSDP2's root pre-forward hook all-gathers the root's own
parameters (embeddings, final norm, lm_head). FSDP2 never reshards the root after forward (torch 2.13
`FSDPState._lazy_init` sets the root's `post_forward_mesh_info = None` unless `reshard_after_forward` was passed
explicitly to the root's `fully_shard`), so right after `forward_hidden`, `lm_head_params(model)` is the full unsharded
tensor. Autograd writes its gradient into the unsharded parameter and FSDP2's post-backward reduce-scatters it like any
other. So: do not pass `reshard_after_forward=True` to the root's `fully_shard`, and call `lm_head_params` after
`forward_hidden`, in the same step (`lm_head_params` raises if it sees a sharded DTensor). tests/dist_logprob.py checks
values and the reduced LM-head gradient against a single-process run.
"""

import torch
import torch.nn.functional as F

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()

# Chosen by measuring on a 2-core CPU (bench/logprob.py, H=576, V=49152): 1024-token chunks keep the
# fp32 matmuls near peak throughput, and 8192-wide vocab chunks keep each logits tile at 32 MiB.
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_VOCAB_CHUNK_SIZE = 8192


def _compute_dtypes(hidden, weight):
    """(matmul dtype, statistics dtype). Autocast picks the matmul dtype if active (then the weight is cast
    once per call, like autocast's own F.linear would); statistics are at least float32."""
    if torch.is_autocast_enabled(hidden.device.type):
        matmul_dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        matmul_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return matmul_dtype, torch.promote_types(matmul_dtype, torch.float32)


class _Tiles:
    """Reusable [chunk, vocab_chunk] work buffers. Fresh big allocations are page-faulted in on every
    chunk on CPU (glibc mmaps anything over 32 MiB), which costs as much as the softmax math itself."""

    def __init__(self, rows, cols, matmul_dtype, stats_dtype, device, n_stats_tiles):
        self.stats = [torch.empty(rows * cols, dtype=stats_dtype, device=device) for _ in range(n_stats_tiles)]
        self.mm = None if matmul_dtype == stats_dtype else torch.empty(rows * cols, dtype=matmul_dtype, device=device)

    def logits(self, h, w, b, inv_t):
        """[C, Vc] logits / T in the stats dtype, written into tile 0; the matmul runs in the inputs' dtype."""
        out = self.stats[0][: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
        mm_out = out if self.mm is None else self.mm[: out.numel()].view(out.shape)
        if b is None:
            torch.mm(h, w.T, out=mm_out)
        else:
            torch.addmm(b, h, w.T, out=mm_out)
        if self.mm is not None:
            out.copy_(mm_out)
        return out.mul_(inv_t) if inv_t != 1.0 else out

    def spare(self, like):
        return self.stats[1][: like.numel()].view(like.shape)

    def to_matmul(self, x):
        return x if self.mm is None else self.mm[: x.numel()].view(x.shape).copy_(x)


def _chunks(n, size):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, temperature, chunk_size, vocab_chunk_size, return_entropy, ignore_index
    ):
        matmul_dtype, stats_dtype = _compute_dtypes(hidden, weight)
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        chunk_size, vocab_chunk_size = min(chunk_size, n_tokens), min(vocab_chunk_size, vocab)
        with torch.autocast(hidden.device.type, enabled=False):
            hidden_mm, weight_mm = hidden.to(matmul_dtype), weight.to(matmul_dtype)
            bias_mm = None if bias is None else bias.to(matmul_dtype)
            tiles = _Tiles(
                chunk_size, vocab_chunk_size, matmul_dtype, stats_dtype, hidden.device, 2 if return_entropy else 1
            )
            valid = targets != ignore_index  # [N]
            safe_targets = torch.where(valid, targets, 0)  # [N]
            lse = torch.empty(n_tokens, dtype=stats_dtype, device=hidden.device)  # [N]
            target_logit = torch.zeros_like(lse)  # [N]
            entropy = torch.empty_like(lse) if return_entropy else None  # [N]
            for start, end in _chunks(n_tokens, chunk_size):
                h, tgt = hidden_mm[start:end], safe_targets[start:end]
                run_lse = run_mean = None  # online log-sum-exp and E_p[logit] over the vocab chunks
                for v0, v1 in _chunks(vocab, vocab_chunk_size):
                    logits = tiles.logits(
                        h, weight_mm[v0:v1], None if bias_mm is None else bias_mm[v0:v1], 1.0 / temperature
                    )  # [C, Vc]
                    in_chunk = (tgt >= v0) & (tgt < v1)
                    picked = logits.gather(1, (tgt - v0).clamp_(0, v1 - v0 - 1)[:, None]).squeeze(1)
                    target_logit[start:end] += torch.where(in_chunk, picked, 0.0)
                    row_max = logits.amax(1, keepdim=True)  # [C, 1]
                    if return_entropy:
                        unnorm = torch.sub(logits, row_max, out=tiles.spare(logits)).exp_()  # [C, Vc]
                        sum_exp = unnorm.sum(1)
                        chunk_mean = unnorm.mul_(logits).sum(1) / sum_exp  # E_p[logit] within the chunk
                    else:
                        sum_exp = logits.sub_(row_max).exp_().sum(1)
                    chunk_lse = row_max.squeeze(1) + sum_exp.log_()  # [C]
                    if run_lse is None:
                        run_lse, run_mean = chunk_lse, (chunk_mean if return_entropy else None)
                    else:
                        new_lse = torch.logaddexp(run_lse, chunk_lse)
                        if return_entropy:
                            run_mean = run_mean * (run_lse - new_lse).exp_() + chunk_mean * (chunk_lse - new_lse).exp_()
                        run_lse = new_lse
                lse[start:end] = run_lse
                if return_entropy:
                    entropy[start:end] = run_lse - run_mean
            del tiles
            logprobs = torch.where(valid, target_logit - lse, 0.0)
            if return_entropy:
                entropy = torch.where(valid, entropy, 0.0)
        ctx.save_for_backward(hidden, weight, bias, safe_targets, valid, lse, entropy)
        ctx.cfg = (temperature, chunk_size, vocab_chunk_size, matmul_dtype, stats_dtype)
        ctx.set_materialize_grads(False)
        return (logprobs, entropy) if return_entropy else logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):
        hidden, weight, bias, targets, valid, lse, entropy = ctx.saved_tensors
        temperature, chunk_size, vocab_chunk_size, matmul_dtype, stats_dtype = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        none = (None,) * 6
        if grad_logprobs is None and grad_entropy is None:
            return (None, None, None) + none
        with torch.autocast(hidden.device.type, enabled=False):
            # Every logit gradient carries a 1/T factor and is zero at ignored positions: fold both in.
            scale = valid.to(stats_dtype) / temperature  # [N]
            g_lp = grad_logprobs.to(stats_dtype) * scale if grad_logprobs is not None else torch.zeros_like(scale)
            g_ent = grad_entropy.to(stats_dtype) * scale if grad_entropy is not None else None
            hidden_mm, weight_mm = hidden.to(matmul_dtype), weight.to(matmul_dtype)
            bias_mm = None if bias is None else bias.to(matmul_dtype)
            tiles = _Tiles(
                chunk_size, vocab_chunk_size, matmul_dtype, stats_dtype, hidden.device, 1 if g_ent is None else 2
            )
            grad_h = torch.zeros(hidden.shape, dtype=stats_dtype, device=hidden.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=stats_dtype, device=weight.device) if need_w else None
            grad_b = torch.zeros(vocab, dtype=stats_dtype, device=weight.device) if need_b else None
            in_place = matmul_dtype == stats_dtype  # then BLAS accumulates straight into the grads
            for start, end in _chunks(n_tokens, chunk_size):
                h, tgt = hidden_mm[start:end], targets[start:end]
                c_lse, c_glp = lse[start:end, None], g_lp[start:end, None]
                for v0, v1 in _chunks(vocab, vocab_chunk_size):
                    w = weight_mm[v0:v1]
                    logp = tiles.logits(h, w, None if bias_mm is None else bias_mm[v0:v1], 1.0 / temperature).sub_(
                        c_lse
                    )  # [C, Vc]
                    if g_ent is None:  # d logprob / d logit = onehot - p
                        dlogits = logp.exp_().mul_(-c_glp)
                    else:  # plus d entropy / d logit = -p (log p + H)
                        probs = torch.exp(logp, out=tiles.spare(logp))
                        dlogits = (
                            logp.add_(entropy[start:end, None])
                            .mul_(g_ent[start:end, None])
                            .add_(c_glp)
                            .mul_(probs)
                            .neg_()
                        )
                    in_chunk = (tgt >= v0) & (tgt < v1)
                    dlogits.scatter_add_(
                        1,
                        (tgt - v0).clamp_(0, v1 - v0 - 1)[:, None],
                        torch.where(in_chunk, g_lp[start:end], 0.0)[:, None],
                    )
                    if need_b:
                        grad_b[v0:v1] += dlogits.sum(0)
                    dlogits_mm = tiles.to_matmul(dlogits)
                    if in_place:
                        if need_h:
                            grad_h[start:end].addmm_(dlogits_mm, w)
                        if need_w:
                            grad_w[v0:v1].addmm_(dlogits_mm.T, h)
                    else:
                        if need_h:
                            grad_h[start:end] += torch.mm(dlogits_mm, w)
                        if need_w:
                            grad_w[v0:v1] += torch.mm(dlogits_mm.T, h)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        ) + none


def fused_linear_logprobs(
    hidden,
    weight,
    targets,
    *,
    bias=None,
    temperature=1.0,
    chunk_size=DEFAULT_CHUNK_SIZE,
    vocab_chunk_size=None,
    return_entropy=False,
    ignore_index=-100,
):
    """log p(targets) under logits = (hidden @ weight.T + bias) / temperature, chunked.

    hidden [N, H] (or [..., H]), weight [V, H], targets [N] (or [...]) long -> logprobs float32 with
    targets' shape (and entropy, same shape, when return_entropy). Ignored targets give 0 for both.
    Outputs are float32 (float64 for float64 inputs); grads come back in the inputs' dtypes.
    vocab_chunk_size=None picks 8192 (the whole vocab when smaller)."""
    lead_shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if vocab_chunk_size is None:
        vocab_chunk_size = DEFAULT_VOCAB_CHUNK_SIZE
    out = _FusedLinearLogprobs.apply(
        hidden,
        weight,
        bias,
        targets,
        float(temperature),
        int(chunk_size),
        int(vocab_chunk_size),
        bool(return_entropy),
        ignore_index,
    )
    if return_entropy:
        return out[0].view(lead_shape), out[1].view(lead_shape)
    return out.view(lead_shape)


def _logprobs_from_logits(logits, targets, temperature, return_entropy, ignore_index):
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # [..., V]
    all_logp = torch.log_softmax(logits, dim=-1)  # [..., V]
    valid = targets != ignore_index
    logp = all_logp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, 0.0)
    if not return_entropy:
        return logp
    return logp, torch.where(valid, -(all_logp.exp() * all_logp).sum(-1), 0.0)


def naive_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False, ignore_index=-100):
    """Reference: full logits, log_softmax, gather. Same signature and outputs as the fused version."""
    return _logprobs_from_logits(F.linear(hidden, weight, bias), targets, temperature, return_entropy, ignore_index)


def _unwrap_peft(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _final_norm(model):
    decoder = _unwrap_peft(model).get_decoder()
    for name in ("norm", "final_layernorm", "ln_f"):
        if isinstance(getattr(decoder, name, None), torch.nn.Module):
            return getattr(decoder, name)
    raise ValueError(f"can't find the final norm of {type(decoder).__name__}")


def forward_hidden(model, input_ids, *, position_ids=None, attention_mask=None, **kwargs):
    """Final-norm output [B, T, H] of a HF causal LM (plain, PEFT or FSDP2), without full logits.

    Calls the whole model (so FSDP2's root hooks unshard embeddings/norm/lm_head) with
    logits_to_keep=1, and captures the final norm's output with a forward hook."""
    captured = []
    handle = _final_norm(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
            logits_to_keep=1,
            **kwargs,
        )
    finally:
        handle.remove()
    return captured[0]


def lm_head_params(model):
    """(weight [V, H], bias [V] or None) of the output embedding; unsharded right after forward_hidden under
    FSDP2 (see the module docstring). For tied embeddings this is the input embedding parameter."""
    head = _unwrap_peft(model).get_output_embeddings()
    if hasattr(head, "base_layer"):  # a PEFT tuner wrapped the head: its .weight would skip the adapter
        raise NotImplementedError("adapters on the LM head are not supported by the fused logprob path")
    if isinstance(head.weight, DTensor):
        raise RuntimeError(
            "the LM-head weight is still sharded: call forward_hidden(model, ...) first, and don't "
            "pass reshard_after_forward=True to the root's fully_shard (see common/logprob.py)"
        )
    return head.weight, getattr(head, "bias", None)


def sequence_logprobs(
    model,
    input_ids,
    labels,
    *,
    position_ids=None,
    attention_mask=None,
    impl="fused",
    temperature=1.0,
    return_entropy=False,
    **model_kwargs,
):
    """Per-token log p(labels[:, t+1] | tokens <= t) as [B, T] float32 (and entropy [B, T] if asked).

    labels are aligned with input_ids as in HF (-100 = ignore); the shift happens here, so
    out[:, t] scores labels[:, t+1], out[:, -1] is 0 and ignored targets give 0. Sum it and divide by
    (labels[:, 1:] != -100).sum() for the mean token NLL. impl="naive" builds full logits via the model's
    lm_head for comparison. model_kwargs (e.g. a VLM's pixel_values) go to the model's forward."""
    model_kwargs = {"position_ids": position_ids, "attention_mask": attention_mask, **model_kwargs}
    next_labels = torch.full_like(labels, -100)  # [B, T]
    next_labels[:, :-1] = labels[:, 1:]
    if impl == "fused":
        hidden = forward_hidden(model, input_ids, **model_kwargs)  # [B, T, H]
        weight, bias = lm_head_params(model)
        valid = next_labels != -100  # [B, T]: the LM head runs only where a token is scored (not on prompts, pads)
        if not valid.any():
            valid = torch.ones_like(valid)
        out = fused_linear_logprobs(
            hidden[valid], weight, next_labels[valid], bias=bias, temperature=temperature, return_entropy=return_entropy
        )

        def scatter(x):  # [n_valid] -> [B, T], 0 at unscored positions
            full = x.new_zeros(valid.shape)
            full[valid] = x
            return full

        return tuple(scatter(x) for x in out) if return_entropy else scatter(out)
    if impl == "naive":
        logits = model(input_ids=input_ids, use_cache=False, **model_kwargs).logits  # [B, T, V]
        return _logprobs_from_logits(logits, next_labels, temperature, return_entropy, -100)
    raise ValueError(f"impl must be 'fused' or 'naive', got {impl!r}")
