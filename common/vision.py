"""Vision-language models: a vision encoder + projector + causal LM composed into one model, or a native HF VLM.

    pixels [N, 3, S, S] --encoder--> patches [N, g*g, Dv] --avg-pool p--> [N, (g/p)^2, Dv]
      --pixel-shuffle f--> [N, (g/pf)^2, f*f*Dv] --MLP--> [N, tokens_per_image, H_lm]
    then written into the LM's input embeddings where input_ids == image_token_id, and the LM runs on inputs_embeds.

The MLP projector is LLaVA-1.5's (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"); pixel shuffle
(space-to-depth, as in Idefics3 / SmolVLM, Laurençon et al. 2024) concatenates each f x f block of neighbouring patches
into one token: f^2 fewer image tokens with no feature thrown away, where avg-pooling averages them.

A processor (`VLMProcessor`, or `NativeVLMProcessor` around a HF AutoProcessor) turns an OpenAI-style chat with image parts
into {"input_ids", "labels" (assistant-only), "images" (one dict of tensors per image), "truncated"}; batch with
common.data.pad_collate / pack_collate and add `processor.image_inputs(examples, input_ids)` to the model kwargs.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from common.chat import IGNORE, tokenize_chat
from common.data import DataError
from common.run import replace_dir

IMAGE_TOKEN = "<image>"
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


def load_images(messages, base_dir="."):
    """PIL RGB images of a chat's image parts, in order: local paths (relative to base_dir), data: URLs or PIL images."""
    from PIL import Image

    images = []
    for m in messages:
        for part in m["content"] if isinstance(m["content"], list) else []:
            if part.get("type") not in ("image", "image_url"):
                continue
            ref = part.get("image") if part["type"] == "image" else (part.get("image_url") or {}).get("url")
            if isinstance(ref, Image.Image):
                images.append(ref.convert("RGB"))
            elif isinstance(ref, str) and ref.startswith("data:"):
                images.append(Image.open(io.BytesIO(base64.b64decode(ref.split(",", 1)[1]))).convert("RGB"))
            elif isinstance(ref, str) and not ref.startswith(("http://", "https://")):
                path = Path(base_dir, ref.removeprefix("file://")).expanduser()
                if not path.is_file():
                    raise DataError(f"image not found: {ref!r} (resolved to {path})")
                images.append(Image.open(path).convert("RGB"))
            else:
                raise DataError(
                    f"image part {part!r:.100}: expected a local path, a data: URL or a PIL image (no network)"
                )
    return images


