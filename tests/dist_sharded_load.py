"""Sharded loading check, launched by tests/test_fsdp.py::test_sharded_loading_gives_the_same_weights.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_sharded_load.py TEXT_LM VLM OUT.json

For each kind of model the scripts load (a causal LM, the same with LoRA adapters, a critic: sequence-classification
with a zeroed new head, with LoRA too, a composed VLM and its critic), every rank loads it the plain way (full
weights read on every rank), then the sharded way: rank 0 reads the weights, rank 1 builds the model on the meta
device, both shard it with fully_shard and common.run.fill_shards fills the shards from rank 0's state dict. The
bf16 reference is built on the meta device on both ranks and copies the float32 policy's shards, as grpo.py
and ppo.py fill theirs. The
gathered parameters and the buffers must equal the plain load's bit for bit. Rank 0 writes a JSON report.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.models import fsdp_blocks, load_model  # noqa: E402
from common.run import copy_shards, fill_shards, fsdp_options, full_weights, setup  # noqa: E402
from common.value import load_value_model  # noqa: E402


def loaders(text_lm, vlm):
    return {
        "causal_lm": lambda meta: load_model(text_lm, meta=meta),
        "causal_lm_lora": lambda meta: load_model(text_lm, lora_r=4, meta=meta),
        "critic": lambda meta: load_value_model(text_lm, device="cpu", meta=meta)[0],
        "critic_lora": lambda meta: load_value_model(text_lm, device="cpu", lora_r=4, meta=meta)[0],
        "reference_compute_dtype": lambda meta: load_model(text_lm, dtype=torch.bfloat16, meta=meta),
        "vlm": lambda meta: load_model(vlm, meta=meta),
        "vlm_critic": lambda meta: load_value_model(vlm, device="cpu", meta=meta)[0],
    }


def main():
    text_lm, vlm, out = sys.argv[1:4]
    run = setup(0, "float32")
    report = {}
    for name, load in loaders(text_lm, vlm).items():
        torch.manual_seed(0)  # LoRA's A matrices are random: the same draw in both loads
        plain = load(False)
        want = {k: v.detach().clone() for k, v in plain.state_dict().items()}
        want_buffers = {k: b.clone() for k, b in plain.named_buffers()}
        del plain
        torch.manual_seed(0)
        from_policy = name == "reference_compute_dtype"  # as grpo.py/ppo.py: on meta everywhere, the policy's shards
        model = load(from_policy or not run.main)
        on_meta = any(p.is_meta for p in model.parameters())
        source = load_model(text_lm, meta=not run.main) if from_policy else model
        full, fsdp = full_weights(source, run), fsdp_options(run)  # before sharding: the full tensors
        for m in [source, model] if from_policy else [model]:
            for block in fsdp_blocks(m):
                fully_shard(block, **fsdp)
            fully_shard(m, **fsdp)
        fill_shards(source, full, run)
        if from_policy:
            copy_shards(model, source)
        got = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in model.state_dict().items()}
        mismatched = [k for k in want if k not in got or not torch.equal(want[k], got[k].to(want[k].dtype))]
        mismatched += [k for k, b in model.named_buffers() if not torch.equal(want_buffers[k], b)]
        dtypes = sorted({str(v.dtype) for v in got.values()})
        rows = [None] * run.world_size
        dist.all_gather_object(rows, {"built_on_meta": on_meta, "mismatched": mismatched, "n_tensors": len(got),
                                      "dtypes": dtypes})  # fmt: skip
        report[name] = rows
    if run.main:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
