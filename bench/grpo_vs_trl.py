"""grpo.py vs TRL's GRPOTrainer: rollout-step throughput (completions/s), peak memory and the rollout/training time
split, same model, prompts, group size, completion budget, sampling, rewards and loss, on CPU, each in its own
subprocess, side by side in one run.

    pip install -r requirements-bench.txt      # trl (never lets it replace the installed torch)
    python bench/grpo_vs_trl.py                # SmolLM2-135M-Instruct, arithmetic prompts, 8 prompts x G=4, 4 timed steps
    python bench/grpo_vs_trl.py --steps 2 --prompts-per-step 2 --max-new-tokens 32     # a quick check

Both sides: G=4 completions per prompt sampled with Hugging Face `generate` (temperature 1, top_p 1, no top-k), one
optimizer step per rollout batch (mu=1, one mini-batch: the ratio is 1 and no old-logp pass is made), no dynamic
sampling (TRL has none; it is grpo.py's default), no KL (beta 0, no
reference model), PPO-clip 0.2, AdamW (betas 0.9/0.99, constant lr), grad-norm clip 1, rewards = common.rewards'
math_reward + format_reward, group-normalised advantages; token-mean aggregation = TRL's loss_type "dapo"
(seq-mean-token-mean = "grpo"). Precision: float32 master weights with bf16 autocast on both (grpo.py --dtype bfloat16,
TRL bf16=True), or float32 on both; a forward hook on the first decoder layer reports the dtype each side actually
computed in, during generation and during the training forward. Micro-batch (--micro-batch-size) is the same on both:
grpo.py --micro-batch-size, TRL per_device_train_batch_size with gradient_accumulation_steps = completions / micro-batch.

Two throughputs per trainer:
  * steady: completions per second from the end of the first (warm-up) step to the end of the last one, both sides
    timestamped at the same point (after the optimizer step, as the step is logged); also completion tokens/s and
    the process's CPU seconds per completion, which a busy machine distorts much less than wall time;
  * end to end: all completions / wall time from process start to the end of training (model loading included).
Rollout = generate + decode + rewards + advantages (grpo.py's time/rollout_share; TRL's _generate_and_score_completions,
timed by wrapping it); train = the rest of the step (forward, backward, optimizer). The bench skips grpo.py's final
checkpoint (TRL saves nothing either: save_strategy "no"). Peak memory is the process's max resident set size.
Completion lengths depend on sampling: compare throughput only when the mean lengths are close (tokens/s is printed too).
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
AGG_TO_TRL = {"token-mean": "dapo", "seq-mean-token-mean": "grpo"}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def add_dtype_probe(model, seen: dict):
    """Records the dtype the first decoder layer's MLP computes in: seen["generate"] (no grad) and seen["train"]."""
    import torch

    layer = model.get_decoder().layers[0].mlp.down_proj

    def hook(module, inputs, output):
        seen.setdefault("train" if torch.is_grad_enabled() else "generate", set()).add(str(output.dtype).split(".")[-1])

    layer.register_forward_hook(hook)


def summarise(stamps, step_s, rollout_s, lengths, rows, end, rewards, seen) -> dict:
    """stamps: (wall, process CPU) seconds at the end of each step. Steady numbers over the steps after the first
    (from the end of step 1 to the end of the last step), end to end over all steps from process start."""
    n_timed = len(stamps) - 1
    wall, cpu = stamps[-1][0] - stamps[0][0], stamps[-1][1] - stamps[0][1]
    timed_rollout, timed_len = rollout_s[1:], lengths[1:]
    return dict(
        steady=rows * n_timed / wall,
        tokens_per_s=rows * sum(timed_len) / wall,
        cpu_s_per_completion=cpu / (rows * n_timed),
        end_to_end=rows * len(stamps) / (end - T_START),
        step_s=wall / n_timed,
        rollout_s=sum(timed_rollout) / n_timed,
        train_s=(wall - sum(timed_rollout)) / n_timed,
        length=sum(timed_len) / n_timed,
        reward=sum(rewards) / len(rewards) if rewards else float("nan"),
        step_times=[round(t, 2) for t in step_s],
        peak_mib=peak_rss_mib(),
        precision={k: "/".join(sorted(v)) for k, v in seen.items()},
    )


