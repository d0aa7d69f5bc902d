"""Fault injection (issue 22), items 1-3 on the LLM trainer (``flowalign.llm.trainer`` through
``flowalign.llm.run_guards`` over ``flowalign.guards``):

* a fresh run into a used output directory is refused (exit 2) unless ``--overwrite`` moves the old run aside;
* ``--resume`` with a changed config is refused listing ``key: old -> new``; ``--allow-config-change`` applies it
  (the new lr really drives the optimizer); cadence keys (``train.steps``) always pass; structural keys never;
* a NaN/inf reward, loss or gradient stops the run naming the step and the component; no checkpoint is written,
  and ``save`` refuses non-finite weights;
* a run killed before its first checkpoint restarts cleanly with ``--resume latest`` (no duplicate log rows,
  the weights of a straight run).

Every run is the tiny embedded addition model, 4 prompts x 4 samples, 1-2 steps, in-process (CPU, ~1 s each).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flowalign.cli import main
from flowalign.guards import NonFiniteError
from flowalign.llm import trainer as llm_trainer
from flowalign.llm.config import load
from flowalign.llm.trainer import LLMTrainer

RECIPE = "recipes/llm_grpo.yaml"


def _over(out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", "rollout.prompts_per_step=4", "rollout.group_size=4", "train.batch_size=8",
            "eval.num_prompts=8", "eval.every=0", "checkpoint.export=false", "train.steps=1", "train.lr=1e-4",
            *extra]


def _train(out: Path, *extra: str, flags: tuple[str, ...] = ()) -> int:
    return main(["train", RECIPE, *_over(out, *extra), *flags])


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"checkpoint-{step:08d}" / "weights.safetensors")


# ------------------------------------------------------------------------------------------- item 1: output dir
def test_fresh_run_into_used_output_dir_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    old_log, old_w = (out / "metrics.jsonl").read_bytes(), _weights(out, 1)
    capsys.readouterr()
    assert _train(out, "seed=1") == 2  # refused before anything is written or loaded
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_bytes() == old_log
    assert _train(out, "seed=1", flags=("--overwrite",)) == 0
    aside = [p for p in out.iterdir() if p.name.startswith("overwritten-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_bytes() == old_log  # moved, not deleted
    assert all(torch.equal(old_w[k], v) for k, v in
               load_file(aside[0] / "checkpoints" / "checkpoint-00000001" / "weights.safetensors").items())
    assert _steps(out) == [0, 1, 1]  # the new run's rows only (step 0 eval, step 1 train, final eval)
    assert not any(torch.equal(old_w[k], v) for k, v in _weights(out, 1).items() if v.numel() > 16)


# ------------------------------------------------------------------------------------------- item 2: resume config
def test_resume_refuses_changed_config_then_allowed_change_applies(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    capsys.readouterr()
    # lr and group size change: refused, each key listed old -> new; nothing trained
    assert _train(out, "train.steps=2", "train.lr=1e-3", "rollout.group_size=2", flags=("--resume", "latest")) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.0001 -> 0.001" in err and "rollout.group_size: 4 -> 2" in err
    assert "--allow-config-change rollout.group_size train.lr" in err and "train.steps" not in err
    assert _steps(out) == [0, 1, 1]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 1e-4  # the run's config, kept
    # structural: never, even when named
    assert _train(out, "model.lora.enabled=true", flags=("--resume", "latest", "--allow-config-change",
                                                         "model.lora.enabled")) == 2
    assert "model.lora.enabled: False -> True" in capsys.readouterr().err
    # allowed: takes effect (the optimizer's lr is the new one) and is logged; train.steps needs no permission
    assert _train(out, "train.steps=2", "train.lr=1e-3", flags=("--resume", "latest", "--allow-config-change",
                                                                "train.lr")) == 0
    assert "--resume: config change train.lr: 0.0001 -> 0.001" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == [pytest.approx(1e-4), pytest.approx(1e-3)]
    st = json.loads((out / "checkpoints" / "checkpoint-00000002" / "state.json").read_text())
    assert st["config"]["train"]["lr"] == 1e-3
    # the resumed AdamW state holds the new lr too (not only the logged schedule value)
    tr = LLMTrainer(load(RECIPE, _over(out, "train.steps=2", "train.lr=1e-3")))
    tr.resume("latest")
    assert tr.opt.param_groups[0]["lr"] == pytest.approx(1e-3)


# ------------------------------------------------------------------------------------------- item 3: non-finite
def _nan_reward(tr: LLMTrainer, j: int) -> None:
    real = tr.rewards[j]
    tr.rewards[j] = lambda **kw: real(**kw).float().masked_fill(torch.arange(len(kw["completions"])) == 2,
                                                                 float("nan"))


def test_nan_reward_stops_naming_step_and_component(tmp_path):
    tr = LLMTrainer(load(RECIPE, _over(tmp_path)))
    tr.train(1, progress=False)
    _nan_reward(tr, 1)
    before = {k: v.clone() for k, v in tr.trainable_state().items()}
    with pytest.raises(NonFiniteError, match=r"step 2: reward 'arith_format' is NaN or inf"):
        tr.train(1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in tr.trainable_state().items())  # no update happened
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-00000001"]


def test_nan_loss_stops_before_the_optimizer_step(tmp_path, monkeypatch):
    real = llm_trainer.policy_loss

    def nan_loss(*a, **kw):
        out = real(*a, **kw)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(llm_trainer, "policy_loss", nan_loss)
    tr = LLMTrainer(load(RECIPE, _over(tmp_path, "train.max_grad_norm=null")))
    before = {k: v.clone() for k, v in tr.trainable_state().items()}
    with pytest.raises(NonFiniteError, match=r"step 1: loss is nan"):
        tr.train(1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in tr.trainable_state().items())
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("clip", ["1.0", "null"])
def test_inf_gradient_stops_naming_the_parameter(tmp_path, clip):
    tr = LLMTrainer(load(RECIPE, _over(tmp_path, f"train.max_grad_norm={clip}")))
    name, p = list(tr.policy.named_parameters())[-1]
    p.register_hook(lambda g: g * float("inf"))  # finite loss, infinite gradient of this one tensor
    with pytest.raises(NonFiniteError, match=rf"step 1: gradient of {name} is NaN or inf"):
        tr.train(1, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_save_refuses_non_finite_weights(tmp_path):
    tr = LLMTrainer(load(RECIPE, _over(tmp_path)))
    with torch.no_grad():
        next(tr.policy.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="hold NaN"):
        tr.save()
    assert not list(tmp_path.glob("checkpoints/checkpoint-*"))  # nothing written, not even a temp dir renamed in


# ------------------------------------------------------------------------------------------- kill before checkpoint
def test_killed_before_first_checkpoint_restarts_cleanly(tmp_path, capsys):
    straight = tmp_path / "straight"
    assert _train(straight, "train.steps=2") == 0
    out = tmp_path / "killed"
    tr = LLMTrainer(load(RECIPE, _over(out, "train.steps=2")))
    tr._log({"step": 0, "eval": tr.evaluate()})
    tr.train_step()  # step 1 logged, then "killed": no checkpoint was ever written
    del tr
    assert _steps(out) == [0, 1] and not (out / "checkpoints").exists()
    assert _train(out, "train.steps=2") == 2  # a fresh run would mix with the killed run's rows
    assert _train(out, "train.steps=2", flags=("--resume", "latest")) == 0
    assert "no checkpoint under" in capsys.readouterr().err
    assert _steps(out) == _steps(straight) == [0, 1, 2, 2]  # each row once
    ws, wk = _weights(straight, 2), _weights(out, 2)
    assert all(torch.equal(ws[k], wk[k]) for k in ws)  # the restart is the straight run
