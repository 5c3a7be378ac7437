"""Vision-language models: a vision encoder + projector + causal LM composed into one model, or a native HF VLM.

    pixels [N, 3, S, S] --encoder--> patches [N, g*g, Dv] --avg-pool p--> [N, (g/p)^2, Dv]
      --pixel-shuffle f--> [N, (g/pf)^2, f*f*Dv] --MLP--> [N, tokens_per_image, H_lm]
    then written into the LM's input embeddings where input_ids == image_token_id, and the LM runs on inputs_embeds.

The MLP projector is LLaVA-1.5's (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"); pixel shuffle
(space-to-depth, as in Idefics3 / SmolVLM, Laurençon et al. 2024) concatenates each f x f block of neighbouring patches
into one token: f^2 fewer image tokens with no feature thrown away, where avg-pooling averages them.

Its processors (chat with image parts -> model inputs) are in common/vlm_processor.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from common.run import replace_dir
from common.vlm_processor import NativeVLMProcessor, VLMProcessor

CONFIG_FILE = "vlm_config.json"  # marks a composed-VLM folder (weights in model.safetensors, tokenizer beside)


def pixel_shuffle(x, factor):
    """[N, g*g, D] patch grid (row-major) -> [N, (g/f)^2, f*f*D]: token (i, j) is the concatenation of patches
    (i*f+dy, j*f+dx) for dy, dx in 0..f-1 (dy outer)."""
    n, p, d = x.shape
    g = math.isqrt(p)
    if g * g != p or g % factor:
        raise ValueError(f"pixel shuffle needs a square patch grid divisible by {factor}, got {p} patches")
    x = x.view(n, g // factor, factor, g // factor, factor, d).permute(0, 1, 3, 2, 4, 5)  # [N, gi, gj, dy, dx, D]
    return x.reshape(n, (g // factor) ** 2, factor * factor * d)


class Projector(torch.nn.Module):
    """Patch features [N, g*g, Dv] -> image tokens [N, (g / (pool * pixel_shuffle))^2, H_lm]."""

    def __init__(self, vision_dim, lm_dim, kind="mlp", pixel_shuffle=1, pool=1):
        super().__init__()
        if kind not in ("mlp", "linear"):
            raise ValueError(f"projector must be 'mlp' or 'linear', got {kind!r}")
        self.settings = dict(vision_dim=vision_dim, lm_dim=lm_dim, kind=kind, pixel_shuffle=pixel_shuffle, pool=pool)
        in_dim = vision_dim * pixel_shuffle**2
        layers = [torch.nn.Linear(in_dim, lm_dim)] + (
            [torch.nn.GELU(), torch.nn.Linear(lm_dim, lm_dim)] if kind == "mlp" else []
        )
        self.mlp = torch.nn.Sequential(*layers)

    def forward(self, patches):
        pool, shuffle = self.settings["pool"], self.settings["pixel_shuffle"]
        if pool > 1:
            n, p, d = patches.shape
            g = math.isqrt(p)
            grid = F.avg_pool2d(patches.transpose(1, 2).reshape(n, d, g, g), pool)  # [N, Dv, g/p, g/p]
            patches = grid.flatten(2).transpose(1, 2)  # [N, (g/p)^2, Dv]
        if shuffle > 1:
            patches = pixel_shuffle(patches, shuffle)
        return self.mlp(patches)


class ComposedVLM(torch.nn.Module):
    """vision_encoder + projector + language_model. get_decoder/get_output_embeddings pass through to the LM, so
    common.logprob.forward_hidden / sequence_logprobs hook its final norm and LM head as for a plain LM."""

    def __init__(self, vision_encoder, projector, language_model, image_token_id, tokens_per_image):
        super().__init__()
        self.vision_encoder, self.projector, self.language_model = vision_encoder, projector, language_model
        self.image_token_id, self.tokens_per_image = image_token_id, tokens_per_image
        self.grid = vision_encoder.config.image_size // vision_encoder.config.patch_size

    @property
    def config(self):
        return self.language_model.config

    def get_decoder(self):
        return self.language_model.get_decoder()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def image_features(self, pixel_values):
        """[N, 3, S, S] -> [N, tokens_per_image, H_lm]."""
        dtype = next(self.vision_encoder.parameters()).dtype
        hidden = self.vision_encoder(pixel_values=pixel_values.to(dtype)).last_hidden_state  # [N, n_prefix + g*g, Dv]
        return self.projector(hidden[:, hidden.shape[1] - self.grid**2 :])  # drop CLS / register tokens (CLIP, DINOv2)

    def embed(self, input_ids, pixel_values=None):
        """LM token embeddings [B, T, H] with image features written, in order, at the image-token positions."""
        embeds = self.language_model.get_input_embeddings()(input_ids)  # [B, T, H]
        is_image = input_ids == self.image_token_id  # [B, T]
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if int(is_image.sum()) != n_images * self.tokens_per_image:
            raise ValueError(
                f"input_ids hold {int(is_image.sum())} image tokens but {n_images} images x "
                f"{self.tokens_per_image} tokens_per_image = {n_images * self.tokens_per_image} were expected"
            )
        if n_images == 0:
            return embeds
        features = self.image_features(pixel_values).to(embeds.dtype)  # [N, tokens_per_image, H]
        return embeds.masked_scatter(is_image[..., None], features)  # row-major: image k fills the k-th run

    def forward(
        self,
        input_ids,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        labels=None,
        use_cache=False,
        **kwargs,
    ):
        return self.language_model(
            inputs_embeds=self.embed(input_ids, pixel_values),
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, **gen_kwargs):
        """NEW tokens only, [B, n_new] (HF generate from inputs_embeds returns no prompt). Left-pad batched prompts."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.language_model.generate(
            inputs_embeds=self.embed(input_ids, pixel_values), attention_mask=attention_mask, **gen_kwargs
        )