def run_ours(a, work: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    import grpo
    from common.run import read_metrics

    seen, ended, stamps = {}, [], []

    class StampedLogger(grpo.RunLogger):  # grpo.py logs once per step, right after the optimizer step
        def log(self, metrics, step):
            if "train/loss" in metrics:
                stamps.append((time.time(), time.process_time()))
            super().log(metrics, step)

    def load_probed(*args, **kwargs):
        model = grpo_load_model(*args, **kwargs)
        add_dtype_probe(model, seen)
        return model

    def no_final_checkpoint(output_dir, step, *args, **kwargs):  # TRL saves nothing; don't time 1.6 GB of writes
        ended.append(time.time())

    grpo_load_model = grpo.load_model
    grpo.load_model, grpo.save_checkpoint, grpo.RunLogger = load_probed, no_final_checkpoint, StampedLogger
    grpo.main(
        grpo.Args(
            model_path=a.model_path,
            dataset=str(ROOT / "data" / "arith" / "train.jsonl"),
            eval_dataset=None,
            eval_samples=0,
            output_dir=str(work / "ours"),
            max_steps=a.steps + 1,
            prompts_per_step=a.prompts_per_step,
            group_size=a.group_size,
            max_new_tokens=a.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            lr=a.lr,
            mu=1,
            mini_batches=1,
            micro_batch_size=a.micro_batch_size,
            estimator="grpo",
            variant="ppo",
            clip_low=0.2,
            clip_high=0.2,
            agg=a.agg,
            kl_coef=0.0,
            dynamic_sampling=False,
            rewards=("math", "format"),
            dtype=a.dtype,
            export=False,
            save_every=0,
        )
    )
    rows = [r for r in read_metrics(work / "ours") if "train/loss" in r]
    return summarise(
        stamps,
        [r["time/step_s"] for r in rows],
        [r["time/step_s"] * r["time/rollout_share"] for r in rows],
        [r["completion/length_mean"] for r in rows],
        a.prompts_per_step * a.group_size,
        ended[0],
        [r["reward/mean"] for r in rows[1:]],
        seen,
    )


def run_trl(a, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(ROOT))
    from common.models import resolve_model_path
    from common.rewards import format_reward, math_reward

    folder = resolve_model_path(a.model_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # fp32 master weights, as grpo.py
    seen = {}
    add_dtype_probe(model, seen)
    records = [json.loads(line) for line in (ROOT / "data" / "arith" / "train.jsonl").read_text().splitlines()]
    # conversational prompts (the user turn; the reference assistant turn dropped, as grpo.py does), `answer` kept as a
    # column: TRL passes every extra column to the reward functions as a keyword list
    dataset = Dataset.from_list(
        [
            {"prompt": [m for m in r["messages"] if m["role"] != "assistant"], "answer": str(r["answer"])}
            for r in records
        ]
    )

    def text(completion):  # TRL hands conversational completions as [{"role": "assistant", "content": ...}]
        return completion[0]["content"] if isinstance(completion, list) else completion

    def math(prompts, completions, answer, **kwargs):
        return math_reward([text(c) for c in completions], prompts=prompts, answers=answer)

    def format(prompts, completions, **kwargs):
        return format_reward([text(c) for c in completions], prompts=prompts)

    step_s, rollout_s, lengths, rewards, stamps = [], [], [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kw):
            step_s.append(time.time() - self.t0)
            stamps.append((time.time(), time.process_time()))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                rewards.append(logs["reward"])

    rows = a.prompts_per_step * a.group_size
    config = GRPOConfig(
        output_dir=str(work / "trl"),
        num_generations=a.group_size,
        per_device_train_batch_size=a.micro_batch_size,
        gradient_accumulation_steps=rows // a.micro_batch_size,  # generation batch = rows completions
        max_completion_length=a.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        epsilon=0.2,
        loss_type=AGG_TO_TRL[a.agg],
        scale_rewards="group",
        max_steps=a.steps + 1,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta2=0.99,
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=a.dtype == "bfloat16",
        use_cpu=True,
        use_vllm=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        log_completions=False,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=[math, format],
        callbacks=[Timer()],
    )
    generate_and_score = trainer._generate_and_score_completions

    def timed_rollout(inputs):  # one call per optimizer step here: generation batch = one step's completions
        t0 = time.time()
        out = generate_and_score(inputs)
        rollout_s.append(time.time() - t0)
        lengths.append(float(out["completion_mask"].sum(1).float().mean()))  # EOS counted, as grpo.py's length_mean
        return out

    trainer._generate_and_score_completions = timed_rollout
    trainer.train()
    end = time.time()
    if len(rollout_s) != len(step_s):
        raise SystemExit(f"expected one rollout per step, got {len(rollout_s)} rollouts in {len(step_s)} steps")
    return summarise(stamps, step_s, rollout_s, lengths, rows, end, rewards[1:], seen)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=4, help="timed rollout steps (after one warm-up step)")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4, help="G: completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="completions per forward/backward on both sides (default: all of a step's completions)",
    )
    p.add_argument(
        "--agg",
        choices=sorted(AGG_TO_TRL),
        default="token-mean",
        help="loss aggregation: token-mean = TRL dapo, seq-mean-token-mean = TRL grpo",
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument(
        "--dtype", default="auto", help="auto: bfloat16 autocast where the CPU has native bf16, else float32"
    )
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    rows = a.prompts_per_step * a.group_size
    a.micro_batch_size = a.micro_batch_size or rows
    if rows % a.micro_batch_size or a.micro_batch_size % a.group_size:
        raise SystemExit(
            f"error: --micro-batch-size {a.micro_batch_size} must divide the {rows} completions per step "
            f"and be a multiple of --group-size {a.group_size} (TRL's per-device batch holds whole groups)"
        )
    if a.steps < 1:
        raise SystemExit("error: --steps must be >= 1 (one more warm-up step is always run)")
    if a.dtype == "auto":
        sys.path.insert(0, str(ROOT))
        from common.run import bf16_supported

        a.dtype = "bfloat16" if bf16_supported("cpu") else "float32"
    if a.worker:
        result = (run_ours if a.worker == "ours" else run_trl)(a, Path(a.work))
        print("RESULT " + json.dumps(result))
        return
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
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
                "--steps",
                str(a.steps),
                "--prompts-per-step",
                str(a.prompts_per_step),
                "--group-size",
                str(a.group_size),
                "--max-new-tokens",
                str(a.max_new_tokens),
                "--micro-batch-size",
                str(a.micro_batch_size),
                "--agg",
                a.agg,
                "--lr",
                str(a.lr),
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
        f"model {a.model_path} | {a.prompts_per_step} prompts x G={a.group_size} = {rows} completions/step, "
        f"max_new_tokens {a.max_new_tokens}, micro-batch {a.micro_batch_size} | {a.agg} (TRL loss_type "
        f"{AGG_TO_TRL[a.agg]}), beta 0, mu 1 | {a.dtype} | {a.steps} timed steps after 1 warm-up | CPU threads "
        f"{os.cpu_count()}, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(f"{'':28}{'grpo.py':>12}{'TRL':>12}{'grpo/TRL':>10}")
    for key, label in (
        ("steady", "completions/s (steady)"),
        ("tokens_per_s", "completion tokens/s"),
        ("cpu_s_per_completion", "CPU s per completion"),
        ("end_to_end", "completions/s (end to end)"),
        ("step_s", "s per step"),
        ("rollout_s", "  rollout s (gen+score)"),
        ("train_s", "  train s (fwd+bwd+opt)"),
        ("length", "mean completion tokens"),
        ("reward", "mean reward (timed steps)"),
        ("peak_mib", "peak RSS MiB"),
    ):
        ratio = ours[key] / trl[key] if trl[key] else float("nan")
        print(f"{label:28}{ours[key]:12.3f}{trl[key]:12.3f}{ratio:10.2f}")
    for name, r in (("grpo.py", ours), ("TRL", trl)):
        print(
            f"{name:8} rollout share {r['rollout_s'] / r['step_s']:.0%} | compute dtype generate/train "
            f"{r['precision'].get('generate', '?')}/{r['precision'].get('train', '?')} | step times s {r['step_times']}"
        )
    ratio = ours["steady"] / trl["steady"]
    print(
        f"throughput ratio grpo.py / TRL (steady completions/s): {ratio:.2f}x (target >= 1.5x: "
        f"{'met' if ratio >= 1.5 else 'NOT met'}); tokens/s ratio {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x; "
        f"peak memory ratio {ours['peak_mib'] / trl['peak_mib']:.2f}x"
    )
    mean_len = (ours["length"] + trl["length"]) / 2
    if abs(ours["length"] - trl["length"]) > 0.15 * mean_len:
        print(
            f"note: mean completion lengths differ by more than 15% ({ours['length']:.1f} vs {trl['length']:.1f} "
            f"tokens): completions/s is not comparable, read completion tokens/s instead"
        )


if __name__ == "__main__":
    main()
