"""Run plumbing shared by every script: `--config` files, metrics.jsonl and wandb logging.

(The VQA metrics of the vision scripts live here too, once they land.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path


def cli(args_cls, argv: list[str] | None = None):
    """`tyro.cli(args_cls)` plus `--config run.yaml|run.json`: the file sets defaults, flags on the command line override.

    Keys may be spelled `lr`, `max_len` or `max-len`. An unknown key is an error naming the file and the key."""
    import tyro

    sys.excepthook = _user_error_hook
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
    if config_path is None:
        return tyro.cli(args_cls, args=argv)
    return tyro.cli(args_cls, args=argv, default=args_cls(**read_config(config_path, args_cls)))


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
        raise SystemExit(f"error: config file '{path}' must hold a mapping of field: value, got {type(values).__name__}")
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


def wandb_mode() -> str:
    """online when an account is configured, offline (runs sync later with `wandb sync`) otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


class RunLogger:
    """Appends one JSON line per `log()` to `<output_dir>/metrics.jsonl` and mirrors it to wandb with `track=True`.

    Only rank 0 writes (pass `enabled=False` elsewhere). On resume, lines past `resume_step` are dropped first so the
    file holds one clean curve."""

    def __init__(self, output_dir, config: dict, *, enabled=True, track=False, project="cleanpost", run_name=None,
                 resume_step: int | None = None):
        self.enabled, self.wandb = enabled, None
        if not enabled:
            return
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.start = time.time()
        if track:
            import wandb

            self.wandb = wandb.init(project=project, name=run_name, config=config, dir=str(output_dir),
                                    mode=wandb_mode(), resume="allow")

    def log(self, metrics: dict, step: int):
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if hasattr(v, "item") else v) for k, v in metrics.items()},
               "time": round(time.time() - self.start, 3)}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
