"""Rollout overhead: flowalign's sampler with per-step log-probs vs the diffusers pipeline's own ``__call__``.

Tiny SD3 and tiny FLUX (``flowalign.pipelines.tiny``), batch 8 (8 prompts), 10 steps, CPU, fp32. Contenders, run
interleaved after a warm-up, median of ``--repeats``:

* ``pipeline``: ``pipe(prompts, num_inference_steps=10, output_type="latent")`` (CFG 4.5 for SD3, embedded
  guidance 3.5 for FLUX);
* ``rollout``: ``flowalign.rollout.sample(..., kernel="flow_sde")`` with the same guidance, recording every latent
  and log-prob, no decode; the prompt cache is cleared first so it encodes the prompts as the pipeline does;
* ``rollout (cached)``: the same with the prompt encodings cached (what a trainer re-using prompts sees).

``overhead``: the median over rounds of ``rollout / pipeline`` wall time (runs of one round are adjacent, so the
pairing cancels the load drifts of a shared machine; ``overhead_of_medians`` is the plain ratio of medians);
``overhead_cpu`` the same with process CPU time. Goal <= 1.10. Writes ``benchmarks/results/rollout_overhead.json``.

    OMP_NUM_THREADS=1 python benchmarks/rollout_overhead.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import format_table, interleaved, median, paired_ratio, write_json  # noqa: E402

from flowalign.pipelines import load_adapter, tiny  # noqa: E402
from flowalign.rollout import sample  # noqa: E402

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "three purple stars",
           "a small orange square", "a cat", "one blue circle above a red square", "two green circles"]
GUIDANCE = {"sd3": 4.5, "flux": 3.5}
GOAL = 1.10


def bench_family(family: str, steps: int, repeats: int, warmup: int) -> dict:
    res = tiny.RESOLUTION[family]
    adapter = load_adapter(family, tiny.cached(family), **res)
    pipe, g = adapter.pipe, GUIDANCE[family]

    def pipeline():
        pipe(PROMPTS, num_inference_steps=steps, guidance_scale=g, output_type="latent",
             generator=torch.Generator().manual_seed(0), **res)

    def rollout(cached: bool):
        if not cached:
            adapter.clear_encode_cache()
        sample(adapter, PROMPTS, num_steps=steps, kernel="flow_sde", noise_level=0.7, guidance=g,
               generator=torch.Generator().manual_seed(0), decode=False)

    times = interleaved({"pipeline": pipeline, "rollout": lambda: rollout(False),
                         "rollout_cached": lambda: rollout(True)}, repeats=repeats, warmup=warmup)
    wall = {k: v["wall"] for k, v in times.items()}
    cpu = {k: v["cpu"] for k, v in times.items()}
    return {"family": family, "batch": len(PROMPTS), "steps": steps, "guidance": g,
            "pipeline_s": median(wall["pipeline"]), "rollout_s": median(wall["rollout"]),
            "rollout_cached_s": median(wall["rollout_cached"]),
            "overhead": paired_ratio(wall["rollout"], wall["pipeline"]),
            "overhead_of_medians": median(wall["rollout"]) / median(wall["pipeline"]),
            "overhead_cpu": paired_ratio(cpu["rollout"], cpu["pipeline"]),
            "overhead_cached": paired_ratio(wall["rollout_cached"], wall["pipeline"]),
            "times": times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="rollout_overhead", help="results name or .json path")
    args = ap.parse_args(argv)

    rows = [bench_family(f, args.steps, args.repeats, args.warmup) for f in args.families]
    cols = ["family", "batch", "steps", "pipeline_s", "rollout_s", "overhead", "overhead_cpu", "overhead_cached"]
    print(format_table(rows, cols))
    path = write_json(args.out, {"benchmark": "rollout_overhead", "goal": GOAL, "device": "cpu",
                                 "repeats": args.repeats, "warmup": args.warmup, "results": rows})
    print(f"wrote {path}")
    worst = max(r["overhead"] for r in rows)
    print(f"worst overhead {worst:.3f}x (goal <= {GOAL:.2f}x): {'OK' if worst <= GOAL else 'ABOVE GOAL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
