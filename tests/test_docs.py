"""The documentation names only flags that exist: every `--flag` on a command line of README.md, docs/, bench/README.md
or scripts/*.sh that runs a script is one of that script's flags, and every flag of README's shared-flags table is a flag
of every training script; relative links lead to files that exist. README stays under 15 KB."""

import dataclasses
import importlib
import re

import pytest
from conftest import ROOT

SCRIPTS = ["sft", "dpo", "grpo", "ppo", "reward_model", "pretrain_siglip", "pretrain_captioner", "eval_vqa"]
TRAINING = [s for s in SCRIPTS if s != "eval_vqa"]
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCS += sorted((ROOT / "scripts").glob("*.sh"))  # the pipeline scripts' command lines too


def flags_of(script: str) -> set[str]:
    """--flag spellings tyro accepts for the script's Args (booleans also as --no-flag)."""
    if not (ROOT / f"{script}.py").exists():
        pytest.skip(f"{script}.py not in this tree")
    fields = [f.name.replace("_", "-") for f in dataclasses.fields(importlib.import_module(script).Args)]
    return {f"--{f}" for f in fields} | {f"--no-{f}" for f in fields} | {"--help"}


def commands(text: str):
    """(script, command text) of each command line that runs one of the scripts, backslash continuations joined."""
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        for m in re.finditer(r"(?:python|torchrun[^\n]*?)\s+(\w+)\.py\b([^|;&#\n]*)", line):
            if m.group(1) in SCRIPTS:
                yield m.group(1), m.group(2)


def test_readme_is_short():
    assert (ROOT / "README.md").stat().st_size <= 15 * 1024


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_on_a_command_line_exists(doc):
    found = list(commands(doc.read_text()))
    unknown = [(script, flag) for script, rest in found for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest)
               if flag not in flags_of(script)]  # fmt: skip
    assert not unknown, f"{doc.name}: flags that the scripts don't have: {unknown}"


def test_shared_flags_table_holds_for_every_training_script():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Shared flags") :].split("\n## ", 1)[0]
    shared = re.findall(r"^\| `(--[a-z][\w-]*)`", table, flags=re.M)
    assert len(shared) >= 8
    missing = [(script, flag) for script in TRAINING for flag in shared if flag not in flags_of(script)]
    assert not missing, f"shared flags some training script lacks: {missing}"


@pytest.mark.parametrize("doc", [d for d in DOCS if d.suffix == ".md"], ids=lambda p: p.name)
def test_relative_links_point_at_files_that_exist(doc):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
    missing = [link for link in links if "://" not in link and not (doc.parent / link).exists()]
    assert not missing, f"{doc.relative_to(ROOT)}: links to missing files: {missing}"
