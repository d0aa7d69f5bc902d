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
from flowalign.eval import Variant, bootstrap_p_gain, run_eval
from flowalign.rewards import get_reward
from flowalign.trainer import train

pytestmark = pytest.mark.slow


def test_short_flow_grpo_run_raises_heldout_strict_accuracy(tmp_path):
    cfg = load_config("recipes/shapes_flow_grpo.yaml", [
        f"output_dir={tmp_path / 'run'}", "sample.batch_size=64",
        "max_iterations=10", "max_minutes=null",  # the same 10 iterations on any machine
        "checkpoint.every=0", "log.progress=false",  # one checkpoint, the final one: the aligned model
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
    p = bootstrap_p_gain(gain)
    print(f"held-out strict: base {base.mean():.3f} -> aligned {aligned.mean():.3f}, p = {p:.4f}")
    assert gain.mean() > 0.05
    assert p < 0.01
