"""Run scaffolding that every script needs the same way, written once: process setup, the seeding rule, learning-rate
schedules, the optimizer step, metrics across ranks, logging and teardown (checkpoints, resume, preemption and the
final export: common/checkpoint.py).

The algorithm and its loop stay in each script; these are the steps around them. A script reads:

    run = setup(args.seed, args.dtype)                          # ranks, device, compute dtype, SIGTERM handler
    ... load, shard (the script's own fully_shard block), optimizer ...
    step = resume(run, args.output_dir, model, optimizer, scheduler) if args.resume else 0
    logger = RunLogger(args.output_dir, asdict(args), run, track=args.track, resume_step=...)
    while step < total_steps:
        ... the algorithm ...
        grad_norm = optimizer_step(optimizer, scheduler, params, args.max_grad_norm)
        logger.log(all_reduce_sums(...), step)
        if save_if_due(run, args, step, total_steps, model, optimizer, scheduler):
            return finish(run, logger, {"step": step, "preempted": True})
    return finish(run, logger, results)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class Run:
    """Facts about this process, fixed at setup: its rank among world_size processes, its device and compute dtype,
    and the preemption signals received so far (filled by the SIGTERM/SIGUSR1 handler)."""

    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    signals: list = field(default_factory=list)
    sharded: bool = False  # launched by torchrun: the models are FSDP2-sharded (with one process too)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs):
        """print on rank 0 only: under torchrun every line would otherwise appear world_size times."""
        if self.rank == 0:
            print(*args, **kwargs)

    def autocast(self, model):
        """bf16 autocast for `model`, unless it is FSDP2-sharded (its mixed-precision policy casts instead) or the
        compute dtype is float32."""
        from torch.distributed.fsdp import FSDPModule

        if self.dtype == torch.float32 or isinstance(model, FSDPModule):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def bf16_supported(device: str | torch.device) -> bool:
    """CUDA with bf16, or a CPU with native bf16 instructions (AVX512-BF16 / AMX), where bf16 autocast is ~3x faster."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """`auto` -> bfloat16 where the hardware has it, else float32."""
    if name == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype '{name}'; use auto, float32 or bfloat16")
    return dtypes[name]


def setup(seed: int, dtype: str, cpu_offload: bool = False) -> Run:
    """Joins the torchrun process group (gloo on CPU, NCCL on GPU; under torchrun the models are FSDP2-sharded, with
    one process too), picks the device and compute dtype, seeds Python and torch, and installs the preemption handler:
    SIGTERM/SIGUSR1 (what clusters send before they kill a job) only set a flag, and the loop saves a checkpoint at
    the end of the step and exits (save_if_due)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    sharded = world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if cpu_offload and not sharded:
        raise SystemExit("error: --cpu-offload is FSDP2's: launch with torchrun (--nproc_per_node=1 for one device)")
    if sharded and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    random.seed(seed)
    torch.manual_seed(seed)
    run = Run(rank, world_size, device, pick_dtype(dtype, device), sharded=sharded)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: run.signals.append(signum))
    return run


def derive_seed(seed: int, *purpose) -> int:
    """The one seeding rule. Each random draw of a run (which prompts a step takes, the tokens a rank samples, an
    epoch's order) gets its own generator, seeded from the run's --seed and what the draw is for, e.g.
    (step, "sampling", rank), never from the state earlier steps left behind: a resumed run replays step N exactly
    without replaying steps 0..N-1, and one stream's extra draws (a resampling round) never shift another's."""
    return int.from_bytes(hashlib.sha256(repr((seed, *purpose)).encode()).digest()[:8], "little") >> 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def finish(run: Run, logger, results: dict, progress=None, engine=None) -> dict:
    """Closes the progress bar and the logger, then leaves the process group (after a barrier: gloo aborts a rank
    whose peer tears down while it is still in a collective). A vLLM engine is shut down last: its shutdown destroys
    the process group itself."""
    if progress is not None:
        progress.close()
    barrier()
    logger.close()
    if engine is not None:
        from common.vllm_engine import stop_engine

        barrier()
        stop_engine(engine)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return results


