"""Vision encoders for composed VLMs, on their own: a random-init preset or a pretrained folder in, (encoder, image
mean, image std) out (`load_encoder`, build_vlm's encoder step and pretrain_siglip.py's starting point), and the folder
format that pretrain_siglip.py exports and load_encoder reads back (`save_encoder`): Hugging Face save_pretrained plus
a preprocessor_config.json carrying the image size, mean and std.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

# Tiny random-init encoders for offline runs: 8x8-pixel patches; the default 64x64 image gives an 8x8 patch grid.
_TINY = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, patch_size=8)
ENCODER_PRESETS = {
    "siglip-tiny": ("siglip_vision_model", dict(_TINY, intermediate_size=768)),
    "clip-tiny": ("clip_vision_model", dict(_TINY, intermediate_size=768)),
    "dinov2-tiny": ("dinov2", dict(_TINY, mlp_ratio=4)),
}
MEAN_STD = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # normalisation each family was trained with
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def load_encoder(encoder: str = "siglip-tiny", image_size: int = 64, meta: bool = False):
    """(vision model, image mean, image std) of an encoder: a preset in ENCODER_PRESETS (random init at `image_size`
    pixels: seed the RNG first), or a local folder saved with save_pretrained (pretrained, its own image size): a
    SigLIP or CLIP vision model, a whole SigLIP or CLIP model (its vision tower is taken), or DINOv2. Mean and std come
    from the folder's preprocessor_config.json when it has one (save_encoder writes it), else the family's. meta=True
    builds it on the meta device without reading the weights (FSDP2's sharded loading)."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel, Dinov2Model, SiglipVisionModel

    if encoder in ENCODER_PRESETS:
        model_type, sizes = ENCODER_PRESETS[encoder]
        with torch.device("meta") if meta else contextlib.nullcontext():
            vision = AutoModel.from_config(AutoConfig.for_model(model_type, image_size=image_size, **sizes))
        return vision, *MEAN_STD[model_type.split("_")[0]]
    if not Path(encoder, "config.json").exists():
        raise ValueError(
            f"encoder must be one of {', '.join(ENCODER_PRESETS)} or a local encoder folder, got {encoder!r}"
        )
    family = AutoConfig.from_pretrained(encoder).model_type.split("_")[0]
    classes = {"siglip": SiglipVisionModel, "clip": CLIPVisionModel, "dinov2": Dinov2Model}
    if family not in classes:
        raise ValueError(f"encoder {encoder}: model type {family!r} is not one of {', '.join(classes)}")
    if meta:  # the vision config, also out of a whole SigLIP / CLIP model's config
        with torch.device("meta"):
            vision = classes[family](classes[family].config_class.from_pretrained(encoder))
    else:
        vision = classes[family].from_pretrained(encoder, dtype=torch.float32)
    pre = Path(encoder, "preprocessor_config.json")
    pre = json.loads(pre.read_text()) if pre.exists() else {}
    return vision, pre.get("image_mean", MEAN_STD[family][0]), pre.get("image_std", MEAN_STD[family][1])


def save_encoder(vision, image_size: int, mean, std, folder) -> Path:
    """A folder load_encoder (and transformers' AutoModel / AutoImageProcessor) loads: the encoder's save_pretrained and
    a preprocessor_config.json (resize to image_size x image_size, rescale, normalise with mean/std: the defaults of
    SiglipImageProcessor, and what common/vision.VLMProcessor does to a square image), written to folder.tmp and
    renamed (common/run.replace_dir): never half-written."""
    from common.run import replace_dir

    tmp = Path(str(folder) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vision.save_pretrained(tmp)
    config = {"image_processor_type": "SiglipImageProcessor", "size": {"height": image_size, "width": image_size},
              "image_mean": list(mean), "image_std": list(std)}  # fmt: skip
    (tmp / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    return replace_dir(tmp, folder)
