"""Peak memory and step time of reward backprop vs the number of sampling steps (10, 20, 40).

One training step = ``method.loss(batch)`` (sampling, decode, reward) + ``backward``, on the shapes-world model
(``SD3Transformer2DModel``, pixel space 3x32x32; the shipped weights when present, else the same architecture with
random weights -- memory and time do not depend on the values), LoRA (adapter defaults: rank 16 on attention),
``shapes_proxy`` reward, Euler ODE, batch 4, no CFG, CPU fp32 (or the GPU when one is present). Contenders:

* ``full_chain``: AlignProp with ``truncation: none`` and no checkpointing (plain backprop through every step),
* ``full_chain_ckpt``: the same with every denoiser call checkpointed (``use_reentrant=False``),
* ``draft_k1``: DRaFT-K with K=1, ``refl``: ReFL (one grad step in the last quarter), ``leapalign``: LeapAlign.

Memory: on CPU the peak of live tensor bytes allocated during the step (``flowalign.diff_sampling.PeakMemory``: a
dispatch-mode tracker; exact, allocator-independent) and, as a coarse cross-check, the RSS high-water-mark delta
(the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the OS; it only sees
fresh pages, so steps whose allocations fit in pages the process already holds read ~0 there); on CUDA
``max_memory_allocated`` above the allocation at the start. Each configuration runs once as warm-up, once under the
memory tracker, then ``--repeats`` interleaved timed rounds (ABBA order over contenders, median; ``benchmarks.common``).

Goals (issue 7): LeapAlign peak <= 0.35 x full-chain peak at 20 steps, and flat (within 10%) from 10 to 40 steps.
Writes ``benchmarks/results/backprop_memory.json`` and ``backprop_memory.png`` (peak memory vs steps).

    OMP_NUM_THREADS=1 python benchmarks/backprop_memory.py [--repeats 3] [--batch 4] [--steps 10 20 40]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
    # freed tensors must go back to the OS for the RSS cross-check to mean anything: re-exec with glibc's mmap
    # threshold at 64 KiB (set before the process starts; it cannot be changed from Python afterwards)
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS_DIR, format_table, interleaved, median, write_json  # noqa: E402

from flowalign import diff_sampling as ds  # noqa: E402
from flowalign.config import load_config  # noqa: E402
from flowalign.methods import METHODS, TrainState  # noqa: E402
from flowalign.pipelines.shapes import ShapesAdapter, build_pipeline  # noqa: E402
from flowalign.trainer import apply_lora, build_reward, lora_settings  # noqa: E402

CONTENDERS = {
    "full_chain": ("alignprop", {"truncation": "none", "checkpoint": False}),
    "full_chain_ckpt": ("alignprop", {"truncation": "none", "checkpoint": True}),
    "draft_k1": ("draft", {"k": 1}),
    "refl": ("refl", {}),
    "leapalign": ("leapalign", {}),
}
PROMPTS = ["a red circle left of a blue square", "two green triangles", "a yellow square", "two red circles"]
GOAL_RATIO, GOAL_FLAT = 0.35, 0.10


def make_cfg(method: str, options: dict, steps: int, batch: int):
    return load_config({
        "model": {"adapter": "shapes", "path": ShapesAdapter.default_weights()},
        "sample": {"prompts": PROMPTS, "prompts_per_round": batch, "group_size": 1, "batch_size": batch,
                   "num_steps": steps, "kernel": "ode", "noise_level": 0.0, "guidance": 1.0},
        "reward": {"weights": {"shapes_proxy": 1.0}},
        "train": {"method": method, "method_options": {**options, "grad_norms": False}, "updates_per_iteration": 1},
    })


def load_adapter(device: torch.device) -> tuple[ShapesAdapter, str]:
    path = Path(ShapesAdapter.default_weights())
    if (path / "model_index.json").exists():
        adapter, weights = ShapesAdapter.from_pretrained(str(path), device=device), "pretrained"
    else:
        adapter, weights = ShapesAdapter(build_pipeline(seed=0).to(device)), "random (weights not shipped yet)"
    apply_lora(adapter.trainable_module(), lora_settings(make_cfg("leapalign", {}, 10, 1), adapter))
    return adapter, weights


def step_fn(adapter, cfg, device):
    method = METHODS.get(cfg.train.method)(cfg, adapter, build_reward(cfg, device))
    batch = method.collect(TrainState()).batches[0]
    params = [p for p in adapter.trainable_module().parameters() if p.requires_grad]

    def run() -> None:
        loss, _ = method.loss(batch)
        loss.backward()
        for p in params:
            p.grad = None

    return run


def plot(results: dict, steps: list[int], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles = zip("os^vD", ["-", "-", "--", ":", "-"])  # draft_k1 and refl coincide: dashed / dotted
    for name, (marker, line) in zip(CONTENDERS, styles):
        ax.plot(steps, [results[name][str(n)]["peak_mb"] for n in steps], marker=marker, linestyle=line, label=name)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("peak memory of one step (MiB)")
    ax.set_yscale("log")
    ax.set_xticks(steps)
    ax.set_title(f"Reward backprop: peak memory vs steps ({device})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS_DIR / "backprop_memory.json"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    adapter, weights = load_adapter(device)

    results: dict[str, dict[str, dict]] = {name: {} for name in CONTENDERS}
    for n in args.steps:
        fns = {name: step_fn(adapter, make_cfg(m, o, n, args.batch), device) for name, (m, o) in CONTENDERS.items()}
        for name, fn in fns.items():
            fn()  # warm-up (allocator, caches)
            mem = ds.measure(fn, device)
            results[name][str(n)] = {"peak_mb": mem["peak_mb"], "rss_peak_mb": mem["rss_peak_mb"]}
        times = interleaved(fns, repeats=args.repeats, warmup=0)
        for name in fns:
            results[name][str(n)].update({"wall_s": median(times[name]["wall"]), "cpu_s": median(times[name]["cpu"])})
        print(f"steps={n}: " + ", ".join(f"{k} {results[k][str(n)]['peak_mb']:.1f} MiB" for k in fns), flush=True)

    mid = str(20 if 20 in args.steps else args.steps[len(args.steps) // 2])
    lo, hi = str(min(args.steps)), str(max(args.steps))
    leap, full = results["leapalign"], results["full_chain"]
    summary = {
        f"leapalign_over_full_chain_peak_at_{mid}": leap[mid]["peak_mb"] / full[mid]["peak_mb"],
        f"leapalign_peak_{hi}_over_{lo}": leap[hi]["peak_mb"] / leap[lo]["peak_mb"],
        f"full_chain_peak_{hi}_over_{lo}": full[hi]["peak_mb"] / full[lo]["peak_mb"],
    }
    summary["goal_ratio_met"] = summary[f"leapalign_over_full_chain_peak_at_{mid}"] <= GOAL_RATIO
    summary["goal_flat_met"] = abs(summary[f"leapalign_peak_{hi}_over_{lo}"] - 1) <= GOAL_FLAT

    rows = [{"method": name, "steps": int(n), **vals} for name, per in results.items() for n, vals in per.items()]
    print(format_table(rows, ["method", "steps", "peak_mb", "rss_peak_mb", "wall_s", "cpu_s"], floatfmt=".2f"))
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()})
    out = Path(args.out)
    write_json(out, {
        "benchmark": "backprop_memory", "device": str(device), "weights": weights, "batch": args.batch,
        "steps": args.steps, "repeats": args.repeats, "contenders": {k: {"method": m, "options": o}
                                                                      for k, (m, o) in CONTENDERS.items()},
        "memory_measure": ("cuda max_memory_allocated" if device.type == "cuda" else
                           "peak live tensor bytes (dispatch-mode tracker); rss_peak_mb = VmHWM delta with "
                           "MALLOC_MMAP_THRESHOLD_=65536 (coarse: reads ~0 when a step fits in pages already "
                           "resident)"),
        "time_measure": "median over interleaved rounds; cpu_s = process CPU time (robust on a shared machine), "
                        "wall_s = wall clock",
        "goals": {"leapalign_over_full_chain_at_20": f"<= {GOAL_RATIO}", "leapalign_flat_10_to_40": f"within "
                  f"{GOAL_FLAT:.0%}"},
        "summary": summary, "results": results,
    })
    plot(results, args.steps, out.with_suffix(".png"), str(device))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
