"""Shared by the slow "method X raises the shapes-world verifier accuracy" tests.

``RELATION_PROMPTS`` are four relation prompts the shipped shapes model gets right about a third of the time (strict
accuracy ~0.2-0.35), so a handful of RL iterations has room to move them. ``train_on_relations`` trains a shipped
recipe on them (4 prompts x 16 samples per iteration, no EMA, no checkpoints) and returns the strict accuracy of
deterministic samples on fixed noise before and after, with the training history. The shipped recipes all start
from the same shipped model, so the "before" accuracy is computed once per session (``shared_cache``, see
``tests/conftest.py``) and reused by every learning test that asks for the same model and evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tests.conftest import SharedCache

ROOT = Path(__file__).resolve().parents[1]
RELATION_PROMPTS = ["a red triangle left of a blue triangle", "a blue square right of a green square",
                    "a blue triangle left of a green square", "a yellow triangle right of a blue square"]


def strict_accuracy(adapter, prompts: list[str], seeds: int = 32) -> torch.Tensor:
    """Verifier strict accuracy per sample of deterministic (Euler, 10 steps, CFG 1) samples on fixed noise."""
    from flowalign.methods.base import generator
    from flowalign.rewards.shapes import ShapesGenEval
    from flowalign.rollout import sample

    with torch.no_grad():
        traj = sample(adapter, prompts, group_size=seeds, num_steps=10, kernel="ode", noise_level=0.0,
                      generator=generator(123, "eval"), batch_size=128)
    return ShapesGenEval(mode="strict")(traj.images.clamp(0, 1), traj.sample_prompts)


def train_on_relations(recipe: str, tmp_path: Path, iterations: int, *overrides: str,
                       cache: SharedCache | None = None) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """``recipes/<recipe>`` for ``iterations`` rounds of the four relation prompts x 16 samples.

    Returns (accuracy before, accuracy after, per-iteration records); prints a one-line summary for the CI log.
    ``cache``: the session's ``shared_cache``; the accuracy before training is then computed once per model config
    (the first test computes it on its freshly built trainer, bit-identical to what the others would compute)."""
    from flowalign.config import load_config
    from flowalign.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(ROOT / "recipes" / recipe, [
        f"sample.prompts={json.dumps(RELATION_PROMPTS)}", "sample.prompts_per_round=4", "sample.group_size=16",
        "ema.enabled=false", "checkpoint.save_final=false", "checkpoint.every=0", f"max_iterations={iterations}",
        "log.progress=false", f"output_dir={tmp_path}", *overrides])
    trainer = Trainer(cfg)
    base = lambda: strict_accuracy(trainer.adapter, RELATION_PROMPTS)  # noqa: E731
    # the key: everything that fixes the untrained model and the evaluation (prompts, seeds, sampler, threads)
    key = json.dumps({"base_strict_accuracy": RELATION_PROMPTS, "model": cfg.to_dict()["model"], "threads": 1},
                     sort_keys=True)
    before = base() if cache is None else cache.get(key, base)
    history = trainer.train()
    after = strict_accuracy(trainer.adapter, RELATION_PROMPTS)
    print(f"{recipe}: strict accuracy {before.mean():.3f} -> {after.mean():.3f}; train reward "
          f"{[round(h['reward_mean'], 2) for h in history]}")
    return before, after, history


def reward_trend(history: list[dict], k: int = 3) -> float:
    """Mean training reward of the last ``k`` iterations minus that of the first ``k``."""
    first = sum(h["reward_mean"] for h in history[:k]) / k
    return sum(h["reward_mean"] for h in history[-k:]) / k - first
