"""FSDP2 check for sequence_logprobs, launched by tests/test_logprob.py::test_fsdp2_two_ranks.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_logprob.py --out result.json

Each rank builds the same tiny tied-embedding Llama, shards it with fully_shard (each decoder layer, then the
root) on gloo, and runs sequence_logprobs + backward on its half of a fixed batch. Every rank also runs an
unsharded copy on the whole batch; the FSDP2 gradient (averaged over ranks by the reduce-scatter) must equal
the single-process gradient of the mean of the per-rank losses. Rank 0 writes a JSON report and the script
exits non-zero on a mismatch.
"""

import argparse
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.logprob import forward_hidden, lm_head_params, sequence_logprobs  # noqa: E402
from tests.test_logprob import tiny_batch, tiny_llama  # noqa: E402


def token_nll(token_logps, labels):
    """The SFT loss: summed NLL over scored tokens / their count."""
    return -token_logps.sum() / (labels[:, 1:] != -100).sum()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    model = tiny_llama()
    reference = copy.deepcopy(model)
    input_ids, labels = tiny_batch(batch=2 * world, seq=16)  # [2W, T], identical on every rank
    mine = slice(2 * rank, 2 * rank + 2)

    # Single process: the mean over ranks of each rank's loss, on the unsharded copy.
    ref_logps = sequence_logprobs(reference, input_ids, labels)  # [2W, T]
    ref_loss = sum(token_nll(ref_logps[2 * r : 2 * r + 2], labels[2 * r : 2 * r + 2]) for r in range(world)) / world
    ref_loss.backward()
    ref_grad = reference.get_output_embeddings().weight.grad  # [V, H] (tied with the embedding)

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    # The property the fused path relies on: after the root forward, the LM head is a full plain tensor.
    with torch.no_grad():
        forward_hidden(model, input_ids[mine])
        weight, _ = lm_head_params(model)
    head_is_full = (not isinstance(weight, DTensor)) and tuple(weight.shape) == tuple(ref_grad.shape)
    model.zero_grad(set_to_none=True)

    logps = sequence_logprobs(model, input_ids[mine], labels[mine], position_ids=None)  # [2, T]
    token_nll(logps, labels[mine]).backward()
    grad = model.get_output_embeddings().weight.grad
    full_grad = grad.full_tensor() if isinstance(grad, DTensor) else grad  # [V, H]

    logp_err = ((logps.detach() - ref_logps[mine].detach()).abs().max() / ref_logps.abs().max()).item()
    grad_err = ((full_grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
    stats = torch.tensor([logp_err, grad_err, float(not head_is_full)], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    logp_err, grad_err, head_not_full = stats.tolist()
    ok = logp_err <= 1e-5 and grad_err <= 1e-5 and not head_not_full
    if rank == 0:
        report = dict(
            ok=ok,
            world_size=world,
            logprob_max_rel_err=logp_err,
            weight_grad_rel_err=grad_err,
            lm_head_weight_is_full_tensor=not head_not_full,
            weight_grad_is_dtensor=isinstance(grad, DTensor),
        )
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(json.dumps(report))
    dist.barrier()  # gloo aborts a rank whose peer tears down while it is still in a collective
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
