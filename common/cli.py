"""The command line every script shares: tyro on the script's `Args` dataclass, plus `--config run.yaml|run.json`
(a file of defaults that flags override), repeated `--dataset` flags joined into a weighted mixture, and one-line
errors for bad user input (a data file, a model path) instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path


def cli(args_cls, argv: list[str] | None = None):
    """`tyro.cli(args_cls)` plus `--config run.yaml|run.json`: the file sets defaults, flags on the command line override.

    Keys may be spelled `lr`, `max_len` or `max-len`. An unknown key is an error naming the file and the key."""
    import tyro

    sys.excepthook = _user_error_hook
    argv = _join_repeated_datasets(list(sys.argv[1:] if argv is None else argv))
    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
    if config_path is None:
        return tyro.cli(args_cls, args=argv)
    return tyro.cli(args_cls, args=argv, default=args_cls(**read_config(config_path, args_cls)))


def _join_repeated_datasets(argv: list[str]) -> list[str]:
    """`--dataset a.jsonl:0.7 --dataset b.jsonl:0.3` -> `--dataset a.jsonl:0.7,b.jsonl:0.3`, the mixture spec that
    common.data.load_mixture reads (tyro alone would keep only the last of a repeated flag)."""
    out, first, i = [], {}, 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in ("--dataset", "--eval-dataset") and (eq or i + 1 < len(argv)):
            value, i = (value, i + 1) if eq else (argv[i + 1], i + 2)
            if name in first:
                out[first[name]] += "," + value
            else:
                first[name] = len(out) + 1
                out += [name, value]
            continue
        out.append(argv[i])
        i += 1
    return out


def _user_error_hook(kind, error, tb):
    """Bad input (data, model path) is the user's to fix: print the message that names the file/line/field, no
    traceback. Anything else is a bug and keeps its traceback."""
    if kind.__name__ in ("DataError", "ModelPathError"):
        print(f"error: {error}", file=sys.stderr)
        return
    sys.__excepthook__(kind, error, tb)


def read_config(path: str, args_cls) -> dict:
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"error: config file '{path}' not found")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:  # yaml.YAMLError or json.JSONDecodeError, both name the line
        raise SystemExit(f"error: config file '{path}' is not valid {p.suffix[1:].upper()}: {e}") from None
    if not isinstance(values, dict):
        raise SystemExit(
            f"error: config file '{path}' must hold a mapping of field: value, got {type(values).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(args_cls)}
    out = {"config": path}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise SystemExit(f"error: config file '{path}': unknown field '{key}'; known: {', '.join(fields)}")
        if isinstance(value, list):
            value = tuple(value)
        out[name] = value
    return out
