"""dpo.py's data as token rows: preference pairs (or unpaired KTO examples) tokenised by the model's processor, with
KTO's mismatched pairs; a micro-batch's sequences collated into one forward (padded, or packed with restarting
position_ids and a per-token sequence index); the summed answer log-probs of each sequence.
"""

from __future__ import annotations

import torch

from common.chat import IGNORE, encode, pack_collate, pack_examples, pad_collate
from common.data import DataError, load_mixture, preference_parts, to_messages
from common.datasets import detect_format
from common.logprob import sequence_logprobs


def sides_of(pairs) -> tuple[str, ...]:
    """The sequences each item holds: chosen, rejected (pairs) or completion (unpaired KTO), and kl (KTO)."""
    return tuple(side for side in ("chosen", "rejected", "completion", "kl") if side in pairs[0])


def build_pairs(source, processor, *, max_len: int, overlong: str = "truncate", with_kl=False, seed=0, name=None):
    """(pairs, records) of a source (or of records already loaded, called `name`): each pair {"index", "chosen",
    "rejected"[, "kl"]} of chats tokenised by the model's processor, assistant-only labels (a VLM's sequences also
    carry their images, "images"); an unpaired KTO record gives {"index", "completion", "label"[, "kl"]}.

    With with_kl (KTO), "kl" is the prompt of pair i with the (chosen) answer of pair i-1 (a fixed mismatched pairing,
    like TRL's KL dataset), whose log-prob under policy and reference estimates KTO's reference point."""
    records = load_mixture(source, seed=seed) if isinstance(source, str) else source
    name = source if isinstance(source, str) else name or "dataset"
    fmt = detect_format(records, use="pairs", script="dpo.py")
    if fmt == "unpaired" and not with_kl:
        raise DataError(f"{records[0]['_where']}: unpaired records (prompt, completion, label) are KTO data: "
                        "train them with --loss-type kto")  # fmt: skip
    pairs, kept, parts, n_dropped = [], [], [], 0
    for record in records:
        prompt, *answers = preference_parts(record) if fmt == "preference" else prompt_and_completion(record)
        keys = ("chosen", "rejected") if fmt == "preference" else ("completion",)
        sides = [encode(processor, prompt + answer, record, max_len=max_len, overlong=overlong) for answer in answers]
        if any(s is None or all(t == IGNORE for t in s["labels"]) for s in sides):
            n_dropped += 1  # over-long (with --overlong drop) or the answer was cut off entirely
            continue
        label = {"label": bool(record["label"])} if fmt == "unpaired" else {}
        pairs.append({"index": len(kept), **dict(zip(keys, sides)), **label})
        kept.append(record)
        parts.append((prompt, answers[0]))
    if not pairs:
        raise DataError(f"{name}: no usable pairs ({n_dropped} dropped as over-long or without answer tokens)")
    if with_kl:
        for i, pair in enumerate(pairs):
            pair["kl"] = encode(processor, parts[i][0] + parts[i - 1][1], kept[i], max_len=max_len)
    desirable = sum(p.get("label", False) for p in pairs)  # KTO's advice: lambda_D n_D / (lambda_U n_U) in [1, 4/3]
    kind = "pairs" if fmt == "preference" else f"examples ({desirable} desirable, {len(pairs) - desirable} undesirable)"
    print(f"[data] {name}: {len(records)} records -> {len(pairs)} {kind} ({n_dropped} dropped)")
    return pairs, kept


def prompt_and_completion(record) -> tuple[list[dict], list[dict]]:
    messages = to_messages(record, "unpaired")
    n = 1 if isinstance(record["prompt"], str) else len(record["prompt"])
    return messages[:n], messages[n:]


def collate_pairs(pairs, processor, *, packing: bool, max_len: int, sides=("chosen", "rejected")) -> dict:
    """One forward's rows of the pairs' sequences, all chosen first, then all rejected (sequence k*B + i is side k of
    pair i), padded or packed (position_ids restart per sequence); seq_index [R, T] says which sequence each token
    belongs to (-1: pad); a VLM's image inputs come in the order their tokens appear row by row."""
    seqs = [p[side] for side in sides for p in pairs]
    pad_id = processor.tokenizer.pad_token_id
    packs = pack_examples(seqs, max_len) if packing else [[i] for i in range(len(seqs))]
    rows = [[seqs[i] for i in pack] for pack in packs]
    batch = pack_collate(rows, pad_id, max_len) if packing else pad_collate(seqs, pad_id)
    seq_index = torch.full_like(batch["input_ids"], -1)  # [R, T]
    for row, pack in enumerate(packs):
        t = 0
        for i in pack:
            seq_index[row, t : t + len(seqs[i]["input_ids"])] = i
            t += len(seqs[i]["input_ids"])
    images = processor.image_inputs([seqs[i] for pack in packs for i in pack], batch["input_ids"])
    return batch | images | {"seq_index": seq_index, "n_seqs": len(seqs)}


def len_answer(example) -> int:
    """Answer (target) tokens of a tokenised chat, counted as sequence_logps counts them."""
    return max(1, sum(t != IGNORE for t in example["labels"][1:]))


def sequence_logps(model, batch, impl: str = "fused") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer log-probs [S], answer token counts [S]) of the batch's sequences, from one forward."""
    device = next(model.parameters()).device
    to = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "n_seqs"}
    kwargs = {k: v for k, v in to.items() if k not in ("input_ids", "labels", "seq_index")}  # positions, mask, pixels
    token_logps = sequence_logprobs(
        model, to["input_ids"], to["labels"], impl=impl, **kwargs
    )  # [R, T], out[:, t] scores token t+1, 0 off-target
    target = torch.zeros_like(to["labels"], dtype=torch.bool)  # [R, T]
    target[:, :-1] = to["labels"][:, 1:] != IGNORE
    # token t+1 is in the same sequence as token t for every target (a sequence's first token is never a target)
    owner = to["seq_index"][target]
    sums = torch.zeros(batch["n_seqs"], dtype=token_logps.dtype, device=device).index_add(0, owner, token_logps[target])
    counts = torch.zeros(batch["n_seqs"], dtype=torch.long, device=device).index_add(0, owner, torch.ones_like(owner))
    return sums, counts
