"""Small shared helpers for the benchmark scripts: interleaved timing, medians, a table printer, a JSON writer.

Interleaving (A, B, B, A, ...) rather than timing all of A then all of B spreads slow drifts of a shared machine
(other jobs, CPU frequency) over every contender; the median of the repeats ignores the odd outlier.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int = 5,
                warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Time each ``fns[name]()`` over ``repeats`` interleaved rounds after ``warmup`` rounds.

    Returns ``{name: {"wall": [s, ...], "cpu": [s, ...]}}``: wall-clock and this process's CPU seconds (the latter
    is far less disturbed by other jobs on a shared machine when the work is single-threaded).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        for name in names if r % 2 == 0 else names[::-1]:  # ABBA order: no contender always runs first
            fn = fns[name]
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if r >= warmup:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(numer: Sequence[float], denom: Sequence[float]) -> float:
    """Median over rounds of ``numer[i] / denom[i]``: pairing runs of the same round cancels slow drifts."""
    if len(numer) != len(denom) or not numer:
        raise ValueError(f"need two equally long non-empty lists, got {len(numer)} and {len(denom)}")
    return median([a / b for a, b in zip(numer, denom)])


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".3f") -> str:
    """A GitHub-markdown table of ``rows`` (dicts), columns in order of ``columns`` or of the first row."""
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(name_or_path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` (plus ``machine()``) to ``benchmarks/results/<name>.json`` or the given path."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = RESULTS_DIR / f"{path.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, "machine": machine()}, indent=2) + "\n")
    return path
