"""Processors for vision-language models: an OpenAI-style chat with image parts -> one training or prompt example.

`VLMProcessor` (a ComposedVLM's, common/vision.py) and `NativeVLMProcessor` (around a HF AutoProcessor) share one call
signature with common/chat.py's TextProcessor: processor(messages) -> {"input_ids", "labels" (assistant-only),
"images" (one dict of tensors per image), "truncated"}; batch with common.data.pad_collate / pack_collate and add
`processor.image_inputs(examples, input_ids)` to the model kwargs.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import torch

from common.chat import IGNORE, tokenize_chat
from common.data import DataError

IMAGE_TOKEN = "<image>"


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
