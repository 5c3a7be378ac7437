"""Colocated vLLM under torchrun, launched by tests/test_vllm.py (one run serves two tests).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_vllm.py MODEL_DIR OUT_DIR

Each rank loads the same untied tiny Llama (MODEL_DIR), perturbs it identically (so its weights differ from the
folder the engines load), keeps an unsharded copy, and shards the model with FSDP2 (fully_shard per decoder layer,
then the root) on gloo. Then:
  1. fsdp_named_tensors streams the sharded model: names and values must equal the unsharded copy's parameters;
  2. every rank starts its own engine (start_engine with world_size=2: external_launcher), syncs the streamed
     weights, and generates uneven work (rank r: r + 1 calls); vLLM's log-probs must match the unsharded copy's.
Each rank writes OUT_DIR/rank{r}.json with what it measured; the test asserts on it.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.vllm_engine import fsdp_named_tensors, generate, start_engine, stop_engine, sync_weights  # noqa: E402

TEMPERATURE = 0.8


def hf_token_logps(model, prompt, completion):
    """log_softmax(logits / T) of each completion token under the HF model: [len(completion)] floats."""
    ids = torch.tensor([prompt + completion])  # [1, L]
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # [len(completion), V]
    return torch.log_softmax(logits / TEMPERATURE, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def main():
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1)  # the same perturbation on every rank
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference.load_state_dict(model.state_dict())
    expected = dict(reference.named_parameters())
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    result = {"sharded": sum(isinstance(p, DTensor) for p in model.parameters()), "n_params": len(expected)}

    # 1. streaming: compare each tensor as it arrives (no list of them is ever built)
    names, max_diff, shapes_ok = [], 0.0, True
    for name, tensor in fsdp_named_tensors(model):
        names.append(name)
        shapes_ok &= not isinstance(tensor, DTensor) and tensor.shape == expected[name].shape
        max_diff = max(max_diff, (tensor - expected[name]).abs().max().item())
    result.update(names=names, expected_names=list(expected), max_abs_diff=max_diff, shapes_ok=bool(shapes_ok))

    # 2. one engine per rank, fed the sharded model's weights, uneven work per rank
    threads = torch.get_num_threads()
    llm = start_engine(
        model_dir, max_model_len=256, dtype="float32", seed=0, world_size=world, rank=rank, cpu_kv_cache_gib=0.25
    )
    result["threads_kept"] = torch.get_num_threads() == threads
    sync_weights(llm, fsdp_named_tensors(model))
    prompts = [[1, 504, 3403, 314, 253 + rank], [1, 2000 + rank, 33, 44]]
    diffs, completions = [], []
    for call in range(rank + 1):
        outs, truncated, logps = generate(
            llm, prompts, temperature=TEMPERATURE, max_tokens=12 + 8 * call, stop_token_ids=[2], n=2
        )
        completions += outs
        for i, (c, lp) in enumerate(zip(outs, logps)):
            diffs += (torch.tensor(lp) - hf_token_logps(reference, prompts[i // 2], c)).abs().tolist()
    gathered = [None] * world
    dist.all_gather_object(gathered, completions[0])
    result.update(
        n_completions=len(completions),
        mean_abs_logp_diff=sum(diffs) / len(diffs),
        ranks_differ=gathered[0] != gathered[1],
        lengths=[len(c) for c in completions],
    )
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    stop_engine(llm)  # also destroys the default process group


if __name__ == "__main__":
    main()
