"""BranchGRPO tree rollouts vs flat Flow-GRPO / DanceGRPO / MixGRPO at equal leaf count (issue 6).

One *iteration* is one ``Trainer.step()``: sampling, rewards, advantages and every optimizer update of the round.
All variants sample ``--prompts`` prompts x 16 leaves (samples) per prompt with 10 denoising steps and train with
the same denoiser batch cap, learning rate and clip range (no KL); they differ only in what the issue compares:

=====================  ==========================================================================================
flow_grpo              flat, flow_sde a=0.7, independent x_T, first 9 of 10 steps trained (flow_grpo default)
dance_grpo             flat, dance eta=0.3, shared x_T per group, a random 60% of the first 9 steps trained
mix_grpo               flat, flow_sde a=0.7, SDE/trained window of 4 sliding steps, ODE outside (MixGRPO)
branch_grpo            tree, dance eta=0.3, splits at steps 0, 2, 4, 6 into 2 -> 16 leaves, every edge trained
branch_grpo_deppru     + depth pruning: edges into depths 9 and 10 are not trained
branch_grpo_widpru     + width pruning: below the last split, only the best half of the branches is trained
branch_grpo_mix        + Mix: SDE on steps 0-3 and the split steps, ODE elsewhere (reference: fixed first window)
=====================  ==========================================================================================

Reported per variant (medians over interleaved repeats, ``benchmarks/common.py``): denoiser NFE per leaf while
sampling and while training (rows through the transformer; a split evaluates its parent once, siblings share the
parent's forward in training), wall and CPU seconds per iteration, and the ratios to flat Flow-GRPO and DanceGRPO
(single-threaded runs: on a shared machine the CPU-time ratio is the steadier measure of the same work).
``--equal-time S`` then trains every variant for ``S`` seconds of its own compute (CPU time of its iterations,
round-robin) and reports the ODE reward reached on fixed noise (shapes: the 32 RL prompts x 4).

    python benchmarks/tree_vs_flat.py --models flux shapes --repeats 3 --equal-time 240
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, interleaved, median, write_json

LEAVES, STEPS = 16, 10
FLAT = {"flow_grpo": {"kernel": "flow_sde", "noise_level": 0.7, "schedule": "all",
                      "schedule_options": {"fraction": 0.99}},
        "dance_grpo": {"kernel": "dance", "noise_level": 0.3, "same_noise": True, "schedule": "subsample",
                       "schedule_options": {"fraction": 0.6}},
        "mix_grpo": {"kernel": "flow_sde", "noise_level": 0.7, "schedule": "sliding",
                     "schedule_options": {"size": 4, "stride": 1, "shift_interval": 5}}}
TREE_SAMPLE = {"kernel": "dance", "noise_level": 0.3, "schedule": "branch",
               "schedule_options": {"branch_steps": [0, 2, 4, 6]}}
TREE = {"branch_grpo": {},
        "branch_grpo_deppru": {"depth_pruning": [9, 10]},
        "branch_grpo_widpru": {"width_pruning": "best"},
        "branch_grpo_mix": {"mix": {"schedule": "window", "size": 4, "lo": 0, "hi": 4}}}
VARIANTS = list(FLAT) + list(TREE)


def model_section(model: str) -> tuple[dict, dict, list[str], list[str], dict]:
    """(model, reward) config sections, train / eval prompts and train options for ``flux`` (tiny random FLUX +
    redness; timing only) or ``shapes`` (the pretrained shapes model + its verifier, as recipes/shapes_*.yaml)."""
    root = Path(__file__).resolve().parents[1]
    if model == "flux":
        from flowalign.pipelines import tiny

        prompts = ["a red apple", "a red car", "a red rose", "a red sky", "a red house", "a red bird"]
        return ({"adapter": "flux", "path": tiny.cached("flux"), "kwargs": dict(tiny.RESOLUTION["flux"]),
                 "lora": {"rank": 8}}, {"weights": {"redness": 1.0}}, prompts, ["a red boat", "a red door"],
                {"lr": 1e-2, "clip_range": 1e-2})
    if model == "shapes":
        rl = (root / "recipes" / "prompts" / "shapes_rl.txt").read_text().split("\n")
        rl = [p.strip() for p in rl if p.strip()]
        # eval: the RL prompts x 4 (fixed noise), i.e. the reward being optimised, with a small standard error
        return ({"adapter": "shapes", "path": str(root / "pipelines" / "weights" / "shapes"),
                 "lora": {"enabled": False}},  # full fine-tuning, as recipes/shapes_flow_grpo.yaml
                {"weights": {"shapes_geneval": 1.0}, "kwargs": {"shapes_geneval": {"mode": "strict+partial"}}},
                rl, rl * 4, {"lr": 3e-4, "clip_range": 1e-3})
    raise ValueError(f"model={model!r} is not allowed. Allowed: flux, shapes")


def make_config(model: str, variant: str, prompts_per_round: int, batch_size: int = LEAVES, seed: int = 0):
    from flowalign.config import load_config

    model_cfg, reward, prompts, eval_prompts, train_opts = model_section(model)
    tree = variant in TREE
    sample = {"prompts": prompts, "prompts_per_round": prompts_per_round, "group_size": LEAVES, "num_steps": STEPS,
              "guidance": 1.0, "batch_size": batch_size, **(TREE_SAMPLE if tree else FLAT[variant])}
    train = {"method": "branch_grpo" if tree else "flow_grpo", "train_cfg": False, "beta": 0.0,
             "updates_per_iteration": 2, "batch_size": batch_size, "method_options": TREE.get(variant, {}),
             # keep every group/tree: with a discrete verifier, dropping all-equal groups would make the work per
             # iteration depend on the round's rewards instead of on the method
             "advantage": {"drop_zero_std": False}, **train_opts}
    return load_config({"model": model_cfg, "sample": sample, "reward": {**reward, "background": False},
                        "train": train, "ema": {"enabled": False}, "seed": seed,
                        "eval": {"prompts": eval_prompts, "num_steps": STEPS, "batch_size": 64},
                        "checkpoint": {"save_final": False}, "log": {"progress": False},
                        "output_dir": f"outputs/bench_tree_vs_flat/{model}/{variant}", "max_iterations": 10**6})


class NFECounter:
    """Counts denoiser rows by phase: wraps ``adapter.predict`` and the method's ``collect`` / ``loss``."""

    def __init__(self, trainer) -> None:
        self.rows = {"sample": 0, "train": 0}
        self.phase = "sample"
        adapter, method = trainer.adapter, trainer.method
        predict, collect, loss = adapter.predict, method.collect, method.loss

        def counted_predict(x, *a, **k):
            self.rows[self.phase] += x.shape[0]
            return predict(x, *a, **k)

        def counted_collect(*a, **k):
            self.phase = "sample"
            return collect(*a, **k)

        def counted_loss(*a, **k):
            self.phase = "train"
            return loss(*a, **k)

        adapter.predict, method.collect, method.loss = counted_predict, counted_collect, counted_loss

    def take(self) -> dict[str, int]:
        out, self.rows = self.rows, {"sample": 0, "train": 0}
        return out


