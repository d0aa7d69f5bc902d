"""Checkpoints that resume bit-for-bit: written to a temp dir, then renamed atomically; keep-last-N.

Layout of ``<dir>/checkpoint-<iteration:08d>/``::

    weights.safetensors     trainable parameters by name (LoRA or full), fp32
    ema.safetensors         EMA shadow of the same names (when EMA is on)
    optimizer.pt            optimizer.state_dict()   (torch.save; loaded with weights_only=True)
    scheduler.pt            lr scheduler state_dict
    state.json              counters, prompt-sampler position, method state, config (for humans)
    rng_<rank>.pt           python / numpy / torch (cpu + cuda) RNG states of every process

Only the main process writes the shared files (they are identical on every rank: gradients are all-reduced
before the step); each rank writes its own RNG file. ``find_latest`` ignores incomplete temp dirs, so a run
killed mid-save resumes from the previous checkpoint. Checkpoints are deleted (keep-last-N, or replaced by a
re-save of the same iteration) by renaming them to ``.trash-*`` first, so a kill mid-delete never leaves a
half-deleted directory that still looks complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"
TRASH = ".trash-"  # checkpoints being deleted are first renamed to this prefix (never listed)
_PATTERN = re.compile(rf"^{PREFIX}(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every global RNG this process uses."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(iteration: int) -> str:
    return f"{PREFIX}{iteration:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _PATTERN.match(p.name))
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def find_latest(root: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def resolve(resume: str, root: str | os.PathLike) -> Path:
    """``"latest"`` -> newest checkpoint under ``root``; otherwise a checkpoint directory path."""
    if resume == "latest":
        latest = find_latest(root)
        if latest is None:
            raise FileNotFoundError(f"resume='latest' but no checkpoint exists under {str(root)!r}")
        return latest
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"resume={resume!r} is not a checkpoint directory (no state.json); "
                                f"use 'latest' or a {PREFIX}N directory")
    return path


def save(root: str | os.PathLike, iteration: int, *, weights: dict[str, torch.Tensor],
         optimizer: dict, scheduler: dict | None, state: dict, ema: dict[str, torch.Tensor] | None = None,
         rank: int = 0, is_main: bool = True, barrier: Callable[[], None] = lambda: None,
         keep_last: int = 0) -> Path:
    """Write one checkpoint collectively (every rank calls this); returns its final path."""
    root = Path(root)
    final = root / checkpoint_name(iteration)
    tmp = root / f".tmp-{checkpoint_name(iteration)}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        for leftover in root.glob(f"{TRASH}*"):  # what a crash mid-delete left behind
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        if ema is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler, tmp / "scheduler.pt")
    barrier()
    torch.save(rng_state(), tmp / f"rng_{rank}.pt")
    barrier()
    if is_main:
        # state.json last: its presence marks a complete checkpoint
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
        # an existing checkpoint of this iteration (a resume from an older one) is renamed away before it is
        # deleted: a crash mid-delete must not leave a half-deleted dir that still looks complete
        old = _trash(final) if final.exists() else None
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if keep_last > 0:
            # the oldest beyond N; never the one just written (a resume from an older checkpoint in a dir that
            # still holds higher iteration numbers)
            for stale in list_checkpoints(root)[:-keep_last]:
                if stale != final:
                    shutil.rmtree(_trash(stale), ignore_errors=True)
    barrier()
    return final


def _trash(path: Path) -> Path:
    """Rename ``path`` (atomically) out of the checkpoint namespace; returns the new name, to be deleted."""
    trash = path.with_name(f"{TRASH}{path.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    return trash


def load(path: str | os.PathLike, rank: int = 0) -> dict[str, Any]:
    """Everything ``save`` wrote, as a dict (tensors on CPU); RNG of ``rank`` under ``"rng"``."""
    path = Path(path)
    out: dict[str, Any] = {
        "state": json.loads((path / "state.json").read_text()),
        "weights": load_file(str(path / "weights.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "path": path,
    }
    if (path / "ema.safetensors").is_file():
        out["ema"] = load_file(str(path / "ema.safetensors"))
    if (path / "scheduler.pt").is_file():
        out["scheduler"] = torch.load(path / "scheduler.pt", weights_only=True)
    rng = path / f"rng_{rank}.pt"
    if rng.is_file():
        out["rng"] = torch.load(rng, weights_only=False)  # numpy state holds a dtype object; our own file
    return out


def truncate_log(path: str | os.PathLike, iteration: int, key: str = "iteration") -> int:
    """Drop the JSONL records whose ``key`` (the iteration or step counter) is past ``iteration`` (a run killed
    after its last checkpoint logged them; the resumed run logs them again) and a torn last line; returns how many
    records were dropped. The file is rewritten through a temp file and ``os.replace``, so a crash here leaves the
    old or the new log."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get(key), int) and rec[key] > iteration:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
    return dropped
