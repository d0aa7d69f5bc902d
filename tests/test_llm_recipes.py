"""Every shipped ``recipes/llm_*.yaml`` trains end to end through the CLI (real steps, not ``--dry-run``).

Shortened by overrides (2 steps, 4 prompts x G, a tiny evaluation); each run must log finite losses, write its
checkpoint and change the weights. REINFORCE++ must run with its per-token KL in the reward (beta 0.01).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("llm_*.yaml"))


def test_all_presets_have_a_recipe():
    from flowalign.llm.config import PRESETS

    presets = {yaml.safe_load((ROOT / "recipes" / r).read_text())["algo"]["preset"] for r in RECIPES}
    assert presets == set(PRESETS)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_end_to_end(tmp_path, recipe, monkeypatch):
    from flowalign.cli import main

    monkeypatch.chdir(ROOT)
    torch.set_num_threads(1)
    out = tmp_path / "run"
    rc = main(["train", f"recipes/{recipe}", f"output_dir={out}", "train.steps=2", "rollout.prompts_per_step=4",
               "eval.num_prompts=8", "eval.every=0", "train.batch_size=64"])
    assert rc == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "eval" not in m]
    assert [m["step"] for m in steps] == [1, 2]
    trained = [m for m in steps if "loss" in m]
    assert trained, steps  # at least one real update (DAPO may skip a step without informative groups)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in trained)
    assert all(math.isfinite(m["reward"]) and m["tokens"] > 0 for m in trained)
    w0 = load_file(str(ROOT / "flowalign" / "llm" / "weights" / "model.safetensors"))
    w = load_file(str(out / "checkpoints" / "checkpoint-00000002" / "weights.safetensors"))
    moved = max((w[k] - w0[k]).abs().max().item() for k in w0)
    assert moved > 1e-5, f"{recipe}: weights did not change"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    if cfg["algo"]["preset"] == "reinforce_pp":
        a = cfg["algo"]
        assert a["beta"] == 0.01 and a["kl_in_reward"] and a["advantage"] == "reinforce_pp"
        kl = [m["kl_in_reward"] for m in trained]
        assert len(kl) == 2 and kl[0] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference
        assert kl[1] > 0  # step 2: the moved policy pays a per-token KL penalty in its reward
    if cfg["algo"]["preset"] == "mc_grpo":
        assert all(m["tokens"] > 0 for m in trained) and cfg["rollout"]["group_size"] == 4
