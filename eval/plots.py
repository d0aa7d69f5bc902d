"""Training curves from the trainer's JSONL logs, and the eval summary as a bar chart (matplotlib, Agg).

A log line is a JSON object of scalars for one step (nested objects are flattened with ``/``); the x axis is the
first of ``step``, ``global_step``, ``iteration``, ``epoch`` present, else the line number. Each metric gets one
figure with every run overlaid (raw values faint, an exponential moving average on top).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display; also safe when a test process already imported pyplot
import matplotlib.pyplot as plt  # noqa: E402

X_KEYS = ("step", "global_step", "iteration", "epoch")
SKIP_KEYS = set(X_KEYS) | {"time", "timestamp", "wall_time", "elapsed", "lr_step"}


def _flatten(obj: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def read_log(path: str | Path) -> tuple[list[float], dict[str, list[tuple[float, float]]]]:
    """``(x values, {metric: [(x, y), ...]})`` of one JSONL log; unparsable lines (a torn tail) are skipped."""
    series: dict[str, list[tuple[float, float]]] = {}
    xs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, Mapping):
            continue
        flat = _flatten(obj)
        x = next((flat[k] for k in X_KEYS if k in flat), float(n))
        xs.append(x)
        for k, y in flat.items():
            if k not in SKIP_KEYS:
                series.setdefault(k, []).append((x, y))
    return xs, series


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """``s_t = alpha s_{t-1} + (1 - alpha) y_t`` with bias correction (as TensorBoard's smoothing)."""
    out, s = [], 0.0
    for t, y in enumerate(values, 1):
        s = alpha * s + (1 - alpha) * y
        out.append(s / (1 - alpha**t) if alpha > 0 else y)
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def plot_training_curves(logs: Sequence[str | Path] | Mapping[str, str | Path], out_dir: str | Path,
                         keys: Sequence[str] | None = None, fmt: str = "svg", smooth: float = 0.6,
                         max_plots: int = 24) -> list[Path]:
    """One figure per metric (``keys``, or every metric logged, rewards and losses first), all runs overlaid.

    ``logs`` maps run names to JSONL paths (a list uses each file's parent folder name). Returns the files."""
    if fmt not in ("svg", "png"):
        raise ValueError(f"fmt={fmt!r} is not allowed. Allowed: svg, png")
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    runs = dict(logs) if isinstance(logs, Mapping) else {Path(p).parent.name or Path(p).stem: p for p in logs}
    data = {name: read_log(p)[1] for name, p in runs.items()}
    metrics = list(keys) if keys else sorted({k for s in data.values() for k in s},
                                             key=lambda k: (not any(t in k for t in ("reward", "loss", "eval")), k))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, metric in enumerate(metrics[:max_plots]):
        fig, ax = plt.subplots(figsize=(4.2, 2.8), dpi=100)
        for j, (run, series) in enumerate(data.items()):
            pts = series.get(metric)
            if not pts:
                continue
            x, y = zip(*pts)
            color = f"C{j % 10}"
            if smooth and len(y) > 2:
                ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(x, ema(y, smooth), color=color, linewidth=1.6, label=run)
            else:
                ax.plot(x, y, color=color, linewidth=1.6, marker="o" if len(y) < 20 else None, ms=3, label=run)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(data) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"curve_{i:02d}_{_safe(metric)}.{fmt}"
        fig.savefig(path)
        plt.close(fig)
        files.append(path)
    return files


def plot_summary(summary: Mapping, out_dir: str | Path, fmt: str = "svg") -> list[Path]:
    """One bar chart per reward: each variant's mean with its bootstrap CI as error bars."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, reward in enumerate(summary.get("rewards", [])):
        entries = [e for e in summary["table"] if e["reward"] == reward]
        if not entries:
            continue
        means = [e["mean"]["mean"] for e in entries]
        err = [[m - e["mean"]["lo"] for m, e in zip(means, entries)],
               [e["mean"]["hi"] - m for m, e in zip(means, entries)]]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(entries), 2.8), dpi=100)
        ax.bar(range(len(entries)), means, yerr=err, capsize=4, color=[f"C{j % 10}" for j in range(len(entries))])
        ax.set_xticks(range(len(entries)), [e["variant"] for e in entries], rotation=20, fontsize=7, ha="right")
        ax.set_title(f"{reward} (mean, {int(summary.get('confidence', 0.95) * 100)}% CI)", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / f"summary_{i:02d}_{_safe(reward)}.{fmt}"
        fig.savefig(path)
        plt.close(fig)
        files.append(path)
    return files
