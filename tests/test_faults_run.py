"""Fault injection (issue 22), items 1-3: the trainer's side. Split from ``tests/test_faults.py`` (items 4-6) to
keep both files under 600 lines; same rules: bounded, CPU, each case a clear refusal or a clean recovery.

* Item 1 -- validation at load: non-finite numbers, ranges, unknown keys in option maps, duplicate YAML keys,
  names resolved at load (``--dry-run`` catches them), prompt files in train and eval; a NaN/inf loss, gradient,
  weight or reward stops the run naming the iteration and the component, and no checkpoint is written.
* Item 2 -- runs never mix: a fresh run into a used output directory, ``--overwrite``, ``--resume`` with a
  changed config (refused with old -> new per key, ``--allow-config-change`` applies it, structural changes
  never).
* Item 3 -- checkpoints verify themselves: a sha256 manifest, a truncated or bit-flipped file named, ``latest``
  falling back to the newest intact checkpoint, a run killed before its first checkpoint restarting cleanly.

Every run is the tiny random-weight SD3 pipeline (``flowalign.pipelines.tiny``), 2 prompts x 2 samples, 2 steps,
1-3 iterations, in-process through ``flowalign.cli.main`` (about 1-2 s each).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from flowalign import checkpoint as ckpt
from flowalign.cli import main
from flowalign.config import ConfigError, load_config
from flowalign.guards import NonFiniteError
from flowalign.pipelines import tiny


def base_config(out: Path) -> dict:
    return {"model": {"adapter": "sd3", "path": tiny.cached("sd3"), "kwargs": dict(tiny.RESOLUTION["sd3"]),
                      "lora": {"rank": 4}},
            "sample": {"prompts": ["a red cat", "a blue dog"], "prompts_per_round": 2, "group_size": 2,
                       "num_steps": 2, "batch_size": 4, "guidance": 4.5},
            "reward": {"weights": {"redness": 1.0}}, "train": {"lr": 3e-4, "beta": 0.01, "updates_per_iteration": 1},
            "output_dir": str(out / "run"), "max_iterations": 2, "log": {"progress": False},
            "checkpoint": {"every": 1, "keep_last": 3}}


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path)))
    return path


def train(recipe: Path, *argv: str) -> int:
    return main(["train", str(recipe), *argv])


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# =====================================================================================================================
# Item 1: validation at load
# =====================================================================================================================
CONFIG_CASES = [  # (overrides, the error must match)
    (["train.lr=inf"], r"train\.lr must be a finite number, got inf"),
    (["train.beta=nan"], r"train\.beta must be a finite number, got nan"),
    (["sample.guidance=nan"], r"sample\.guidance must be a finite number"),
    (["train.clip_range=inf"], r"train\.clip_range must be a finite number"),
    (["train.betas=[0.9, .nan]"], r"train\.betas\[1\] must be a finite number"),
    (["model.kwargs={height: 32, steps: .inf}"], r"model\.kwargs\.steps must be a finite number"),
    (["sample.schedule_options={fration: 0.4}"], r"sample\.schedule_options\.fration.*schedule 'all'.*'fraction'"),
    (["model.kwargs={heigth: 32}"], r"model\.kwargs\.heigth.*adapter 'sd3'.*Did you mean 'height'"),
    (["reward.kwargs={redness: {colour: 1}}"], r"reward\.kwargs\.redness\.colour.*Known: batch_size, device"),
    (["model.kwargs={torch_dtype: float16}"], r"model\.kwargs\.torch_dtype: set by model\.dtype"),
    (["train.lr_scheduler=cosin"], r"train\.lr_scheduler='cosin' is not known\. Did you mean 'cosine'"),
    (["log.trackers=[tensorbord]"], r"log\.trackers\[0\]='tensorbord'.*'tensorboard'"),
    (["model.lora.init=gausian"], r"model\.lora\.init='gausian'.*'gaussian'"),
    (["eval.fn=flowalign.eval:trainer_evl"], r"eval\.fn: module 'flowalign\.eval' has no attribute 'trainer_evl'"),
    (["reward.weights={'no_such_mod:rew': 1.0}"], r"reward\.weights\.no_such_mod:rew: cannot import module"),
    (["seed=-1"], r"seed must be in \[0, 2\*\*32\), got -1"),
    (["model.lora.dropout=2"], r"model\.lora\.dropout must be in \[0, 1\), got 2"),
]


@pytest.mark.parametrize("overrides,match", CONFIG_CASES, ids=[c[0][0].split("=")[0] for c in CONFIG_CASES])
def test_config_refuses_at_load(recipe, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, overrides)


def test_valid_names_and_options_still_load(recipe):
    cfg = load_config(recipe, ["train.lr_scheduler=cosine", "model.lora.init=pissa_niter_4", "seed=4294967295",
                               "sample.schedule=window", "sample.schedule_options={size: 1}",
                               "model.kwargs={height: 32, width: 32, max_sequence_length: 16, variant: null}"])
    assert (cfg.train.lr_scheduler, cfg.model.lora.init, cfg.seed) == ("cosine", "pissa_niter_4", 4294967295)
    # the default options belong to the default schedule: dropped, not refused, when the schedule changes
    assert load_config(recipe, ["sample.schedule=window"]).sample.schedule_options == {}


def test_duplicate_yaml_keys_and_prompt_files(tmp_path, recipe, capsys):
    dup = tmp_path / "dup.yaml"
    dup.write_text(recipe.read_text() + "seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: duplicate key 'seed' at line \d+ \(first given at line \d+\)"):
        load_config(dup)
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    (tmp_path / "p.csv").write_text("text\na cat\n")
    (tmp_path / "p.md").write_text("a cat\n")
    for spec, match in (("empty.txt", "holds no prompts"), ("p.csv", "no 'prompt' column"),
                        ("p.md", "unknown prompt file type '.md'")):
        with pytest.raises(ConfigError, match=match):
            load_config(recipe, [f"sample.prompts={tmp_path / spec}"])
        with pytest.raises(ConfigError, match=match):
            load_config(recipe, ["eval.every=1", f"eval.prompts={tmp_path / spec}"])
        # flowalign eval: an error before any model loads (the model path does not even exist), no output folder
        out = tmp_path / f"eval_{spec}"
        assert main(["eval", "--model", "sd3:/nonexistent", "--prompts", str(tmp_path / spec), "--out", str(out)]) == 2
        assert match in capsys.readouterr().err and not out.exists()
    assert train(recipe, "train.lr=inf", "--dry-run") == 2  # --dry-run catches it
    assert "train.lr must be a finite number" in capsys.readouterr().err


def _nan_loss(tr):
    loss = tr.method.loss
    tr.method.loss = lambda b: (lambda out: (out[0] * math.nan, out[1]))(loss(b))


def _nan_grad(tr):  # a finite loss whose gradient is NaN
    tr.params[0].register_hook(lambda g: g * math.nan)


def _inf_lr(tr):  # finite loss and gradients, but the step overflows the weights
    for g in tr.optimizer.param_groups:
        g["lr"] = math.inf


def _nan_reward() -> dict:
    from flowalign.rewards.base import Compose, FunctionReward

    nanny = FunctionReward(lambda im, p, m: torch.full((len(p),), math.nan), name="nanny")
    return {"reward_fn": Compose({nanny: 1.0})}


@pytest.mark.parametrize("build,inject,match", [
    (dict, _nan_loss, r"iteration 1, update 0: loss is nan"),
    (dict, _nan_grad, r"iteration 1, update 0: gradient norm is nan"),
    (dict, _inf_lr, r"iteration 1: weights after the optimizer step hold NaN or inf \(.*lora_A"),
    (_nan_reward, lambda tr: None, r"iteration 1: non-finite reward: reward 'nanny' returned non-finite"),
], ids=["loss", "gradient", "weights", "reward"])
def test_non_finite_training_stops_naming_iteration_and_component(tmp_path, build, inject, match):
    from flowalign.trainer import Trainer

    cfg = load_config(base_config(tmp_path), ["checkpoint.every=0", "checkpoint.save_final=true"])
    tr = Trainer(cfg, **build())
    inject(tr)
    with pytest.raises(NonFiniteError, match=match):
        tr.train()
    assert not list((tmp_path / "run").glob("checkpoints/checkpoint-*"))  # nothing saved after it


def test_checkpoint_save_refuses_non_finite_weights(tmp_path):
    w = {"a": torch.ones(2), "b": torch.tensor([1.0, math.inf])}
    with pytest.raises(NonFiniteError, match=r"checkpoint-00000003: weights 'b' hold NaN or inf"):
        ckpt.save(tmp_path, 3, weights=w, optimizer={}, scheduler=None, state={})
    assert not any(tmp_path.iterdir())


# =====================================================================================================================
# Item 2: runs never mix
# =====================================================================================================================
def test_fresh_run_into_used_dir_is_refused_unless_overwrite(tmp_path, recipe, capsys):
    run = tmp_path / "run"
    assert train(recipe) == 0
    assert train(recipe, "max_iterations=1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert [r["iteration"] for r in rows(run)] == [1, 2]  # untouched
    assert train(recipe, "max_iterations=1", "--overwrite") == 0
    assert [r["iteration"] for r in rows(run)] == [1]
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["checkpoint-00000001"]
    (aside,) = run.glob("overwritten-*")  # the old run, moved aside whole
    assert [r["iteration"] for r in rows(aside)] == [1, 2] and len(ckpt.list_checkpoints(aside / "checkpoints")) == 2


def test_resume_refuses_config_changes_and_applies_allowed_ones(tmp_path, recipe, capsys):
    run = tmp_path / "run"
    assert train(recipe) == 0
    assert train(recipe, "--resume", "latest", "train.lr=1e-3", "sample.group_size=4", "seed=5",
                 "reward.weights={brightness: 1.0}", "max_iterations=3") == 2
    err = capsys.readouterr().err
    for line in ("train.lr: 0.0003 -> 0.001", "sample.group_size: 2 -> 4", "seed: 0 -> 5",
                 "reward.weights.redness: 1.0 -> '<absent>'", "reward.weights.brightness: '<absent>' -> 1.0"):
        assert line in err, line
    assert "--allow-config-change" in err and [r["iteration"] for r in rows(run)] == [1, 2]
    # structural: never, even when allowed
    assert train(recipe, "--resume", "latest", "train.method=nft", "sample.guidance=1.0",
                 "--allow-config-change", "train.method", "sample.guidance") == 2
    assert "train.method: 'flow_grpo' -> 'nft'" in capsys.readouterr().err
    # allowed: the new lr really applies from the first resumed step (constant schedule), and is logged
    assert train(recipe, "--resume", "latest", "train.lr=1e-3", "max_iterations=3",
                 "--allow-config-change", "train.lr") == 0
    assert "train.lr: 0.0003 -> 0.001" in capsys.readouterr().err
    assert [(r["iteration"], r["lr"]) for r in rows(run)] == [(1, 3e-4), (2, 3e-4), (3, 1e-3)]


def test_resume_switching_lora_on_is_a_clear_refusal(tmp_path, recipe, capsys):
    assert train(recipe, "model.lora.enabled=false", "max_iterations=1") == 0
    assert train(recipe, "--resume", "latest") == 2
    assert "model.lora.enabled: False -> True" in capsys.readouterr().err


# =====================================================================================================================
# Item 3: checkpoints verify themselves
# =====================================================================================================================
def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:  # one bit inside the tensor data (the end of the file)
        data[-5] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_damaged_latest_falls_back_to_the_newest_intact(tmp_path, recipe, capsys, how):
    run = tmp_path / "run"
    assert train(recipe) == 0
    state = json.loads((run / "checkpoints" / "checkpoint-00000002" / "state.json").read_text())
    assert set(state["files"]) >= {"weights.safetensors", "ema.safetensors", "optimizer.pt", "rng_0.pt"}
    assert all(len(h) == 64 for h in state["files"].values())
    bad = run / "checkpoints" / "checkpoint-00000002"
    _damage(bad / "weights.safetensors", how)
    # an explicit directory: refused, naming the file (no bare SafetensorError)
    assert train(recipe, "--resume", str(bad), "max_iterations=3") == 2
    assert "checkpoint-00000002'" in (err := capsys.readouterr().err) and "weights.safetensors is damaged" in err
    # latest: falls back to checkpoint 1, says so, and continues 2..3 (the damaged 2 is rewritten)
    assert train(recipe, "--resume", "latest", "max_iterations=3") == 0
    err = capsys.readouterr().err
    assert "weights.safetensors is damaged" in err and "resuming from" in err and "checkpoint-00000001" in err
    assert [r["iteration"] for r in rows(run)] == [1, 2, 3]
    ckpt.verify(bad)


def test_load_names_an_unreadable_file(tmp_path):
    path = ckpt.save(tmp_path, 1, weights={"a": torch.ones(3)}, optimizer={}, scheduler=None, state={})
    _damage(path / "weights.safetensors", "truncate")
    with pytest.raises(ckpt.CheckpointError, match=r"cannot read weights\.safetensors \(SafetensorError"):
        ckpt.load(path)


def test_killed_before_first_checkpoint_resumes_as_a_fresh_start(tmp_path, recipe, capsys):
    run = tmp_path / "run"
    assert train(recipe, "max_iterations=1", "checkpoint.every=0", "checkpoint.save_final=false") == 0
    (run / "checkpoints" / ".tmp-checkpoint-00000001").mkdir(parents=True)  # the kill, mid first save
    assert train(recipe, "--resume", "latest", "max_iterations=2") == 0
    assert "starting afresh" in capsys.readouterr().err
    assert [r["iteration"] for r in rows(run)] == [1, 2]  # iteration 1 not twice
    shutil.rmtree(run / "checkpoints")
    assert train(recipe, "--resume", "latest", "max_iterations=1") == 0  # no checkpoints dir at all
    assert [r["iteration"] for r in rows(run)] == [1]