def to_device(inputs: dict, device) -> dict:
    """The tensors of a batch dict moved to device (other values as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


# --------------------------------------------------------------------------------------------------- FSDP2
def fsdp_options(run: Run, cpu_offload: bool = False) -> dict:
    """fully_shard's keyword arguments, the same in every script: a 1-D mesh over the processes, mixed precision
    (parameters gathered in the compute dtype, gradients reduced in float32) and, with cpu_offload, parameters,
    gradients and optimizer state kept on the CPU between uses (FSDP2's CPUOffloadPolicy)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    offload = CPUOffloadPolicy(pin_memory=run.device.type == "cuda") if cpu_offload else OffloadPolicy()
    return dict(mesh=init_device_mesh(run.device.type, (run.world_size,)), offload_policy=offload,
                mp_policy=MixedPrecisionPolicy(param_dtype=run.dtype, reduce_dtype=torch.float32))  # fmt: skip


def full_weights(model, run: Run):
    """Rank 0's full state dict and buffers, taken before sharding (they keep the full tensors alive until fill_shards
    has put them in every rank's shards); None elsewhere: the other ranks built their model on the meta device."""
    return (model.state_dict(), dict(model.named_buffers())) if run.main else None


def fill_shards(model, full, run: Run):
    """After fully_shard: the ranks whose model was built on the meta device allocate their shards, and every rank's
    shards are filled from rank 0's full weights (set_model_state_dict with broadcast_from_rank0), so no rank but
    rank 0 ever holds the full model; buffers too (a rotary embedding's inverse frequencies are not in the state
    dict), copied from `full` on rank 0 (its model may have been built on the meta device there too), then broadcast."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state, buffers = full if run.main else ({}, {})
    if any((p.to_local() if hasattr(p, "to_local") else p).is_meta for p in model.parameters()):
        model.to_empty(device=run.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, dict(state), options=options)  # a copy: it puts the shards it made into the dict
    for name, buffer in model.named_buffers():
        if run.main and buffer is not buffers[name]:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)


def copy_shards(target, source):
    """A sharded model of the same architecture as `source` (built on the meta device, then fully_shard) becomes a copy
    of it: each rank copies its own shards and buffers, cast to the target's dtype; no full copy, no communication.
    The KL reference starts as the policy this way."""
    if any(p.is_meta for p in target.parameters()):
        target.to_empty(device=next(source.parameters()).device)
    local = {n: (t.to_local() if hasattr(t, "to_local") else t) for n, t in source.state_dict(keep_vars=True).items()}
    local |= dict(source.named_buffers())
    with torch.no_grad():
        for name, t in [*target.state_dict(keep_vars=True).items(), *target.named_buffers()]:
            (t.to_local() if hasattr(t, "to_local") else t).copy_(local[name])


# ------------------------------------------------------------------------------------------ metrics across ranks
def reshard(model):
    """FSDP2 keeps the root's parameters (embeddings, final norm, LM head) gathered after a forward without a
    backward (an eval, a generate, a reference pass): a state dict or an optimizer built then would see the gathered
    tensors instead of the shards. Every no-grad pass over a sharded model ends here."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


def all_reduce_sums(values: dict, run: Run, op: str = "sum") -> dict:
    """{name: sum (or op="max": maximum) over ranks} of per-rank floats (float64, one collective)."""
    if not dist.is_initialized():
        return {k: float(v) for k, v in values.items()}
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return dict(zip(values, t.tolist()))


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks, rank order, of equally shaped tensors."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


# ----------------------------------------------------------------------------------- schedule, optimizer step
def lr_lambda(step: int, warmup: int, total: int, schedule: str = "constant", min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at `step`: linear warmup (step+1)/warmup, then cosine or linear decay to min_ratio
    at `total`, constant, or inverse-sqrt sqrt(warmup / (step+1)) (Vaswani et al. 2017; continuous with the warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "inverse-sqrt":
        return math.sqrt(max(1, warmup) / (step + 1))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def clip_grad_norm(params, max_norm: float) -> float:
    """Clips to max_norm (0: no clipping) and returns the total norm before clipping; under FSDP2 the norm of the
    sharded gradients is a DTensor, whose full value is the norm of the whole gradient."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def optimizer_step(optimizer, scheduler, params=(), max_grad_norm: float = 0.0) -> float | None:
    """Clips `params` (when given), steps, zeroes the gradients and advances the schedule; the norm, or None."""
    norm = clip_grad_norm(params, max_grad_norm) if params else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return norm


# ---------------------------------------------------------------------------------------------------- folders
def replace_dir(tmp, final) -> Path:
    """Renames the finished folder tmp to final. An older final is moved aside to final.old first and removed last, so
    a crash at any moment leaves a whole folder under final or final.old, never a half-written one under final."""
    tmp, final = Path(tmp), Path(final)
    previous = final.with_name(final.name + ".old")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.rename(final, previous)
    os.rename(tmp, final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------------- logging
def wandb_mode() -> str:
    """online when an account is configured, offline (runs sync later with `wandb sync`) otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


class RunLogger:
    """Appends one JSON line per `log()` to `<output_dir>/metrics.jsonl` and mirrors it to wandb with `track=True`
    (project and run name from wandb's own WANDB_PROJECT and WANDB_NAME; project "cleanpost" by default).

    Only rank 0 writes. On resume, lines past `resume_step` are dropped first so the file holds one clean curve."""

    def __init__(self, output_dir, config: dict, run: Run | None = None, *, track=False, resume_step=None):
        self.enabled, self.wandb = run is None or run.main, None
        if not self.enabled:
            return
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.start = time.time()
        if track:
            import wandb

            project, name = os.environ.get("WANDB_PROJECT", "cleanpost"), os.environ.get("WANDB_NAME")
            self.wandb = wandb.init(project=project, name=name, config=config, dir=str(output_dir), mode=wandb_mode(),
                                    resume="allow")  # fmt: skip

    def log(self, metrics: dict, step: int):
        if not self.enabled:
            return
        values = {k: (float(v) if hasattr(v, "item") else v) for k, v in metrics.items()}
        row = {"step": step, **values, "time": round(time.time() - self.start, 3)}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
