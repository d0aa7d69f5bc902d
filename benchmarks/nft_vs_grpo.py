"""DiffusionNFT vs Flow-GRPO (and GRPO-Guard) at equal compute on the shapes world (issue 11).

The DiffusionNFT paper (arXiv 2509.16117) reports "up to 25x" the efficiency of Flow-GRPO (GenEval 0.24 -> 0.98 in
1k steps vs 0.95 in 5k+ steps with CFG). Here each method trains the shipped shapes model with its own recipe
(``recipes/shapes_flow_grpo.yaml``, ``recipes/shapes_nft.yaml``, ``recipes/shapes_grpo_guard.yaml``; the same
prompts, round size, LoRA and evaluation) for ``--seconds`` of its own compute, round-robin, and is evaluated every
``--eval-every`` seconds on fixed noise: deterministic Euler samples (10 steps, CFG-free, live weights) of the 32 RL
prompts and the 44 held-out prompts x ``--seeds``, scored by the verifier (strict accuracy, partial clause accuracy).

Compute is this process's CPU time per iteration (single-threaded: the wall time of a dedicated core), so other
jobs on a shared machine do not decide the race; wall seconds are recorded too. Evaluation time is not counted.

Reported: the accuracy curves, the accuracy each method reached at equal compute, and the **efficiency ratio** =
compute Flow-GRPO needed to reach its final RL-prompt strict accuracy / compute DiffusionNFT needed to first reach
the same accuracy (> 1: NFT is faster; the paper's claim is 25). When NFT never reaches it the ratio is reported as
the inverse race (compute NFT needed for its own final accuracy / compute Flow-GRPO needed for it), below 1.

    python benchmarks/nft_vs_grpo.py --seconds 600 --eval-every 60
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"flow_grpo": "recipes/shapes_flow_grpo.yaml", "nft": "recipes/shapes_nft.yaml",
           "grpo_guard": "recipes/shapes_grpo_guard.yaml"}


def make_trainer(variant: str, out: Path, overrides: list[str]):
    from flowalign.config import load_config
    from flowalign.trainer import Trainer

    cfg = load_config(ROOT / RECIPES[variant], [
        f"output_dir={out / variant}", "max_iterations=100000", "max_minutes=null", "checkpoint.every=0",
        "checkpoint.save_final=false", "eval.every=0", "log.progress=false", *overrides])
    return Trainer(cfg)


@torch.no_grad()
def evaluate(trainer, prompts: dict[str, list[str]], seeds: int) -> dict[str, float]:
    """Strict / partial verifier accuracy of deterministic samples on fixed noise, with the live weights (an EMA
    that steps every k optimizer steps would lag differently for methods with different updates per iteration)."""
    from flowalign.methods.base import generator
    from flowalign.rewards.shapes import ShapesGenEval
    from flowalign.rollout import sample

    out = {}
    strict, partial = ShapesGenEval(mode="strict"), ShapesGenEval(mode="partial")
    trainer.module.eval()
    for split, ps in prompts.items():
        traj = sample(trainer.adapter, ps, group_size=seeds, num_steps=10, kernel="ode", noise_level=0.0,
                      guidance=1.0, generator=generator(1234, "bench", split), batch_size=128)
        images, names = traj.images.clamp(0, 1), traj.sample_prompts
        out[f"{split}_strict"] = float(strict(images, names).mean())
        out[f"{split}_partial"] = float(partial(images, names).mean())
    return out


def first_reach(curve: list[dict], key: str, target: float) -> float | None:
    """Compute (CPU s) at which ``curve`` first reaches ``target`` on ``key`` (linear between evaluations)."""
    prev = None
    for point in curve:
        if point[key] >= target:
            if prev is None or point[key] == prev[key]:
                return point["cpu_seconds"]
            frac = (target - prev[key]) / (point[key] - prev[key])
            return prev["cpu_seconds"] + frac * (point["cpu_seconds"] - prev["cpu_seconds"])
        prev = point
    return None


def efficiency(curves: dict[str, list[dict]], key: str = "rl_strict") -> dict:
    """Flow-GRPO's compute to reach its final accuracy / NFT's compute to reach the same (module docstring)."""
    grpo, nft = curves["flow_grpo"], curves["nft"]
    target = grpo[-1][key]
    t_grpo, t_nft = first_reach(grpo, key, target), first_reach(nft, key, target)
    if t_nft is not None and t_nft > 0:
        return {"target": target, "grpo_cpu_seconds": t_grpo, "nft_cpu_seconds": t_nft, "ratio": t_grpo / t_nft,
                "race": "nft reaches flow_grpo's final accuracy"}
    target = nft[-1][key]
    t_grpo, t_nft = first_reach(grpo, key, target), first_reach(nft, key, target)
    ratio = t_grpo / t_nft if t_grpo and t_nft else None
    return {"target": target, "grpo_cpu_seconds": t_grpo, "nft_cpu_seconds": t_nft, "ratio": ratio,
            "race": "flow_grpo reaches nft's final accuracy (nft never reached flow_grpo's)"}


def run(variants: list[str], seconds: float, eval_every: float, seeds: int, out: Path,
        overrides: list[str]) -> dict[str, list[dict]]:
    from flowalign import shapes

    prompts = {"rl": [p.strip() for p in (ROOT / "recipes/prompts/shapes_rl.txt").read_text().splitlines()
                      if p.strip()],
               "heldout": shapes.prompts(shapes.LEVELS[1], "heldout")}
    trainers = {v: make_trainer(v, out, overrides) for v in variants}
    spent, wall, next_eval = dict.fromkeys(variants, 0.0), dict.fromkeys(variants, 0.0), dict.fromkeys(variants, 0.0)
    curves: dict[str, list[dict]] = {v: [] for v in variants}

    def record(v: str) -> None:
        tr = trainers[v]
        point = {"cpu_seconds": spent[v], "wall_seconds": wall[v], "iterations": tr.state.iteration,
                 "samples": tr.state.samples, **evaluate(tr, prompts, seeds)}
        curves[v].append(point)
        print(f"{v:>10}  cpu {spent[v]:7.1f}s  it {tr.state.iteration:3d}  rl strict {point['rl_strict']:.3f}  "
              f"held-out strict {point['heldout_strict']:.3f}", flush=True)
        next_eval[v] += eval_every

    for v in variants:
        record(v)
    while any(spent[v] < seconds for v in variants):
        for v in variants:
            if spent[v] >= seconds:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            trainers[v].step()
            spent[v] += time.process_time() - c0
            wall[v] += time.perf_counter() - t0
            if spent[v] >= next_eval[v] or spent[v] >= seconds:
                record(v)
    for tr in trainers.values():
        tr.method.close()
    return curves


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="CPU seconds of training per method")
    ap.add_argument("--eval-every", type=float, default=60.0, help="CPU seconds of training between evaluations")
    ap.add_argument("--seeds", type=int, default=4, help="evaluation samples per prompt")
    ap.add_argument("--variants", nargs="+", default=["flow_grpo", "nft", "grpo_guard"], choices=list(RECIPES))
    ap.add_argument("--out", default="outputs/bench_nft_vs_grpo")
    ap.add_argument("--json", default="nft_vs_grpo", help="results name under benchmarks/results (or a path)")
    ap.add_argument("overrides", nargs="*", help="overrides for every recipe, e.g. sample.batch_size=32")
    args = ap.parse_args(argv)
    if "flow_grpo" not in args.variants or "nft" not in args.variants:
        ap.error("--variants must include flow_grpo and nft")
    torch.set_num_threads(1)
    curves = run(args.variants, args.seconds, args.eval_every, args.seeds, ROOT / args.out, args.overrides)
    eff = efficiency(curves)
    rows = [{"method": v, "iterations": c[-1]["iterations"], "samples": c[-1]["samples"],
             "cpu_s": c[-1]["cpu_seconds"], "wall_s": c[-1]["wall_seconds"],
             "rl_strict_start": c[0]["rl_strict"], "rl_strict_end": c[-1]["rl_strict"],
             "heldout_strict_start": c[0]["heldout_strict"], "heldout_strict_end": c[-1]["heldout_strict"],
             "rl_partial_end": c[-1]["rl_partial"]} for v, c in curves.items()]
    print(f"\n## shapes world, {args.seconds:.0f} CPU seconds of training per method\n")
    print(format_table(rows))
    ratio = eff["ratio"]
    print(f"\nefficiency ratio (Flow-GRPO compute / DiffusionNFT compute to the same RL strict accuracy "
          f"{eff['target']:.3f}): {'n/a' if ratio is None else f'{ratio:.2f}x'} ({eff['race']}); paper: up to 25x")
    path = write_json(args.json, {"seconds": args.seconds, "eval_every": args.eval_every, "seeds": args.seeds,
                                  "recipes": {v: RECIPES[v] for v in args.variants}, "overrides": args.overrides,
                                  "rows": rows, "curves": curves, "efficiency": eff, "paper_claim": 25.0})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