def vlm_generate(model, input_ids, attention_mask=None, **kwargs):
    """New tokens [B, n_new] from a ComposedVLM or a native HF VLM; kwargs = processor.image_inputs(...) + gen kwargs."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if isinstance(model, ComposedVLM):
        return model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[:, input_ids.shape[1] :]


def save_vlm(model, processor, folder, extra_tensors=None):
    """One loadable folder (also for native VLMs), written to folder.tmp and renamed (common.models.replace_dir): never
    half-written. extra_tensors {file name: ({name: tensor}, metadata)} adds safetensors files (a value head) before the
    rename."""
    from safetensors.torch import save_file, save_model

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if isinstance(model, ComposedVLM):
        if hasattr(model.language_model, "merge_and_unload"):
            raise ValueError(
                "merge LoRA adapters first: model.language_model = model.language_model.merge_and_unload()"
            )
        save_model(model, str(tmp / "model.safetensors"))  # tied LM embeddings are stored once
        config = dict(
            encoder=model.vision_encoder.config.to_dict(),
            projector=model.projector.settings,
            language_model=model.language_model.config.to_dict(),
            image_token=processor.image_token,
            tokens_per_image=processor.tokens_per_image,
            image=dict(size=processor.image_size, mean=processor.image_mean, std=processor.image_std),
        )
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        processor.tokenizer.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp)
        for part in (
            (processor.hf_processor,) if processor.hf_processor else (processor.tokenizer, processor.image_processor)
        ):
            part.save_pretrained(tmp)
    for name, (tensors, metadata) in (extra_tensors or {}).items():
        save_file(tensors, str(tmp / name), metadata=metadata)
    return replace_dir(tmp, folder)


def is_vlm(path) -> bool:
    """True for a composed-VLM folder and for a local HF folder whose model type is an image-text-to-text model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    path = Path(str(path)).expanduser()
    if (path / CONFIG_FILE).exists():
        return True
    config = path / "config.json"
    return (
        config.exists()
        and json.loads(config.read_text()).get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    )


