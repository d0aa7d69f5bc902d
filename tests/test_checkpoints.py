"""Checkpoint atomicity and keep-last-N (``flowalign/checkpoint.py``), alone and through the trainer.

What must hold: a save that dies part-way (files written, no rename yet; or while an old directory is being
deleted) is never what ``find_latest`` / ``--resume latest`` picks, and the previous checkpoint stays intact
and loadable; ``keep_last=N`` deletes only older complete checkpoints, never the one just written nor temp dirs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowalign import checkpoint as ckpt


class Crash(Exception):
    """Stands in for the process dying at that point."""


def payload(iteration: int) -> dict:
    g = torch.Generator().manual_seed(iteration)
    w = {"blk.lora_A": torch.randn(3, 4, generator=g), "blk.lora_B": torch.randn(4, 3, generator=g)}
    return {
        "weights": w,
        "ema": {k: v * 0.5 for k, v in w.items()},
        "optimizer": {"state": {0: {"step": torch.tensor(float(iteration)), "exp_avg": torch.randn(3, 4, generator=g)}},
                      "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "scheduler": {"last_epoch": iteration},
        "state": {"iteration": iteration, "global_step": 2 * iteration},
    }


def save(root: Path, iteration: int, keep_last: int = 0) -> Path:
    return ckpt.save(root, iteration, keep_last=keep_last, **payload(iteration))


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def assert_loads_as(path: Path, iteration: int) -> None:
    data, want = ckpt.load(path), payload(iteration)
    assert data["state"] == want["state"]
    assert data["weights"].keys() == want["weights"].keys()
    assert all(torch.equal(data["weights"][k], want["weights"][k]) for k in want["weights"])
    assert all(torch.equal(data["ema"][k], want["ema"][k]) for k in want["ema"])
    assert torch.equal(data["optimizer"]["state"][0]["exp_avg"], want["optimizer"]["state"][0]["exp_avg"])
    assert data["scheduler"] == want["scheduler"]


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ------------------------------------------------------------------------------------------------ unit
def test_crash_after_some_files_is_never_latest(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    save(root, 1), save(root, 2)
    before = digest(root / "checkpoint-00000002")

    def die():  # called after weights / EMA / optimizer / scheduler are on disk
        raise Crash

    monkeypatch.setattr(ckpt, "rng_state", die)
    with pytest.raises(Crash):
        save(root, 3, keep_last=1)
    monkeypatch.undo()
    tmp = root / ".tmp-checkpoint-00000003"
    assert {"weights.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.pt"} <= set(names(tmp))
    assert "state.json" not in names(tmp)  # truly half-written
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-00000001", "checkpoint-00000002"]
    assert ckpt.find_latest(root) == ckpt.resolve("latest", root) == root / "checkpoint-00000002"
    assert digest(root / "checkpoint-00000002") == before  # keep_last=1 never ran: nothing was deleted
    assert_loads_as(root / "checkpoint-00000002", 2)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        ckpt.resolve(str(tmp), root)

    # the retry of the same iteration replaces the stale temp dir and then applies keep_last
    save(root, 3, keep_last=1)
    assert names(root) == ["checkpoint-00000003"]
    assert_loads_as(root / "checkpoint-00000003", 3)


def test_crash_before_the_rename_is_never_latest(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    save(root, 1)

    def die(src, dst):
        raise Crash

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(Crash):
        save(root, 2)
    monkeypatch.undo()
    # state.json was written (the temp dir is complete) but only the rename publishes a checkpoint
    assert (root / ".tmp-checkpoint-00000002" / "state.json").is_file()
    assert ckpt.resolve("latest", root) == root / "checkpoint-00000001"
    assert_loads_as(root / "checkpoint-00000001", 1)


def test_hand_made_partial_dirs_are_ignored(tmp_path):
    root = tmp_path / "ck"
    save(root, 5)
    # a crash in the temp dir of a later iteration, a final-named dir without its state.json, foreign names
    (root / ".tmp-checkpoint-00000009").mkdir()
    shutil.copy(root / "checkpoint-00000005" / "weights.safetensors", root / ".tmp-checkpoint-00000009")
    (root / "checkpoint-00000010").mkdir()
    (root / "checkpoint-00000010" / "weights.safetensors").write_bytes(b"")
    (root / "checkpoint-00000011.bak").mkdir()
    (root / "checkpoint-00000011.bak" / "state.json").write_text("{}")
    (root / "checkpoint-00000012").write_text("a file, not a directory")
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-00000005"]
    assert ckpt.resolve("latest", root) == root / "checkpoint-00000005"
    # no checkpoint at all (a run killed before its first save): None, the trainer starts afresh (issue 22)
    assert ckpt.resolve("latest", tmp_path / "empty") is None


def _rmtree_dying_midway(real_rmtree):
    """``shutil.rmtree`` that dies after deleting one file of a complete checkpoint (state.json survives)."""
    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if (path / "state.json").is_file() and (path / "weights.safetensors").is_file():
            (path / "weights.safetensors").unlink()
            raise Crash
        return real_rmtree(path, *args, **kwargs)
    return rmtree


def test_crash_while_replacing_an_existing_checkpoint(tmp_path, monkeypatch):
    """Re-saving an iteration that exists (resumed from an older checkpoint, or save_final after a resume with
    nothing left to do) must not leave a half-deleted directory that still looks complete."""
    root = tmp_path / "ck"
    save(root, 1), save(root, 2)
    new = payload(2)
    new["weights"] = {k: v + 1 for k, v in new["weights"].items()}
    monkeypatch.setattr(shutil, "rmtree", _rmtree_dying_midway(shutil.rmtree))
    with pytest.raises(Crash):
        ckpt.save(root, 2, **new)
    monkeypatch.undo()
    latest = ckpt.resolve("latest", root)
    data = ckpt.load(latest)  # whatever latest is, it must load completely
    assert latest.name in ("checkpoint-00000001", "checkpoint-00000002")
    if latest.name == "checkpoint-00000002":  # the new one was published before the old one was deleted
        assert all(torch.equal(data["weights"][k], new["weights"][k]) for k in new["weights"])
    for p in ckpt.list_checkpoints(root):
        ckpt.load(p)
    # the next save cleans up what the crash left behind
    save(root, 3)
    assert names(root) == ["checkpoint-00000001", "checkpoint-00000002", "checkpoint-00000003"]


def test_crash_while_keep_last_deletes(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    save(root, 1, keep_last=2), save(root, 2, keep_last=2)
    monkeypatch.setattr(shutil, "rmtree", _rmtree_dying_midway(shutil.rmtree))
    with pytest.raises(Crash):
        save(root, 3, keep_last=2)  # dies deleting checkpoint 1
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-00000002", "checkpoint-00000003"]
    assert_loads_as(ckpt.resolve("latest", root), 3)
    assert_loads_as(root / "checkpoint-00000002", 2)


def test_keep_last_deletes_only_older_complete_checkpoints(tmp_path):
    root = tmp_path / "ck"
    (root / ".tmp-checkpoint-00000099").mkdir(parents=True)  # another iteration's crashed save: not ours
    (root / "notes").mkdir()
    for it in range(1, 6):
        save(root, it, keep_last=2)
        expect = [f"checkpoint-{i:08d}" for i in range(max(1, it - 1), it + 1)]
        assert [p.name for p in ckpt.list_checkpoints(root)] == expect
    assert names(root) == [".tmp-checkpoint-00000099", "checkpoint-00000004", "checkpoint-00000005", "notes"]
    assert_loads_as(root / "checkpoint-00000004", 4), assert_loads_as(root / "checkpoint-00000005", 5)
    save(root, 6, keep_last=0)  # 0 keeps everything
    assert len(ckpt.list_checkpoints(root)) == 3


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path):
    """Resumed from checkpoint 1 in a directory that still holds 2..4 of an abandoned run: the new
    checkpoint 2 must survive keep_last even though higher iteration numbers exist."""
    root = tmp_path / "ck"
    for it in range(1, 5):
        save(root, it)
    final = save(root, 2, keep_last=1)
    assert final.is_dir()
    assert_loads_as(final, 2)
    assert "checkpoint-00000004" in names(root)  # the newest by iteration is still kept


# ------------------------------------------------------------------------------------------------ trainer
@pytest.mark.slow
def test_trainer_crash_mid_save_resumes_from_previous_and_keep_last(tmp_path, monkeypatch):
    """4 iterations, a checkpoint every iteration, keep_last 2; the save of iteration 4 dies after the weights
    are written. latest is checkpoint 3 (intact: the weights the trainer had then); resuming trains iteration 4
    and leaves exactly checkpoints 3 and 4."""
    from flowalign.trainer import Trainer
    from tests.test_trainer import tiny_cfg

    opts = ("sample.num_steps=2", "sample.prompts_per_round=1", "sample.group_size=2", "sample.batch_size=2",
            "ema.interval=1", "checkpoint.every=1", "checkpoint.keep_last=2", "max_iterations=4")
    tr = Trainer(tiny_cfg(tmp_path, *opts))
    real, calls, at_save = ckpt.rng_state, [0], {}

    def rng_state():
        calls[0] += 1
        at_save[calls[0]] = [{k: v.clone() for k, v in d.items()}  # live tensors: copy them
                             for d in (tr.trainable_state_dict(), tr.ema.state_dict(tr.param_names))]
        if calls[0] == 4:
            raise Crash
        return real()

    monkeypatch.setattr(ckpt, "rng_state", rng_state)
    with pytest.raises(Crash):
        tr.train()
    monkeypatch.undo()
    root = tmp_path / "run" / "checkpoints"
    assert names(root) == [".tmp-checkpoint-00000004", "checkpoint-00000002", "checkpoint-00000003"]
    assert (root / ".tmp-checkpoint-00000004" / "weights.safetensors").is_file()
    latest = ckpt.resolve("latest", root)
    assert latest.name == "checkpoint-00000003"
    w3, e3 = at_save[3]
    saved_w, saved_e = load_file(str(latest / "weights.safetensors")), load_file(str(latest / "ema.safetensors"))
    assert saved_w.keys() == w3.keys() and all(torch.equal(saved_w[k], w3[k]) for k in w3)
    assert all(torch.equal(saved_e[k], e3[k]) for k in e3)
    w4 = at_save[4][0]
    assert any(not torch.equal(w4[k], w3[k]) for k in w3)  # iteration 4 had really moved the weights

    tr2 = Trainer(tiny_cfg(tmp_path, *opts, "resume=latest"))
    assert tr2.state.iteration == 3
    live = tr2.trainable_state_dict()
    assert all(torch.equal(live[k], w3[k]) for k in w3)
    hist = tr2.train()
    assert [h["iteration"] for h in hist] == [4]
    assert names(root) == ["checkpoint-00000003", "checkpoint-00000004"]  # the stale temp dir is gone too
    assert ckpt.load(root / "checkpoint-00000004")["state"]["iteration"] == 4


def test_truncate_log_drops_iterations_past_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    recs = [{"iteration": 1, "loss": 0.5}, {"iteration": 2, "loss": 0.4}, {"iteration": 2, "eval/reward": 1.0},
            {"note": "no iteration"}, {"iteration": 3, "loss": 0.3}]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"iteration": 4, "lo')  # torn by a kill
    assert ckpt.truncate_log(log, 2) == 2
    assert [json.loads(x) for x in log.read_text().splitlines()] == recs[:4]
    assert ckpt.truncate_log(log, 2) == 0 and ckpt.truncate_log(tmp_path / "missing.jsonl", 0) == 0