class VLMProcessor:
    """Tokenizer + image preprocessing for a ComposedVLM. processor(messages) -> one example (see module docstring)."""

    packable = True  # position_ids may restart per packed example (common/chat.py's TextProcessor too)

    def __init__(self, tokenizer, image_size, image_mean, image_std, tokens_per_image, image_token=IMAGE_TOKEN):
        self.tokenizer, self.image_size, self.tokens_per_image, self.image_token = (
            tokenizer,
            image_size,
            tokens_per_image,
            image_token,
        )
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.placeholder = image_token  # the text standing for one image before expansion

    def preprocess(self, image):
        """PIL image -> [3, S, S] float32: padded to a square with the mean colour (keeps the aspect ratio, as
        LLaVA's expand2square), bicubic resize, normalised with the encoder's mean/std."""
        from PIL import Image

        side = max(image.size)
        if image.size[0] != image.size[1]:
            square = Image.new("RGB", (side, side), tuple(int(255 * m) for m in self.image_mean))
            square.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
            image = square
        if side != self.image_size:
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(self.image_size, self.image_size, 3)
        x = x.permute(2, 0, 1).float() / 255  # [3, S, S]
        return (x - torch.tensor(self.image_mean)[:, None, None]) / torch.tensor(self.image_std)[:, None, None]

    def encode_image(self, image):
        """(model inputs of one image, its number of image tokens)."""
        return {"pixel_values": self.preprocess(image)[None]}, self.tokens_per_image

    def __call__(self, messages, *, base_dir=".", max_len=None, overlong="truncate", add_generation_prompt=False):
        """{"input_ids", "labels" (assistant tokens, IGNORE elsewhere; all IGNORE with add_generation_prompt, which
        renders a prompt ending in the assistant header), "images", "truncated"}, or None (overlong="drop").
        Truncation never cuts an image in half: it cuts before it, and images past the cut are dropped."""
        encoded = [self.encode_image(img) for img in load_images(messages, base_dir)]
        text_messages = [
            {
                "role": m["role"],
                "content": m["content"]
                if isinstance(m["content"], str)
                else "\n".join(p["text"] if p.get("type") == "text" else self.placeholder for p in m["content"]),
            }
            for m in messages
        ]
        if add_generation_prompt:
            text = self.tokenizer.apply_chat_template(text_messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            labels = [IGNORE] * len(ids)
        else:
            example = tokenize_chat(text_messages, self.tokenizer, max_len=1 << 30)
            ids, labels = example["input_ids"], example["labels"]
        if ids.count(self.image_token_id) != len(encoded):
            raise DataError(
                f"chat has {len(encoded)} image parts but its text renders {ids.count(self.image_token_id)} "
                f"image tokens {self.image_token!r} (a literal {self.image_token!r} in the text?)"
            )
        out_ids, out_labels, starts, k = [], [], [], 0
        for tid, label in zip(ids, labels):
            n = encoded[k][1] if tid == self.image_token_id else 1
            if tid == self.image_token_id:
                starts.append(len(out_ids))
                k += 1
            out_ids += [tid] * n
            out_labels += [IGNORE if tid == self.image_token_id else label] * n
        truncated = max_len is not None and len(out_ids) > max_len
        if truncated and overlong == "drop":
            return None
        cut = max_len if truncated else len(out_ids)
        n_kept = sum(s < cut for s in starts)
        if n_kept and starts[n_kept - 1] + encoded[n_kept - 1][1] > cut:  # would cut an image: cut before it
            n_kept -= 1
            cut = starts[n_kept]
        return {
            "input_ids": out_ids[:cut],
            "labels": out_labels[:cut],
            "images": [e[0] for e in encoded[:n_kept]],
            "truncated": truncated,
        }

    def image_inputs(self, examples, input_ids=None):
        """Model kwargs for a batch of examples, images in the order their tokens appear row by row (the order
        pad_collate / pack_collate lay examples out): {"pixel_values": [n_images, 3, S, S]}, or {} without images."""
        per_image = [img for e in examples for img in e["images"]]
        return {k: torch.cat([img[k] for img in per_image]) for k in per_image[0]} if per_image else {}


class NativeVLMProcessor(VLMProcessor):
    """Same call signature as VLMProcessor for a native HF VLM: its tokenizer, image processor and image token
    (Qwen2-VL / Qwen2.5-VL tested; LLaVA-style processors with one repeated image token should work through
    hf_processor). Idefics3/SmolVLM's tiled layout is not supported."""

    packable = False  # it computes its own 3-D (M-RoPE) positions, which packed rows cannot restart

    def __init__(self, tokenizer, image_processor, image_token, hf_processor=None):
        self.tokenizer, self.image_processor, self.hf_processor = tokenizer, image_processor, hf_processor
        self.image_token, self.image_token_id = image_token, tokenizer.convert_tokens_to_ids(image_token)
        if "<fake_token_around_image>" in tokenizer.get_vocab():
            raise NotImplementedError("Idefics3/SmolVLM's tiled image layout is not supported by NativeVLMProcessor")
        qwen = "<|vision_start|>" in tokenizer.get_vocab()
        self.placeholder = f"<|vision_start|>{image_token}<|vision_end|>" if qwen else image_token

    def encode_image(self, image):
        inputs = dict(self.image_processor(images=[image], return_tensors="pt"))
        if "image_grid_thw" in inputs:  # Qwen-VL: patches merged merge_size x merge_size into one token
            return inputs, int(inputs["image_grid_thw"].prod()) // self.image_processor.merge_size**2
        if self.hf_processor is None:
            raise NotImplementedError(
                f"{type(self.image_processor).__name__}: image-token count needs the HF processor"
            )
        return inputs, self.hf_processor._get_num_multimodal_tokens(image_sizes=[image.size[::-1]])["num_image_tokens"][
            0
        ]

    def image_inputs(self, examples, input_ids=None):
        """As VLMProcessor.image_inputs, plus what the native model needs: Qwen-VL's mm_token_type_ids (from the
        collated input_ids) and position_ids=None, because it computes its own 3-D M-RoPE positions (so packed rows
        are not supported for native VLMs)."""
        inputs = super().image_inputs(examples)
        if "image_grid_thw" in inputs and input_ids is not None:
            inputs.update(mm_token_type_ids=(input_ids == self.image_token_id).int(), position_ids=None)
        return inputs


def save_vlm(model, processor, folder, extra_tensors=None):
    """One loadable folder (also for native VLMs), written to folder.tmp and renamed (common.models.replace_dir): never
    half-written. extra_tensors {file name: {name: tensor}} adds safetensors files (a value head) before the rename."""
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
    for name, tensors in (extra_tensors or {}).items():
        save_file(tensors, str(tmp / name))
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
