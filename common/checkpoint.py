"""What a run writes to disk and reads back: resumable checkpoints (torch.distributed.checkpoint: each rank writes its
own shards, with or without FSDP2, resharded on load; plus per-rank RNG states and the scheduler), the preemption save,
and the final export of the trained model as a folder any script (or transformers) loads.

Every folder is written under a temporary name and renamed once complete (common/run.replace_dir), so a crash or a
preemption mid-write never leaves a folder that resume or a later script would trust.
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from common.models import model_config, resolve_model_path
from common.run import Run, barrier, replace_dir, reshard
from common.vision import is_vlm, load_vlm, save_vlm
from common.vlm_processor import VLMProcessor


def checkpoint_dirs(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its step_ name once fully written)."""
    root = Path(output_dir) / "checkpoints"
    return sorted(root.glob("step_[0-9]*[0-9]"), key=lambda p: int(p.name.split("_")[1])) if root.exists() else []


def save_checkpoint(output_dir, step, model, optimizer, scheduler, rank, keep) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = Path(output_dir) / "checkpoints" / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    reshard(model)  # an eval just before may have left the root gathered
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))  # each rank writes its shards
    rng = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save({"step": step, "scheduler": scheduler.state_dict()}, tmp / "trainer_state.pt")
    barrier()
    if rank == 0:
        replace_dir(tmp, final)  # a crash before this leaves only a .tmp folder, which resume ignores
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path, model, optimizer, scheduler, rank) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
    scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return trainer_state["step"]


def resume(run: Run, output_dir, model, optimizer, scheduler) -> int:
    """The step of the newest complete checkpoint in <output_dir>/checkpoints, loaded into model, optimizer and
    scheduler (and this rank's RNG states); 0 when there is none."""
    found = checkpoint_dirs(output_dir)
    if not found:
        run.print(f"[resume] no complete checkpoint in {output_dir}/checkpoints, starting fresh")
        return 0
    step = load_checkpoint(found[-1], model, optimizer, scheduler, run.rank)
    run.print(f"[resume] from {found[-1]} at step {step}")
    return step


def save_if_due(run: Run, args, step: int, total_steps: int, model, optimizer, scheduler) -> bool:
    """Saves a checkpoint every --save-every steps, at the last step, and when a preemption signal arrived on any rank
    (all ranks agree first: the save is collective); returns True when the run must stop now (preempted)."""
    flag = torch.tensor(float(bool(run.signals)), device=run.device)
    if dist.is_initialized():
        dist.all_reduce(flag)
    preempted = bool(flag.item())
    if preempted or (args.save_every and step % args.save_every == 0) or step == total_steps:
        path = save_checkpoint(args.output_dir, step, model, optimizer, scheduler, run.rank, args.keep_checkpoints)
        if preempted:
            run.print(f"\n[signal] saved {path} at step {step}; exiting. Continue with --resume.")
    return preempted


# ------------------------------------------------------------------------------------------------ disk caches
def weights_identity(path: str) -> dict:
    """What identifies a model's weights without reading them, for cache keys: its config (a composed VLM's
    vlm_config.json too) and its weight files' names, sizes and modification times."""
    resolved = str(path) if is_vlm(path) else resolve_model_path(path)
    folder = Path(resolved)
    if not folder.is_dir():
        return {"hub_id": resolved}
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    config = b"".join((folder / n).read_bytes() for n in ("config.json", "vlm_config.json") if (folder / n).exists())
    return {"path": str(folder.resolve()), "config_sha1": hashlib.sha1(config).hexdigest(),
            "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}  # fmt: skip


def load_or_compute(path, compute, run: Run):
    """(value, hit): the torch.save file at `path` when every rank finds it, else compute() (on every rank: it may hold
    collectives, so all ranks take the same branch) written by rank 0 to a temporary name and renamed (a reader never
    sees half a file)."""
    path = Path(path)
    hit = torch.tensor(float(path.exists()))
    if dist.is_initialized():
        dist.all_reduce(hit, op=dist.ReduceOp.MIN)
    if hit.item():
        return torch.load(path), True
    value = compute()
    if run.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        torch.save(value, tmp)
        os.replace(tmp, path)
    return value, False


# ------------------------------------------------------------------------------------------------------ export
def gather_unsharded(model, fresh_model, run: Run):
    """`model` itself in a single process. Under FSDP2 (every rank must call this) the full state dict is gathered
    and loaded on rank 0 into fresh_model(), an unsharded twin built on the CPU; other ranks get None."""
    if not dist.is_initialized():
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not run.main:
        return None
    plain = fresh_model()
    plain.load_state_dict(full_sd)
    return plain


def export_model(model, processor, out, run: Run, *, base_path: str, merge: bool = True, fresh=None,
                 extra_config=None) -> Path | None:  # fmt: skip
    """The trained model as a folder that loads like any other; every rank calls it (under FSDP2 the full weights are
    gathered), rank 0 writes and gets the folder, the others None. A VLM: a save_vlm folder (under FSDP2 the weights
    are loaded into fresh(), an unsharded twin; default: base_path's VLM). A text LM: a Hugging Face causal-LM folder
    (weights, config, tokenizer) built on the meta device and given the gathered tensors by assignment (no second copy
    in memory); a LoRA model's adapter goes to <out>/adapter and, with merge, the merged model to <out>. extra_config:
    fields added to a text model's saved config."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if isinstance(processor, VLMProcessor):
        plain = gather_unsharded(model, fresh or (lambda: load_vlm(base_path)[0]), run)
        return None if plain is None else save_vlm(plain, processor, out)
    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not run.main:
        return None
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model_config(base_path), dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora = getattr(model, "peft_config", {}).get("default")
    if lora is not None:
        from peft import get_peft_model

        lora = copy.deepcopy(lora)
        lora.base_model_name_or_path = resolve_model_path(base_path)  # where the adapter's base loads from
        plain = get_peft_model(plain, lora)
        plain.load_state_dict(full_sd, assign=True)
        plain.save_pretrained(tmp / "adapter")
        plain = plain.merge_and_unload() if merge else None
    else:
        plain.load_state_dict(full_sd, assign=True)
    if plain is not None:
        plain.tie_weights()
        plain.config.use_cache = True  # for serving
        plain.config.update(extra_config or {})
        plain.save_pretrained(tmp)
    processor.tokenizer.save_pretrained(tmp)
    return replace_dir(tmp, out)
