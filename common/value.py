"""Value models: a transformer with one scalar head read at every token. PPO's critic reads it at every response token;
a Bradley-Terry reward model (reward_model.py) at a chat's last token or averaged over its assistant tokens (its
`pooling`), which is what ppo.py and grpo.py score completions with (`--reward-model`). A third kind of reward model has
no head: pooling "logprob" scores a chat by the causal LM's own mean log-likelihood of the assistant tokens (SimPO's
reference-free reward, Meng et al. 2024, with beta 1); it is saved as a causal-LM folder whose config says so.

A text value model is a Hugging Face AutoModelForSequenceClassification with num_labels=1 (a causal LM's folder gets a
new `score` head); a VLM's is a VLMCritic: the VLM itself (so values see the image) plus a linear head on its final
hidden states, saved as a save_vlm folder with value_head.safetensors beside the weights.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from pathlib import Path

import torch

from common.chat import IGNORE
from common.checkpoint import export_model, gather_unsharded
from common.logprob import forward_hidden, sequence_logprobs
from common.models import load_model, load_processor, pick_attn_implementation, prepare_model, resolve_model_path
from common.rollout import to_device, unpack
from common.run import Run, replace_dir
from common.vision import is_vlm, load_vlm, save_vlm

HEAD_FILE = "value_head.safetensors"  # a VLM value model's head ({"weight": [1, H]}) beside its save_vlm weights


class VLMCritic(torch.nn.Module):
    """A VLM's value model: the VLM (so values see the image) and a zero-initialised linear `score` head on its
    final-norm hidden states (values start at 0, as a new text head's do)."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm
        self.score = torch.nn.Linear(vlm.config.get_text_config().hidden_size, 1, bias=False)
        torch.nn.init.zeros_(self.score.weight)
        self.pooling = "last"  # a reward model's score: "last" token or "mean" over the assistant tokens

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **image_inputs):
        hidden = forward_hidden(
            self.vlm, input_ids, attention_mask=attention_mask, position_ids=position_ids, **image_inputs
        )  # fmt: skip  [B, L, H]
        return self.score(hidden)  # [B, L, 1]


