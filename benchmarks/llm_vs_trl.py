"""Throughput of flowalign's LLM GRPO trainer vs TRL's GRPOTrainer on the same job (CPU), interleaved runs.

Same embedded tiny model, same train prompts, G = 8 completions for 16 prompts per step (128 rows), 8 new tokens
max, temperature 1, the same two rewards (arith_answer 1.0 + arith_format 0.5), GRPO loss (seq-mean-token-mean,
clip 0.2, beta 0, group std scaling), AdamW lr 1e-3 betas (0.9, 0.999), grad clip 1.0, one optimizer step per
generation batch, float32, one CPU thread each. TRL runs without gradient checkpointing (its default is on, which
only costs time here) and with the transformers generation backend (no vLLM on CPU).

Each implementation runs in its own subprocess (``--worker ours|trl``); rounds alternate the order. A worker
does ``--warmup`` steps, then times ``--steps`` steps and reports steps/s, completion tokens/s, mean reward and a
per-phase breakdown. Loss equality is covered by ``tests/test_llm_parity.py`` (loss and gradients equal TRL's to
1e-5 on the same batch); here we also log the reward curve of both runs.

    OMP_NUM_THREADS=1 python benchmarks/llm_vs_trl.py --rounds 3 --steps 20 [--with-trl-default-gc]
    python benchmarks/llm_vs_trl.py --recompute      # re-derive the summary from the runs stored in the JSON

Medians are true medians (``benchmarks/common.median``: the mean of the two middle values for an even count);
speedups are the median over rounds of the per-round ratio (``common.paired_ratio``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, paired_ratio  # noqa: E402

PROMPTS_PER_STEP, G, MAX_NEW, LR, SEED = 16, 8, 8, 1e-3, 0
RESULTS = Path(__file__).resolve().parent / "results" / "llm_vs_trl.json"


def _timer(store: dict, key: str, fn):
    def wrapped(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            store[key] = store.get(key, 0.0) + time.perf_counter() - t
    return wrapped


def worker_ours(warmup: int, steps: int) -> dict:
    from flowalign.llm.config import load
    from flowalign.llm.trainer import LLMTrainer

    out = tempfile.mkdtemp(prefix="bench_ours_")
    cfg = load(None, [f"output_dir={out}", "algo.preset=grpo", "algo.beta=0.0",
                      f"rollout.prompts_per_step={PROMPTS_PER_STEP}", f"rollout.group_size={G}",
                      f"rollout.max_new_tokens={MAX_NEW}", "rollout.temperature=1.0", f"train.lr={LR}",
                      "train.betas=[0.9, 0.999]", "train.max_grad_norm=1.0", "train.batch_size=128",
                      f"seed={SEED}", "train.threads=1"])
    tr = LLMTrainer(cfg)
    for _ in range(warmup):
        tr.train_step()
    phases: dict[str, float] = {}
    rewards, tokens = [], 0
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        m = tr.train_step()
        rewards.append(m["reward"])
        tokens += m["tokens"]
        for k in ("time/generate", "time/aux_logprobs", "time/train"):
            phases[k.split("/")[1]] = phases.get(k.split("/")[1], 0.0) + m[k]
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    phases["rewards+advantages+other"] = dt - sum(phases.values())
    return {"impl": "flowalign", "steps": steps, "seconds": dt, "steps_per_s": steps / dt,
            "cpu_seconds": cpu, "steps_per_cpu_s": steps / cpu,
            "completion_tokens_per_s": tokens / dt, "mean_reward": sum(rewards) / len(rewards),
            "rewards": rewards, "phases_s_per_step": {k: v / steps for k, v in phases.items()}}


def worker_trl(warmup: int, steps: int, gradient_checkpointing: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from flowalign.llm.model import load_model
    from flowalign.llm.task import ArithmeticTask
    from flowalign.rewards.base import REWARDS

    torch.set_num_threads(1)
    model, tok = load_model("embedded")
    exs = ArithmeticTask(seed=0).split("train")
    ds = Dataset.from_dict({"prompt": [e.prompt for e in exs], "answer": [e.answer for e in exs]})
    ans, fmt = REWARDS.get("arith_answer")(), REWARDS.get("arith_format")()

    def arith_answer(completions, answer, **_):
        return ans(completions=completions, answers=answer).tolist()

    def arith_format(completions, **_):
        return fmt(completions=completions).tolist()

    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=PROMPTS_PER_STEP * G,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=MAX_NEW, temperature=1.0,
        beta=0.0, loss_type="grpo", scale_rewards="group", reward_weights=[1.0, 0.5], learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0,
        max_grad_norm=1.0, gradient_checkpointing=gradient_checkpointing, bf16=False, use_cpu=True, logging_steps=1,
        report_to=[], save_strategy="no", max_steps=warmup + steps, seed=SEED, disable_tqdm=True,
        dataloader_num_workers=0)
    tr = GRPOTrainer(model=model, reward_funcs=[arith_answer, arith_format], args=cfg, train_dataset=ds,
                     processing_class=tok)
    phases: dict[str, float] = {}
    tr._generate = _timer(phases, "generate", tr._generate)
    tr._calculate_rewards = _timer(phases, "rewards", tr._calculate_rewards)
    tr._generate_and_score_completions = _timer(phases, "_prep_total", tr._generate_and_score_completions)
    tr.compute_loss = _timer(phases, "train_forward_loss", tr.compute_loss)
    tr.accelerator.backward = _timer(phases, "train_backward", tr.accelerator.backward)

    marks, logs = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), time.process_time(), dict(phases)))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                logs_copy = {k: logs[k] for k in ("reward", "completions/mean_length") if k in logs}
                loglist.append(logs_copy)

    loglist = logs
    tr.add_callback(Clock())
    tr.train()
    (t_a, c_a, ph_a), (t_b, c_b, ph_b) = marks[warmup - 1], marks[-1]
    dt, cpu = t_b - t_a, c_b - c_a
    meas = logs[warmup:warmup + steps]
    tokens = sum(l["completions/mean_length"] * PROMPTS_PER_STEP * G for l in meas)
    ph = {k: (ph_b.get(k, 0.0) - ph_a.get(k, 0.0)) / steps for k in ph_b}
    prep = ph.pop("_prep_total", 0.0)
    ph["prep_other (tokenize, advantages, logging)"] = prep - ph.get("generate", 0.0) - ph.get("rewards", 0.0)
    ph["optimizer+trainer_other"] = dt / steps - prep - ph.get("train_forward_loss", 0.0) - ph.get(
        "train_backward", 0.0)
    return {"impl": "trl_gc" if gradient_checkpointing else "trl", "steps": steps, "seconds": dt,
            "steps_per_s": steps / dt, "cpu_seconds": cpu, "steps_per_cpu_s": steps / cpu,
            "completion_tokens_per_s": tokens / dt, "mean_reward": sum(l["reward"] for l in meas) / len(meas),
            "rewards": [l["reward"] for l in meas], "phases_s_per_step": ph}


def summarize(runs: list[dict], rounds: int) -> dict:
    """Medians per implementation, mean phase breakdowns and paired (per-round) speedups of flowalign vs TRL."""
    impls = sorted({x["impl"] for x in runs})

    def med(impl, key):
        return median([x[key] for x in runs if x["impl"] == impl])

    def phase_means(impl):
        mine = [x["phases_s_per_step"] for x in runs if x["impl"] == impl]
        return {k: sum(p[k] for p in mine) / len(mine) for k in mine[0]}

    summary = {impl: {"steps_per_s_median": med(impl, "steps_per_s"),
                      "completion_tokens_per_s_median": med(impl, "completion_tokens_per_s"),
                      "phases_s_per_step_mean": phase_means(impl)}
               for impl in impls}

    def paired(key, base):  # median of per-round ratios (both ran back to back under the same load)
        ours, theirs = [], []
        for r in range(rounds):
            a = [x[key] for x in runs if x["impl"] == "flowalign" and x["round"] == r]
            b = [x[key] for x in runs if x["impl"] == base and x["round"] == r]
            if len(a) != 1 or len(b) != 1:
                raise ValueError(f"round {r}: need one flowalign and one {base} run, got {len(a)} and {len(b)}")
            ours.append(a[0])
            theirs.append(b[0])
        return paired_ratio(ours, theirs)

    for impl in impls:
        summary[impl]["steps_per_cpu_s_median"] = med(impl, "steps_per_cpu_s")
    summary["speedup_steps_per_s_paired_median"] = paired("steps_per_s", "trl")
    summary["speedup_tokens_per_s_paired_median"] = paired("completion_tokens_per_s", "trl")
    summary["speedup_steps_per_cpu_s_paired_median"] = paired("steps_per_cpu_s", "trl")
    if "trl_gc" in summary:
        summary["speedup_vs_trl_default_gc_steps_per_s_paired_median"] = paired("steps_per_s", "trl_gc")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["ours", "trl", "trl_gc"])
    ap.add_argument("--with-trl-default-gc", action="store_true",
                    help="also run TRL with its default gradient_checkpointing=True (reported separately)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--recompute", action="store_true",
                    help="rewrite the summary of --out from its stored per-round runs (no benchmark run)")
    args = ap.parse_args()
    if args.recompute:
        result = json.loads(Path(args.out).read_text())
        result["summary"] = summarize(result["runs"], int(result["setup"]["rounds"]))
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["summary"], indent=1))
        return
    if args.worker:
        import torch

        torch.set_num_threads(1)
        if args.worker == "ours":
            res = worker_ours(args.warmup, args.steps)
        else:
            res = worker_trl(args.warmup, args.steps, gradient_checkpointing=args.worker == "trl_gc")
        print("RESULT " + json.dumps(res))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    runs = []
    for r in range(args.rounds):
        order = ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]
        if args.with_trl_default_gc:
            order.insert(1, "trl_gc")
        for w in order:
            p = subprocess.run([sys.executable, __file__, "--worker", w, "--warmup", str(args.warmup),
                                "--steps", str(args.steps)], env=env, capture_output=True, text=True)
            line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if p.returncode or not line:
                raise SystemExit(f"worker {w} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            res = json.loads(line[0][7:])
            res["round"] = r
            runs.append(res)
            print(f"round {r} {res['impl']:>9}: {res['steps_per_s']:.3f} steps/s "
                  f"({res['steps_per_cpu_s']:.3f} per CPU-s), "
                  f"{res['completion_tokens_per_s']:.0f} completion tok/s, reward {res['mean_reward']:.3f}",
                  flush=True)

    summary = summarize(runs, args.rounds)
    import torch
    import transformers
    import trl

    result = {
        "setup": {"model": "embedded tiny Llama (flowalign/llm/weights)", "prompts_per_step": PROMPTS_PER_STEP,
                  "group_size": G, "rows_per_step": PROMPTS_PER_STEP * G, "max_new_tokens": MAX_NEW,
                  "threads": 1, "device": "cpu", "loss": "grpo (seq-mean-token-mean), beta 0",
                  "warmup_steps": args.warmup, "timed_steps": args.steps, "rounds": args.rounds,
                  "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "trl": trl.__version__, "python": platform.python_version()},
                  "machine": platform.machine(), "cpu_count": os.cpu_count()},
        "summary": summary, "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
