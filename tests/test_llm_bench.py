"""benchmarks/llm_vs_trl.py summary: true medians (even round counts) and paired per-round speedups."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("llm_vs_trl", ROOT / "benchmarks" / "llm_vs_trl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(impl, r, sps, cpu, tok):
    return {"impl": impl, "round": r, "steps_per_s": sps, "steps_per_cpu_s": cpu, "completion_tokens_per_s": tok,
            "phases_s_per_step": {"a": sps, "b": 1.0}}


def test_summary_uses_true_medians_and_paired_ratios():
    mod = _bench()
    ours = [(4.0, 8.0, 40.0), (1.0, 6.0, 10.0), (3.0, 7.0, 30.0), (2.0, 9.0, 20.0)]
    trl = [(1.0, 4.0, 10.0), (1.0, 2.0, 10.0), (2.0, 2.0, 10.0), (1.0, 3.0, 10.0)]
    runs = [_run("flowalign", r, *v) for r, v in enumerate(ours)] + [_run("trl", r, *v) for r, v in enumerate(trl)]
    s = mod.summarize(runs, 4)
    assert s["flowalign"]["steps_per_s_median"] == 2.5  # (2 + 3) / 2, not the upper middle value 3
    assert s["trl"]["steps_per_cpu_s_median"] == 2.5
    assert s["flowalign"]["phases_s_per_step_mean"] == {"a": 2.5, "b": 1.0}
    # per-round ratios 4, 1, 1.5, 2 -> median (1.5 + 2) / 2; CPU 2, 3, 3.5, 3 -> 3
    assert s["speedup_steps_per_s_paired_median"] == 1.75
    assert s["speedup_steps_per_cpu_s_paired_median"] == 3.0
    assert "speedup_vs_trl_default_gc_steps_per_s_paired_median" not in s
    with pytest.raises(ValueError, match="round 3"):
        mod.summarize(runs[:-1], 4)


def test_committed_summary_matches_its_runs():
    mod = _bench()
    res = json.loads((ROOT / "benchmarks" / "results" / "llm_vs_trl.json").read_text())
    assert res["summary"] == mod.summarize(res["runs"], int(res["setup"]["rounds"]))
