"""Shared fixtures: a tiny random-init model of SmolLM2's family saved as a real HF folder (so scripts load it through
the same path as any user model, including under torchrun), and a small slice of the bundled arithmetic task."""

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from common.models import load_tokenizer, tiny_model

    folder = tmp_path_factory.mktemp("tiny-smollm2")
    tiny_model("smollm2-135m", seed=0).save_pretrained(folder)
    load_tokenizer("smollm2-135m").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def arith_small(tmp_path_factory):
    """First 48 training and 8 held-out records of the bundled task."""
    folder = tmp_path_factory.mktemp("arith-small")
    for split, n in (("train", 48), ("test", 8)):
        lines = (ROOT / "data" / "arith" / f"{split}.jsonl").read_text().splitlines()[:n]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def subprocess_env(threads: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    env.pop("WORLD_SIZE", None)
    return env


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
