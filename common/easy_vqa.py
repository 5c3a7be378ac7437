"""The easy-VQA dataset (the PyPI package easy-vqa: 64x64 images of one coloured shape, with questions and answers),
as records for every script: `easy-vqa:<kind>` in any --dataset flag (common/data.load_records).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from common.data import DataError

EASY_VQA_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
CAPTION_TEMPLATES = ("a {}.", "an image of a {}.", "a picture showing a {}.", "there is a {} in the image.")


def easy_vqa_records(kind):
    """Records from the installed easy-vqa package. kind: "captions-train"/"captions-test" -> one {"image", "caption"}
    per image (colour and shape read off that image's questions and answers); "train"/"test" -> one chat per question:
    {"messages": [user: image + question, assistant: answer], "answer"}; "pairs-train"/"pairs-test" -> one preference
    pair per question: {"prompt": [user: image + question], "chosen": the answer, "rejected": a wrong answer of the same
    kind (yes <-> no, another colour, another shape; picked by the question's index), "answer"}; "chats-train"/
    "chats-test" -> one multi-turn chat per image: all its questions in file order, each answered, the image in the
    first user turn (an image's several questions then cost one encoding and one copy of its image tokens)."""
    kinds = [f"{k}-{split}" for k in ("captions", "pairs", "chats") for split in ("train", "test")] + ["train", "test"]
    if kind not in kinds:
        raise DataError(f"easy-vqa: unknown kind {kind!r}; expected one of {', '.join(kinds)}")
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None:
        raise DataError("easy-vqa data needs the PyPI package easy-vqa: pip install easy-vqa")
    split = kind.split("-")[-1]
    root = Path(spec.submodule_search_locations[0], "data", split)
    questions = json.loads((root / "questions.json").read_text())  # [[question, answer, image_id], ...]
    image = {i: str(root / "images" / f"{i}.png") for _, _, i in questions}

    def user_turn(question, image_id):
        return {
            "role": "user",
            "content": [{"type": "image", "image": image[image_id]}, {"type": "text", "text": question}],
        }

    if kind.startswith("pairs"):
        records = []
        for n, (q, a, i) in enumerate(questions):
            group = next((g for g in (("yes", "no"), EASY_VQA_COLORS, EASY_VQA_SHAPES) if a in g), None)
            if group is None:
                raise DataError(
                    f"easy-vqa:{kind}[{n}]: answer {a!r} is no yes/no, colour or shape: no wrong answer to pair"
                )
            wrong = [w for w in group if w != a]
            records.append(
                {
                    "prompt": [user_turn(q, i)],
                    "chosen": a,
                    "rejected": wrong[n % len(wrong)],
                    "answer": a,
                    "_where": f"easy-vqa:{kind}[{n}]",
                    "_dir": str(root),
                }
            )
        return records
    if kind.startswith("chats"):
        turns = {}  # image id -> [user, assistant, user, assistant, ...]
        for q, a, i in questions:
            content = ([] if i in turns else [{"type": "image", "image": image[i]}]) + [{"type": "text", "text": q}]
            turns.setdefault(i, []).extend([{"role": "user", "content": content}, {"role": "assistant", "content": a}])
        return [
            {"messages": m, "_where": f"easy-vqa:{kind}[{n}] (image {i})", "_dir": str(root)}
            for n, (i, m) in enumerate(turns.items())
        ]
    if not kind.startswith("captions"):
        return [
            {
                "messages": [
                    user_turn(q, i),
                    {"role": "assistant", "content": a},
                ],
                "answer": a,
                "_where": f"easy-vqa:{kind}[{n}]",
                "_dir": str(root),
            }
            for n, (q, a, i) in enumerate(questions)
        ]
    present, absent = {}, {}  # image id -> words known to be (or not be) in the image
    for q, a, i in questions:
        words = set(re.findall(r"[a-z]+", q))
        if q.startswith("what"):  # "what color is the triangle?" -> blue: both the question and answer words hold
            present.setdefault(i, set()).update(words | {a})
        else:  # "is there not a red shape?" -> no: red is present
            (present if (a == "yes") != bool(words & {"not", "no"}) else absent).setdefault(i, set()).update(words)
    records = []
    for n, i in enumerate(sorted(image)):
        color = _known(EASY_VQA_COLORS, present.get(i, ()), absent.get(i, ()))
        shape = _known(EASY_VQA_SHAPES, present.get(i, ()), absent.get(i, ()))
        thing = " ".join(w for w in (color, shape or "shape") if w)
        records.append(
            {
                "image": image[i],
                "caption": CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)].format(thing),
                "_where": f"easy-vqa:{kind}[{n}]",
                "_dir": str(root),
            }
        )
    return records


def _known(names, present, absent):
    """The one name of `names` an image's questions establish: named present, or else the only one not ruled out."""
    hits = [w for w in names if w in present] or [w for w in names if w not in absent]
    return hits[0] if len(hits) == 1 else None