def load_value_model(path, *, device, zero_new_head=True, gradient_checkpointing=False, dtype=torch.float32, meta=False,
                     lora_r=0, lora_alpha=16, lora_targets=None, pooling=None, critic=False):  # fmt: skip
    """(value model, processor) of a folder: a VLM folder gives a VLMCritic (its value_head.safetensors when it has
    one: an exported critic or reward model); a causal-LM folder a sequence-classification model with a new head
    (zeroed with zero_new_head: a critic's values start at 0); a sequence-classification folder keeps its head.
    meta=True: on the meta device, no weights read (FSDP2's sharded loading, common/run.fill_shards). lora_r > 0: a
    text value model trains LoRA adapters and its whole value head. A likelihood reward model (pooling "logprob", asked
    for or saved in the folder's config) is the causal LM itself; it cannot start a critic (critic=True)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers import logging as hf_logging

    processor = load_processor(path)
    if is_vlm(path):
        if pooling == "logprob":
            raise SystemExit(f"error: {path} is a VLM: --pooling logprob (the LM's own likelihood) is for text models")
        vlm = load_model(path, device=device, dtype=dtype, gradient_checkpointing=gradient_checkpointing, meta=meta,
                         lora_r=lora_r)  # fmt: skip
        with torch.device("meta") if meta else contextlib.nullcontext():
            critic = VLMCritic(vlm).to(dtype=dtype)
        head_file = Path(str(path)) / HEAD_FILE
        if not meta and head_file.exists():
            with safe_open(str(head_file), "pt") as f:  # the head's weight and its pooling, one read
                critic.score.weight.data.copy_(f.get_tensor("weight"))
                critic.pooling = (f.metadata() or {}).get("pooling", "last")
        return critic if meta else critic.to(device), processor
    resolved = resolve_model_path(path)
    config = AutoConfig.from_pretrained(resolved, num_labels=1)
    saved = getattr(config, "score_pooling", None)
    if "logprob" in (pooling, saved):  # the LM's own likelihood is the score: no head
        if critic or pooling not in (None, "logprob"):
            raise SystemExit(f"error: {path} is a likelihood reward model (reward_model.py --pooling logprob): it has no "
                             "value head to " + ("start a critic from" if critic else f"read with --pooling {pooling}"))  # fmt: skip
        model = load_model(path, device=device, dtype=dtype, gradient_checkpointing=gradient_checkpointing, meta=meta,
                           lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=lora_targets)  # fmt: skip
        model.config.score_pooling = "logprob"
        return model, processor
    new_head = not any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is expected here
    attn = pick_attn_implementation(device)
    with torch.device("meta") if meta else contextlib.nullcontext():
        if meta:
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype, attn_implementation=attn)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(resolved, config=config, dtype=dtype,
                                                                       attn_implementation=attn).to(device)  # fmt: skip
        hf_logging.set_verbosity(verbosity)
        model.config.pad_token_id = processor.tokenizer.pad_token_id
        if not meta and zero_new_head and new_head:
            torch.nn.init.zeros_(model.score.weight)
        model = prepare_model(model, gradient_checkpointing, lora_r, lora_alpha, 0.0, lora_targets, task="SEQ_CLS")
    return model, processor


def token_values(value_model, mb, image_inputs=None):
    """[B, L] float32: the value head at every position (from one packed row when the micro-batch has one:
    common/rollout.micro_batches). The model's own output pools one position per row, so the head's per-token output
    is caught with a forward hook (calling the whole model keeps FSDP2's root hooks working). image_inputs: a
    VLMCritic's image inputs for these rows (they may override position_ids)."""
    captured, rows = [], mb.get("packed", mb)
    handle = value_model.score.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        kwargs = {
            "attention_mask": rows.get("attention_mask"),
            "position_ids": rows["position_ids"],
            **(image_inputs or {}),
        }
        value_model(input_ids=rows["input_ids"], use_cache=False, **kwargs)
    finally:
        handle.remove()
    values = captured[0].squeeze(-1).float()
    return unpack(values, mb) if "packed" in mb else values


def pooling(value_model) -> str:
    """How a reward model's score is read from its per-token head: "last" (the last token's: what a text reward
    model's own HF forward returns) or "mean" (over the assistant tokens); "logprob": a causal LM's mean log-probability
    of the assistant tokens (no head). Kept in a text model's config (`score_pooling`) and in a VLM's
    value_head.safetensors metadata."""
    return getattr(value_model, "pooling", None) or getattr(value_model.config, "score_pooling", "last")


def set_pooling(value_model, how: str) -> None:
    """Make pooling() read `how` ("last" or "mean" on a head; "logprob" on a causal LM); export_value_model saves it."""
    if isinstance(value_model, VLMCritic):
        value_model.pooling = how
    else:
        value_model.config.score_pooling = how


def chat_scores(value_model, processor, chats, device):
    """[B]: the score of each (messages, image folder) chat, encoded by the processor (a VLM's with the chat's images,
    loaded per batch, not held for a whole data set): the value head at the last token or its mean over the assistant
    tokens, or a likelihood reward model's mean log-probability of the assistant tokens (pooling())."""
    examples = [processor(messages, base_dir=base_dir) for messages, base_dir in chats]
    L = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full(
        (len(examples), L), processor.tokenizer.pad_token_id, dtype=torch.long
    )  # [B, L] right-padded
    attention_mask = torch.zeros((len(examples), L), dtype=torch.long)  # [B, L]
    labels = torch.full((len(examples), L), IGNORE, dtype=torch.long)  # [B, L] the assistant tokens, others IGNORE
    for i, e in enumerate(examples):
        input_ids[i, : len(e["input_ids"])], attention_mask[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"]), 1
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    mb = to_device({"input_ids": input_ids, "attention_mask": attention_mask,
                    "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0)}, device)  # fmt: skip
    how = pooling(value_model)
    if how == "logprob":  # out[:, t] = log p(token t+1): the shift lives in sequence_logprobs
        kwargs = {"position_ids": mb["position_ids"], "attention_mask": mb["attention_mask"]}
        logps = sequence_logprobs(value_model, mb["input_ids"], labels.to(device), **kwargs)  # [B, L]
        return logps.sum(1) / (labels[:, 1:] != IGNORE).sum(1).clamp(min=1).to(logps.device)
    images = to_device(processor.image_inputs(examples, input_ids), device)  # each row's own images, in row order
    values = token_values(value_model, mb, images)  # [B, L]
    if how == "mean":
        assistant = (labels != IGNORE).to(values.device)  # [B, L]
        return (values * assistant).sum(1) / assistant.sum(1).clamp(min=1)
    last = mb["attention_mask"].sum(1) - 1  # [B]
    return values.gather(1, last[:, None]).squeeze(1)


@torch.no_grad()
def score_chats(value_model, processor, chats, run: Run, batch_size: int) -> torch.Tensor:
    """[len(chats)] float32 scores (chat_scores), batch by batch, on the CPU. Under FSDP2 every rank must
    score as many batches (the forwards are collective)."""
    out = []
    for i in range(0, len(chats), batch_size):
        with run.autocast(value_model):
            out.append(chat_scores(value_model, processor, chats[i : i + batch_size], run.device).float().cpu())
    return torch.cat(out)


def export_value_model(model, processor, out, run: Run, *, base_path: str) -> Path | None:
    """A trained value model as a folder load_value_model reads back (every rank calls it; rank 0 writes and gets the
    folder): a VLMCritic as a save_vlm folder plus value_head.safetensors, written before the folder is published so
    there is never a critic folder without its head; a text one as a sequence-classification folder; a likelihood
    reward model as a causal-LM folder whose config keeps `score_pooling`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForSequenceClassification

    if pooling(model) == "logprob":
        return export_model(model, processor, out, run, base_path=base_path, extra_config={"score_pooling": "logprob"})
    if isinstance(model, VLMCritic):
        plain = gather_unsharded(model, lambda: VLMCritic(load_vlm(base_path)[0]), run)
        if plain is None:
            return None
        head = {"weight": plain.score.weight.detach().float().cpu().contiguous()}
        return save_vlm(plain.vlm, processor, out, extra_tensors={HEAD_FILE: (head, {"pooling": pooling(model)})})
    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not run.main:
        return None
    config = copy.deepcopy(model.config)
    config.use_cache = True
    with torch.device("meta"):
        plain = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    out, tmp = Path(out), Path(f"{out}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lora = getattr(model, "peft_config", {}).get("default")
    if lora is not None:  # LoRA: saved merged (the value head is a full copy PEFT trained beside the original)
        from peft import get_peft_model

        plain = get_peft_model(plain, copy.deepcopy(lora))
        plain.load_state_dict(full_sd, assign=True)
        plain = plain.merge_and_unload()
    else:
        plain.load_state_dict(full_sd, assign=True)
    plain.tie_weights()
    plain.save_pretrained(tmp)
    processor.tokenizer.save_pretrained(tmp)
    return replace_dir(tmp, out)
