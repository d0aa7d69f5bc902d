"""The embedded default learns: a shortened Flow-GRPO run on the shipped shapes model raises held-out strict accuracy.

Held-out prompts are unseen combinations (see ``flowalign.shapes``); base and aligned sample with the same seeds
(shared initial noise), so the test is paired: a prompt-clustered bootstrap of the per-prompt accuracy gain must
put less than 1% of its mass at or below zero (p < 0.01).
"""

from __future__ import annotations

import numpy as np
import pytest

from flowalign.checkpoint import list_checkpoints
from flowalign.config import load_config, load_prompts
from flowalign.eval import Variant, run_eval
from flowalign.rewards import get_reward
from flowalign.trainer import train

pytestmark = pytest.mark.slow


def paired_bootstrap_p(gain_per_prompt: np.ndarray, n_resamples: int = 20_000, seed: int = 0) -> float:
    """One-sided bootstrap p-value of mean gain <= 0, resampling prompts (Efron & Tibshirani 1993, §16.4)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(gain_per_prompt), size=(n_resamples, len(gain_per_prompt)))
    means = gain_per_prompt[idx].mean(axis=1)
    return float((means <= 0).mean())


def test_paired_bootstrap_p_matches_simple_cases():
    assert paired_bootstrap_p(np.ones(10)) == 0.0
    assert paired_bootstrap_p(-np.ones(10)) == 1.0
    p = paired_bootstrap_p(np.array([1.0, -1.0] * 20))
    assert 0.4 < p < 0.65  # symmetric around zero (ties at 0 count as "not better")


def test_short_flow_grpo_run_raises_heldout_strict_accuracy(tmp_path):
    cfg = load_config("recipes/shapes_flow_grpo.yaml", [
        f"output_dir={tmp_path / 'run'}", "sample.batch_size=64",
        "max_iterations=10", "max_minutes=8", "checkpoint.every=0", "log.progress=false",
    ])
    train(cfg)
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    model = f"{cfg.model.adapter}:{cfg.model.path}"
    prompts = load_prompts(cfg.eval.prompts)[0]
    res = run_eval([Variant("base", model), Variant("aligned", model, lora=str(ckpt))], prompts, "0-3",
                   {"v": get_reward("shapes_geneval", mode="strict")}, num_steps=cfg.sample.num_steps,
                   guidance=cfg.sample.guidance, batch_size=64, progress=False)
    acc = {(r["variant"], r["prompt"], r["seed"]): r["value"] for r in res.rows}
    base = np.array([np.mean([acc["base", p, s] for s in range(4)]) for p in prompts])
    aligned = np.array([np.mean([acc["aligned", p, s] for s in range(4)]) for p in prompts])
    gain = aligned - base
    p = paired_bootstrap_p(gain)
    print(f"held-out strict: base {base.mean():.3f} -> aligned {aligned.mean():.3f}, p = {p:.4f}")
    assert gain.mean() > 0.05
    assert p < 0.01