def load_vlm_processor(path):
    """The processor of a save_vlm folder or a native HF VLM folder, without loading the weights."""
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

    path = Path(str(path)).expanduser()
    if not is_vlm(path):
        raise ValueError(f"{path}: not a VLM folder (no {CONFIG_FILE}, and config.json is no image-text-to-text model)")
    if not (path / CONFIG_FILE).exists():
        try:
            hf = AutoProcessor.from_pretrained(path)
            return NativeVLMProcessor(hf.tokenizer, hf.image_processor, hf.image_token, hf)
        except (
            ImportError,
            ValueError,
            AttributeError,
            TypeError,
        ):  # e.g. Qwen2-VL's video processor needs torchvision
            tokenizer = AutoTokenizer.from_pretrained(path)
            image_token = tokenizer.convert_ids_to_tokens(AutoConfig.from_pretrained(path).image_token_id)
            return NativeVLMProcessor(tokenizer, AutoImageProcessor.from_pretrained(path), image_token)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cfg = json.loads((path / CONFIG_FILE).read_text())
    image = cfg["image"]
    return VLMProcessor(tokenizer, image["size"], image["mean"], image["std"], cfg["tokens_per_image"],
                        cfg["image_token"])  # fmt: skip


def load_vlm(path, *, dtype=torch.float32, device="cpu", meta=False):
    """(model, processor) from a save_vlm folder or a native HF VLM folder; processors share one call signature.
    meta=True builds the model on the meta device without reading its weights (FSDP2's sharded loading: rank 0 reads
    them, common/run.fill_shards hands each rank its shards)."""
    from safetensors.torch import load_model as load_safetensors
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    processor = load_vlm_processor(path)
    path = Path(str(path)).expanduser()
    if not (path / CONFIG_FILE).exists():
        if meta:
            with torch.device("meta"):
                return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path), dtype=dtype), processor
        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device), processor
    cfg = json.loads((path / CONFIG_FILE).read_text())
    with torch.device("meta") if meta else contextlib.nullcontext():
        vision = AutoModel.from_config(CONFIG_MAPPING[cfg["encoder"]["model_type"]].from_dict(cfg["encoder"]))
        lm_config = CONFIG_MAPPING[cfg["language_model"]["model_type"]].from_dict(cfg["language_model"])
        lm = AutoModelForCausalLM.from_config(lm_config, attn_implementation="sdpa")
        lm.config.use_cache = False
        model = ComposedVLM(
            vision, Projector(**cfg["projector"]), lm, processor.image_token_id, cfg["tokens_per_image"]
        )
    if meta:
        return model.to(dtype=dtype), processor
    load_safetensors(model, str(path / "model.safetensors"))
    return model.to(device=device, dtype=dtype), processor


def param_groups(model, lr, lr_projector=None, lr_vision=None, lr_lm=None, weight_decay=0.0):
    """AdamW param groups for projector / vision / LM (ComposedVLM or native: named merger, multi_modal_projector,
    connector / visual, vision_tower, vision_model). A part whose lr is 0 is frozen (requires_grad False, left out);
    parameters already frozen stay so.
    Weight decay applies to matrices only, not to biases and norm gains."""
    lrs = {
        "projector": lr if lr_projector is None else lr_projector,
        "vision": lr if lr_vision is None else lr_vision,
        "lm": lr if lr_lm is None else lr_lm,
    }
    groups = {}
    for name, p in model.named_parameters():
        part = (
            "projector"
            if re.search(r"projector|merger|connector", name)
            else "vision"
            if re.search(r"vision|visual", name)
            else "lm"
        )
        if lrs[part] == 0:
            p.requires_grad_(False)
        if p.requires_grad:  # parameters frozen before (LoRA's base weights) stay frozen
            decay = weight_decay if p.dim() >= 2 else 0.0
            groups.setdefault((part, decay), []).append(p)
    return [dict(params=ps, lr=lrs[part], weight_decay=decay, name=part) for (part, decay), ps in groups.items()]
