"""dpo.py vs TRL's DPOTrainer: training throughput (pairs/s) and peak memory, same model, data, batch, sequence length
and loss (sigmoid DPO, beta 0.1, AdamW), on CPU, each in its own subprocess, side by side in one run.

    pip install -r requirements-bench.txt      # trl (never lets it replace the installed torch)
    python bench/dpo_vs_trl.py                 # SmolLM2-135M-Instruct, 64 bundled pairs, batch 4, 6 timed steps
    python bench/dpo_vs_trl.py --model-path /tmp/tiny --steps 10

Two throughputs per trainer:
  * steady: pairs per second over the timed optimizer steps (the first step is warm-up and not timed);
  * end to end: all pairs trained / wall time from process start to the end of training, which counts dpo.py's one-off
    reference pass (cache emptied first) and TRL's dataset preprocessing. TRL runs the reference model every step instead.
Peak memory is the process's max resident set size (ru_maxrss): CPU RAM, since there is no GPU here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T_START = time.time()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_pairs(n: int, folder: Path) -> Path:
    lines = (ROOT / "data" / "arith_pref" / "train.jsonl").read_text().splitlines()[:n]
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_ours(a, data: Path, work: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    import dpo
    from common.run import read_metrics

    dpo.main(
        dpo.Args(
            model_path=a.model_path,
            dataset=str(data),
            eval_dataset=None,
            output_dir=str(work / "ours"),
            ref_cache_dir=str(work / "ref-cache"),
            max_steps=a.steps + 1,
            batch_size=a.batch_size,
            max_len=a.max_len,
            lr=a.lr,
            beta=a.beta,
            warmup_steps=1,
            dtype=a.dtype,
            save_every=10**9,
            export=False,
            eval_samples=0,
        )
    )
    end = time.time()
    rows = [r for r in read_metrics(work / "ours") if "train/loss" in r]
    step_times = [a.batch_size / r["train/pairs_per_s"] for r in rows[1:]]
    return dict(
        steady=a.batch_size * len(step_times) / sum(step_times),
        end_to_end=a.batch_size * len(rows) / (end - T_START),
        first_loss=rows[0]["train/loss"],
        last_loss=rows[-1]["train/loss"],
        peak_mib=peak_rss_mib(),
    )


def run_trl(a, data: Path, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    sys.path.insert(0, str(ROOT))
    from common.models import resolve_model_path

    folder = resolve_model_path(a.model_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    # conversational form, so TRL renders the same chat template as dpo.py
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in records
        ]
    )
    step_times, losses = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.time() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    config = DPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=a.batch_size,
        max_steps=a.steps + 1,
        learning_rate=a.lr,
        beta=a.beta,
        loss_type=["sigmoid"],
        max_length=a.max_len,
        bf16=a.dtype == "bfloat16",
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        lr_scheduler_type="cosine",
        warmup_steps=1,
        max_grad_norm=1.0,
        adam_beta2=0.95,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[Timer()]
    )
    trainer.train()
    end = time.time()
    timed = step_times[1:]
    return dict(
        steady=a.batch_size * len(timed) / sum(timed),
        end_to_end=a.batch_size * len(step_times) / (end - T_START),
        first_loss=losses[0] if losses else float("nan"),
        last_loss=losses[-1] if losses else float("nan"),
        peak_mib=peak_rss_mib(),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default="smollm2-135m")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after one warm-up step)")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU has native bf16, else float32")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.dtype == "auto":
        sys.path.insert(0, str(ROOT))
        from common.run import bf16_supported

        a.dtype = "bfloat16" if bf16_supported("cpu") else "float32"
    if a.worker:
        work = Path(a.work)
        result = (run_ours if a.worker == "ours" else run_trl)(a, work / "pairs.jsonl", work)
        print("RESULT " + json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_pairs(a.pairs, work)
        results = {}
        for worker in ("ours", "trl"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                worker,
                "--work",
                tmp,
                "--model-path",
                a.model_path,
                "--batch-size",
                str(a.batch_size),
                "--steps",
                str(a.steps),
                "--max-len",
                str(a.max_len),
                "--lr",
                str(a.lr),
                "--beta",
                str(a.beta),
                "--dtype",
                a.dtype,
            ]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
            run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
            if run.returncode != 0 or not line:
                raise SystemExit(f"{worker} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
            results[worker] = json.loads(line[0][len("RESULT ") :])
    ours, trl = results["ours"], results["trl"]
    print(
        f"model {a.model_path} | {a.pairs} pairs, batch {a.batch_size}, max_len {a.max_len}, {a.steps} timed steps, "
        f"sigmoid beta {a.beta}, {a.dtype}, CPU threads {os.cpu_count()}"
    )
    print(f"{'':22}{'dpo.py':>12}{'TRL':>12}{'ratio':>10}")
    for key, label in (
        ("steady", "pairs/s (steady)"),
        ("end_to_end", "pairs/s (end to end)"),
        ("peak_mib", "peak RSS MiB"),
    ):
        print(f"{label:22}{ours[key]:12.3f}{trl[key]:12.3f}{ours[key] / trl[key]:10.2f}")
    print(
        f"{'first / last loss':22}{ours['first_loss']:6.3f}/{ours['last_loss']:5.3f}{trl['first_loss']:6.3f}/{trl['last_loss']:5.3f}"
    )
    print(
        f"throughput ratio dpo.py / TRL (steady): {ours['steady'] / trl['steady']:.2f}x; "
        f"peak memory ratio: {ours['peak_mib'] / trl['peak_mib']:.2f}x"
    )


if __name__ == "__main__":
    main()