def per_iteration(model: str, prompts: int, repeats: int) -> tuple[list[dict], dict]:
    from flowalign.trainer import Trainer

    trainers, counters, records = {}, {}, {v: [] for v in VARIANTS}
    for v in VARIANTS:
        trainers[v] = Trainer(make_config(model, v, prompts))
        counters[v] = NFECounter(trainers[v])

    def run(v):
        def fn():
            rec = trainers[v].step()
            records[v].append({**rec, **{f"nfe_{k}": n for k, n in counters[v].take().items()}})
        return fn

    times = interleaved({v: run(v) for v in VARIANTS}, repeats=repeats, warmup=1)
    rows = []
    leaves = prompts * LEAVES
    for v in VARIANTS:
        recs = records[v][1:]  # drop the warm-up round
        row = {"variant": v, "sample_nfe_per_leaf": median([r["nfe_sample"] for r in recs]) / leaves,
               "train_nfe_per_leaf": median([r["nfe_train"] for r in recs]) / leaves,
               "wall_s": median(times[v]["wall"]), "cpu_s": median(times[v]["cpu"]),
               "sample_s": median([r["time/collect"] for r in recs]),
               "train_s": median([r["time/train"] for r in recs])}
        if v in TREE:
            row["trained_edges_per_tree"] = median([r["trained_edges_per_tree"] for r in recs])
            row["pruned_frac"] = median([r["pruned_frac"] for r in recs])
        row["nfe_per_leaf"] = row["sample_nfe_per_leaf"] + row["train_nfe_per_leaf"]
        rows.append(row)
    by = {r["variant"]: r for r in rows}
    for r in rows:
        for base in ("flow_grpo", "dance_grpo"):
            r[f"nfe_vs_{base}"] = r["nfe_per_leaf"] / by[base]["nfe_per_leaf"]
            r[f"wall_vs_{base}"] = r["wall_s"] / by[base]["wall_s"]
            r[f"cpu_vs_{base}"] = r["cpu_s"] / by[base]["cpu_s"]
    for t in trainers.values():
        t.method.close()
    return rows, {"repeats": repeats, "raw_wall": {v: times[v]["wall"] for v in VARIANTS}}


