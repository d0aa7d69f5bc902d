"""The LLM trainer's checkpoints go through ``flowalign.checkpoint``: a kill while a checkpoint is written, or while
an old one is deleted (keep_last), leaves the previous complete checkpoint, and resuming from it equals a straight
run bit for bit (weights and logged losses). Kills are simulated in process by making one file write / delete
raise ``Killed`` (a ``BaseException``, as a signal would not be caught either); the trainer object is then dropped,
as the process would be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowalign import checkpoint as ckpt
from flowalign.llm.config import load


class Killed(BaseException):
    pass


def _cfg(out, *extra):
    return load("recipes/llm_grpo.yaml", [f"output_dir={out}", "rollout.prompts_per_step=4", "rollout.group_size=4",
                                          "train.batch_size=8", "eval.num_prompts=8", "checkpoint.keep_last=1",
                                          "algo.num_iterations=2", *extra])


def _die(*_, **__):
    raise Killed()


def test_kill_mid_write_and_mid_delete_then_resume_equals_straight_run(tmp_path, monkeypatch):
    from flowalign.llm.trainer import LLMTrainer

    torch.set_num_threads(1)
    a = LLMTrainer(_cfg(tmp_path / "a"))
    for _ in range(4):
        a.train_step()
    root = tmp_path / "b" / "checkpoints"
    b = LLMTrainer(_cfg(tmp_path / "b"))
    b.train_step(), b.train_step()
    ck2 = b.save()
    assert ck2 == root / "checkpoint-00000002" and json.loads((ck2 / "state.json").read_text())["step"] == 2
    b.train_step()
    with monkeypatch.context() as m:  # killed while writing checkpoint 3's weights
        m.setattr(ckpt, "save_file", _die)
        with pytest.raises(Killed):
            b.save()
    del b
    assert (root / ".tmp-checkpoint-00000003").is_dir()  # the torn write is left, but never listed
    assert ckpt.list_checkpoints(root) == [ck2] and ckpt.find_latest(root) == ck2

    c = LLMTrainer(_cfg(tmp_path / "b"))
    c.resume("latest")
    assert c.step == 2
    c.train_step(), c.train_step()
    rmtree = ckpt.shutil.rmtree

    def die_on_trash(path, *args, **kw):  # killed while deleting the checkpoint that keep_last=1 drops
        if ckpt.TRASH in str(path) and Path(path).exists():  # the renamed-aside checkpoint 2
            raise Killed()
        return rmtree(path, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(ckpt.shutil, "rmtree", die_on_trash)
        with pytest.raises(Killed):
            c.save()
    del c
    ck4 = root / "checkpoint-00000004"
    assert ckpt.list_checkpoints(root) == [ck4]  # checkpoint 2 was renamed aside first: no half-deleted dir listed
    assert any(p.name.startswith(ckpt.TRASH) for p in root.iterdir())

    d = LLMTrainer(_cfg(tmp_path / "b"))
    d.resume("latest")
    assert d.step == 4
    pa, pd = a.policy.state_dict(), d.policy.state_dict()
    assert all(torch.equal(pa[k], pd[k]) for k in pa)  # killed twice, resumed twice == the straight run
    d.save()  # the next save clears what the kills left behind
    assert ckpt.list_checkpoints(root) == [ck4] and not any(p.name.startswith(ckpt.TRASH) for p in root.iterdir())
    logs = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in "ab"}
    assert [r["step"] for r in logs["b"]] == [r["step"] for r in logs["a"]] == [1, 2, 3, 4]
    assert [r["loss"] for r in logs["b"]] == [r["loss"] for r in logs["a"]]
    changed = LLMTrainer(_cfg(tmp_path / "fresh")).policy.state_dict()
    assert any(not torch.equal(pa[k], changed[k]) for k in pa)  # the 4 steps did change the weights
