"""The embedded default end to end: base vs Flow-GRPO-aligned accuracy on the shapes world, wall time, images/s.

    python benchmarks/shapes_demo.py [--minutes 10]      # what `make demo` runs, plus the learning curve

Writes ``benchmarks/results/shapes_demo.json``: strict/partial accuracy (bootstrap 95% CI) of base and aligned on
the RL prompts and on held-out prompts, the per-iteration reward curve with the zero-std fraction (groups whose
samples all scored the same and so give Flow-GRPO no signal), the wall time split and images/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, machine, write_json  # noqa: E402

from flowalign.demo import demo_main  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--out", default="outputs/bench_shapes_demo")
    args, overrides = p.parse_known_args(argv)
    t0 = time.time()
    demo_main(["--out", args.out, *(["--minutes", str(args.minutes)] if args.minutes else []), *overrides])
    wall = time.time() - t0
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    run_dir = Path(summary["checkpoint"]).parent.parent
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in logs if "reward_mean" in r]
    curve = [{k: r.get(k) for k in ("iteration", "reward_mean", "reward_std", "zero_std_frac", "kept_frac",
                                    "approx_kl", "clipfrac", "time/sample", "time/reward", "time/train",
                                    "images_per_s")} for r in train]
    rows = []
    for split, per_variant in summary["accuracy"].items():
        for variant, acc in per_variant.items():
            rows.append({"prompts": split, "model": variant, "strict": acc["strict"]["mean"],
                         "strict_lo": acc["strict"]["lo"], "strict_hi": acc["strict"]["hi"],
                         "partial": acc["partial"]["mean"]})
    print(format_table(rows))
    gains = {split: per["aligned"]["strict"]["mean"] - per["base"]["strict"]["mean"]
             for split, per in summary["accuracy"].items()}
    print("strict gain (points):", {k: round(100 * v, 1) for k, v in gains.items()},
          "paired bootstrap p:", summary["strict_gain_p"], f"wall {wall / 60:.1f} min,",
          f"{summary['train_images_per_s']} training images/s")
    write_json("shapes_demo", {"machine": machine(), "wall_minutes": wall / 60, "summary": summary,
                               "strict_gain": gains, "strict_gain_p": summary["strict_gain_p"],
                               "train_images_per_s": summary["train_images_per_s"], "table": rows, "curve": curve})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