def recipe_config(recipe: str):
    """A shipped recipe for the equal-compute race: no time/iteration limits, no checkpoints, eval on the RL
    prompts x 4 with fixed noise (the reward being optimised)."""
    from flowalign.config import load_config, load_prompts

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / recipe)
    rl, _ = load_prompts(cfg.sample.prompts) if isinstance(cfg.sample.prompts, str) else (cfg.sample.prompts, None)
    name = Path(recipe).stem
    return load_config(root / recipe, [
        "max_iterations=1000000", "max_minutes=null", "checkpoint.every=0", "checkpoint.save_final=false",
        "log.progress=false", f"output_dir=outputs/bench_tree_vs_flat/recipes/{name}", "eval.batch_size=64",
        "eval.prompts=[" + ", ".join(rl * 4) + "]"])


def equal_time(model: str, prompts: int, seconds: float, variants: list[str], batch_size: int,
               recipes: list[str] | None = None) -> list[dict]:
    """Train each variant for ``seconds`` of its own compute, round-robin; ODE reward (fixed noise) before and after.

    The budget is this process's CPU time per iteration (single-threaded: the wall time of a dedicated core), so
    other jobs on a shared machine do not decide the race; wall seconds are recorded too.
    """
    from flowalign.trainer import Trainer

    if recipes:
        variants = [Path(r).stem for r in recipes]
        trainers = {Path(r).stem: Trainer(recipe_config(r)) for r in recipes}
    else:
        trainers = {v: Trainer(make_config(model, v, prompts, batch_size)) for v in variants}
    spent = {v: 0.0 for v in variants}
    wall = {v: 0.0 for v in variants}
    start = {v: trainers[v].evaluate()["eval/reward"] for v in variants}
    while any(spent[v] < seconds for v in variants):
        for v in variants:
            if spent[v] < seconds:
                t0, c0 = time.perf_counter(), time.process_time()
                trainers[v].step()
                spent[v] += time.process_time() - c0
                wall[v] += time.perf_counter() - t0
    rows = []
    for v in variants:
        end = trainers[v].evaluate()["eval/reward"]
        rows.append({"variant": v, "cpu_seconds": spent[v], "wall_seconds": wall[v],
                     "iterations": trainers[v].state.iteration, "samples": trainers[v].state.samples,
                     "eval_reward_start": start[v], "eval_reward_end": end, "gain": end - start[v]})
        trainers[v].method.close()
    return rows


