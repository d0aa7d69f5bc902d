"""Two CPU processes (gloo) make the same update as one process with the same global batch.

The round has 3 groups of 4 in 6 chunks of 2, so process 0 samples group 0 and half of group 1 and process 1 the
rest: groups straddle processes. Rewards are all-gathered, advantages computed over the round, and the
globally-normalised gradients summed; 2 iterations x 2 optimizer steps with KL and EMA must agree to 1e-5.
Launched with torchrun, with ``accelerate launch`` (data-parallel) and with ``accelerate launch --use_fsdp``
(FSDP2 shards, gradients reduce-scattered by FSDP); FSDP checkpoints resume under FSDP and in one process.

On a machine without GPUs, ``accelerate launch --multi_gpu`` / ``--use_fsdp`` start the processes through torchrun
and the trainer sets up gloo; ``accelerate launch --cpu --num_processes 2`` would start ONE process (accelerate's
multi-CPU launch needs ``mpirun`` and ``--mpirun_hostfile``).
"""

from __future__ import annotations

import json
import os
import socket
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate(*flags: str) -> list[str]:
    """``accelerate launch`` of the CLI on 2 CPU processes (``cpu=true``: gloo even where GPUs exist)."""
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2", "--num_machines",
            "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "flowalign.cli", "train"]


def _assert_same(c1: Path, c2: Path) -> None:
    """Weights, EMA and Adam moments of two checkpoints agree (and the update is far above the tolerance)."""
    for name in ("weights.safetensors", "ema.safetensors"):
        w1, w2 = load_file(str(c1 / name)), load_file(str(c2 / name))
        assert w1.keys() == w2.keys()
        diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
        assert diff <= 1e-5, f"{name}: max abs diff {diff}"
    moved = max(v.abs().max().item() for k, v in load_file(str(c1 / "weights.safetensors")).items() if "lora_B" in k)
    assert moved > 1e-4  # lora_B starts at 0: the update is far above the tolerance
    o1, o2 = torch.load(c1 / "optimizer.pt"), torch.load(c2 / "optimizer.pt")
    assert o1["state"].keys() == o2["state"].keys()
    for k in o1["state"]:
        assert type(o2["state"][k]["exp_avg"]) is torch.Tensor  # whole tensors, not FSDP shards
        torch.testing.assert_close(o1["state"][k]["exp_avg"], o2["state"][k]["exp_avg"], atol=1e-6, rtol=0)


def _one_process_run(tmp: Path) -> None:
    cfg = tiny_cfg(tmp, "sample.prompts_per_round=3", "sample.batch_size=2", "max_iterations=2", "ema.interval=1",
                   "checkpoint.every=1", "sample.num_steps=3", "cpu=true",
                   # the Bessel std these 1e-5 equality bounds were set with (flow_grpo's ddof 0 scales the
                   # advantages by sqrt(4/3), and Adam's reduction-order noise grew to 1.7e-5 on one weight)
                   "train.advantage.ddof=1")
    # eval after iteration 2 on 3 prompts: the 2 ranks evaluate different counts (FSDP: with gathered weights)
    cfg.eval.every, cfg.eval.prompts, cfg.eval.num_steps = 2, ["a red apple", "a blue sky", "a green leaf"], 3
    recipe = tmp / "r.yaml"
    recipe.write_text(cfg.to_yaml())
    _run([sys.executable, "-m", "flowalign.cli", "train", str(recipe), f"output_dir={tmp / 'one'}"])


@pytest.fixture(scope="session")
def one_process(shared_cache) -> tuple[Path, Path]:
    """The recipe, and a one-process run of it (checkpoints after iterations 1 and 2): run once per session, by
    whichever xdist worker gets to it first, for all three multi-process tests."""
    tmp = shared_cache.directory("test_multiprocess.one_process", _one_process_run)
    return tmp / "r.yaml", tmp / "one" / "checkpoints"


def _ckpt(run: Path, it: int) -> Path:
    return run / "checkpoints" / f"checkpoint-{it:08d}"


def _eval_reward(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["eval/reward"] for r in rows if "eval/reward" in r)


@pytest.mark.slow
def test_accelerate_launch_two_processes_match_one(one_process, tmp_path):
    recipe, ckpts = one_process
    _run(_accelerate("--multi_gpu") + [str(recipe), f"output_dir={tmp_path / 'two'}"])
    c2 = _ckpt(tmp_path / "two", 2)
    assert (c2 / "rng_1.pt").is_file()  # really two ranks
    state = json.loads((c2 / "state.json").read_text())
    assert state["world_size"] == 2 and not state["fsdp"]
    _assert_same(ckpts / c2.name, c2)
    assert _eval_reward(tmp_path / "two") == pytest.approx(_eval_reward(ckpts.parent), abs=1e-5)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_across(one_process, tmp_path):
    """FSDP2 on 2 CPU processes == 1 process; a 1-process checkpoint resumes under FSDP and an FSDP one in 1
    process, both landing on the straight 1-process result."""
    recipe, ckpts = one_process
    fsdp = _accelerate("--use_fsdp", "--fsdp_version", "2") + [str(recipe)]
    _run(fsdp + [f"output_dir={tmp_path / 'fsdp'}"])
    c2 = _ckpt(tmp_path / "fsdp", 2)
    state = json.loads((c2 / "state.json").read_text())
    assert state["world_size"] == 2 and state["fsdp"]
    _assert_same(ckpts / c2.name, c2)
    assert _eval_reward(tmp_path / "fsdp") == pytest.approx(_eval_reward(ckpts.parent), abs=1e-5)

    # 1 process -> FSDP: resume iteration 2 from the one-process checkpoint 1
    _run(fsdp + [f"output_dir={tmp_path / 'to_fsdp'}", f"resume={ckpts / 'checkpoint-00000001'}"])
    _assert_same(ckpts / c2.name, _ckpt(tmp_path / "to_fsdp", 2))
    # FSDP -> 1 process: resume iteration 2 from the FSDP checkpoint 1
    _run([sys.executable, "-m", "flowalign.cli", "train", str(recipe), f"output_dir={tmp_path / 'to_one'}",
          f"resume={_ckpt(tmp_path / 'fsdp', 1)}"])
    _assert_same(ckpts / c2.name, _ckpt(tmp_path / "to_one", 2))


@pytest.mark.slow
def test_two_processes_match_one(one_process, tmp_path):
    """torchrun, 2 CPU processes, the recipe's ``cpu`` flag off: the trainer still sets up gloo (no GPU here)."""
    recipe, ckpts = one_process
    two = tmp_path / "two"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "flowalign.cli", "train", str(recipe), f"output_dir={two}", "cpu=false"])
    c2 = _ckpt(two, 2)
    assert (c2 / "rng_0.pt").is_file() and (c2 / "rng_1.pt").is_file()  # really two ranks
    assert json.loads((c2 / "state.json").read_text())["world_size"] == 2
    _assert_same(ckpts / c2.name, c2)
    m1 = [json.loads(x) for x in (ckpts.parent / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert m1[0]["reward_mean"] == m2[0]["reward_mean"]  # same rollouts (noise per chunk, not per rank)
    assert m1[1]["reward_mean"] == pytest.approx(m2[1]["reward_mean"], abs=1e-5)
    assert m2[0]["samples"] == 12 and m2[0]["num_updates"] == 2
