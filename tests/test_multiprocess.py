"""Two CPU processes (gloo, spawned with torchrun) make the same update as one process with the same global batch.

The round has 3 groups of 4 in 6 chunks of 2, so process 0 samples group 0 and half of group 1 and process 1 the
rest: groups straddle processes. Rewards are all-gathered, advantages computed over the round, and the
globally-normalised gradients summed; 2 iterations x 2 optimizer steps with KL and EMA must agree to 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_trainer import tiny_cfg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    cfg = tiny_cfg(tmp_path, "sample.prompts_per_round=3", "sample.batch_size=2", "max_iterations=2",
                   "ema.interval=1", "checkpoint.save_final=true", "sample.num_steps=3")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(cfg.to_yaml())
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "flowalign.cli", "train", str(recipe), f"output_dir={one}"])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "flowalign.cli", "train", str(recipe), f"output_dir={two}"])

    c1, c2 = one / "checkpoints" / "checkpoint-00000002", two / "checkpoints" / "checkpoint-00000002"
    assert (c2 / "rng_0.pt").is_file() and (c2 / "rng_1.pt").is_file()  # really two ranks
    assert json.loads((c2 / "state.json").read_text())["world_size"] == 2
    for name in ("weights.safetensors", "ema.safetensors"):
        w1, w2 = load_file(str(c1 / name)), load_file(str(c2 / name))
        assert w1.keys() == w2.keys()
        diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
        assert diff <= 1e-5, f"{name}: max abs diff {diff}"
    moved = max(v.abs().max().item() for k, v in load_file(str(c1 / "weights.safetensors")).items() if "lora_B" in k)
    assert moved > 1e-4  # lora_B starts at 0: the update is far above the tolerance
    o1, o2 = torch.load(c1 / "optimizer.pt"), torch.load(c2 / "optimizer.pt")
    for k in o1["state"]:
        torch.testing.assert_close(o1["state"][k]["exp_avg"], o2["state"][k]["exp_avg"], atol=1e-6, rtol=0)
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert m1[0]["reward_mean"] == m2[0]["reward_mean"]  # same rollouts (noise per chunk, not per rank)
    assert m1[1]["reward_mean"] == pytest.approx(m2[1]["reward_mean"], abs=1e-5)
    assert m2[0]["samples"] == 12 and m2[0]["num_updates"] == 2