def shapes_available() -> bool:
    weights = Path(__file__).resolve().parents[1] / "pipelines" / "weights" / "shapes" / "model_index.json"
    return importlib.util.find_spec("flowalign.pipelines.shapes") is not None and weights.is_file()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["flux", "shapes"])
    ap.add_argument("--prompts", type=int, default=2, help="prompts (trees) per iteration")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--equal-time", type=float, default=0.0, help="seconds of training per variant (0 = skip)")
    ap.add_argument("--equal-time-model", default="shapes")
    ap.add_argument("--equal-time-prompts", type=int, default=8, help="prompts (trees) per iteration")
    ap.add_argument("--equal-time-batch", type=int, default=64, help="rows per denoiser forward")
    ap.add_argument("--equal-time-variants", nargs="+",
                    default=["flow_grpo", "dance_grpo", "branch_grpo", "branch_grpo_deppru"])
    ap.add_argument("--equal-time-recipes", nargs="*", default=[],
                    help="race these shipped recipes instead (e.g. recipes/shapes_flow_grpo.yaml recipes/shapes_branch"
                         ".yaml); --equal-time-model/-prompts/-batch/-variants are then ignored")
    ap.add_argument("--only-equal-time", action="store_true", help="skip the per-iteration tables")
    ap.add_argument("--merge", action="store_true", help="update benchmarks/results/<out>.json instead of replacing")
    ap.add_argument("--out", default="tree_vs_flat")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    results: dict = {"leaves_per_prompt": LEAVES, "num_steps": STEPS, "prompts_per_iteration": args.prompts,
                     "variants": {**{k: {"sample": v} for k, v in FLAT.items()},
                                  **{k: {"sample": TREE_SAMPLE, "method_options": v} for k, v in TREE.items()}},
                     "per_iteration": {}, "paper": {"danceGRPO_s": 698, "branchGRPO_pruned_s": 314,
                                                    "branchGRPO_mix_s": 148, "ratio_pruned": 314 / 698,
                                                    "ratio_mix": 148 / 698}}
    for model in ([] if args.only_equal_time else args.models):
        if model == "shapes" and not shapes_available():
            print("shapes model not available (pipelines/shapes.py, pipelines/weights/shapes); skipped",
                  file=sys.stderr)
            continue
        rows, raw = per_iteration(model, args.prompts, args.repeats)
        results["per_iteration"][model] = {"rows": rows, **raw}
        print(f"\n## {model}: per iteration ({args.prompts} prompts x {LEAVES} leaves, {STEPS} steps)\n")
        print(format_table(rows, ["variant", "sample_nfe_per_leaf", "train_nfe_per_leaf", "nfe_per_leaf", "wall_s",
                                  "cpu_s", "nfe_vs_flow_grpo", "wall_vs_flow_grpo", "cpu_vs_flow_grpo",
                                  "nfe_vs_dance_grpo", "wall_vs_dance_grpo", "cpu_vs_dance_grpo"]))
    if args.equal_time > 0:
        model = args.equal_time_model
        if model == "shapes" and not shapes_available():
            model = "flux"
        rows = equal_time(model, args.equal_time_prompts, args.equal_time, args.equal_time_variants,
                          args.equal_time_batch, args.equal_time_recipes)
        key = "equal_time_recipes" if args.equal_time_recipes else "equal_time"
        results[key] = {"model": model, "seconds": args.equal_time, "prompts": args.equal_time_prompts,
                        "batch_size": args.equal_time_batch, "recipes": args.equal_time_recipes, "rows": rows}
        print(f"\n## {model}: ODE reward after {args.equal_time:.0f} CPU seconds of training each\n")
        print(format_table(rows))
    if args.merge:  # keep the other models' / races' results of an earlier run
        from common import RESULTS_DIR

        old_path = RESULTS_DIR / f"{args.out}.json"
        if old_path.is_file():
            old = json.loads(old_path.read_text())
            old.pop("machine", None)
            merged = {**old.get("per_iteration", {}), **results["per_iteration"]}
            results = {**old, **results, "per_iteration": merged}
    path = write_json(args.out, results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
