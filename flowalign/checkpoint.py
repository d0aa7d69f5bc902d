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

Checkpoints verify themselves: ``state.json["files"]`` holds the sha256 of every other file of the checkpoint
(written last, inside the atomic rename). ``verify`` re-hashes them; ``resolve("latest", ...)`` takes the newest
*intact* checkpoint, warning on stderr about each damaged one it skips (naming the file), and returns None when
there is no checkpoint at all (a run killed before its first save starts afresh). ``load`` names the file it
cannot read. ``save`` refuses weights holding NaN or inf (``flowalign.guards.NonFiniteError``) before writing.
"""

from __future__ import annotations

import json
import os
import random
import hashlib
import re
import shutil
import sys
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


class CheckpointError(RuntimeError):
    """A damaged or unreadable checkpoint; the message names the checkpoint and the file."""


MANIFEST = "files"  # state.json key: {relative path: sha256 hex} of every other file of the checkpoint


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(ckpt_dir: Path) -> dict[str, str]:
    """sha256 of every file under ``ckpt_dir`` except ``state.json`` (which holds this manifest)."""
    return {p.relative_to(ckpt_dir).as_posix(): _sha256(p) for p in sorted(ckpt_dir.rglob("*"))
            if p.is_file() and p.name != "state.json"}


def verify(path: str | os.PathLike) -> None:
    """Raise ``CheckpointError`` naming the first damaged file of checkpoint ``path``: unreadable ``state.json``,
    a listed file missing or whose sha256 differs. Checkpoints written before the manifest existed are only
    checked for a readable ``state.json``."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: state.json is unreadable ({e})") from None
    for name, digest in (state.get(MANIFEST) or {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r}: {name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {str(path)!r}: {name} is damaged (sha256 differs from the one "
                                  "recorded in state.json)")


def resolve(resume: str, root: str | os.PathLike) -> Path | None:
    """``"latest"`` -> the newest *intact* checkpoint under ``root`` (each damaged newer one is skipped with a
    warning on stderr naming the file), or None when ``root`` holds no checkpoint at all (start afresh); a
    ``CheckpointError`` when every checkpoint is damaged. Otherwise ``resume`` is a checkpoint directory, verified
    (``CheckpointError`` naming the damaged file; no fallback to another checkpoint)."""
    if resume == "latest":
        ckpts = list_checkpoints(root)
        if not ckpts:
            return None
        problems = []
        for path in reversed(ckpts):
            try:
                verify(path)
            except CheckpointError as e:
                problems.append(str(e))
                print(f"warning: {e}; trying an older checkpoint", file=sys.stderr)
                continue
            if problems:
                print(f"warning: resuming from {str(path)!r}, the newest intact checkpoint", file=sys.stderr)
            return path
        raise CheckpointError("resume='latest': every checkpoint is damaged:\n  " + "\n  ".join(problems))
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"resume={resume!r} is not a checkpoint directory (no state.json); "
                                f"use 'latest' or a {PREFIX}N directory")
    verify(path)
    return path


def save(root: str | os.PathLike, iteration: int, *, weights: dict[str, torch.Tensor],
         optimizer: dict, scheduler: dict | None, state: dict, ema: dict[str, torch.Tensor] | None = None,
         rank: int = 0, is_main: bool = True, barrier: Callable[[], None] = lambda: None,
         keep_last: int = 0, extra: Callable[[Path], None] | None = None) -> Path:
    """Write one checkpoint collectively (every rank calls this); returns its final path. ``extra(tmp_dir)`` runs
    on the main process inside the temp dir before the rename (exports: ``flowalign.export``), so it is as atomic
    as the rest."""
    from flowalign.guards import NonFiniteError, first_non_finite

    for kind, tensors in (("weights", weights), ("EMA weights", ema or {})):  # every rank: nobody waits alone
        bad = first_non_finite(list(tensors), tensors.values())
        if bad is not None:
            raise NonFiniteError(f"not saving checkpoint {checkpoint_name(iteration)}: {kind} {bad!r} hold NaN "
                                 "or inf")
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
        if extra is not None:
            extra(tmp)
    barrier()
    torch.save(rng_state(), tmp / f"rng_{rank}.pt")
    barrier()
    if is_main:
        # state.json last: its presence marks a complete checkpoint; it records every other file's sha256
        state = {**state, MANIFEST: _manifest(tmp)}
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
    """Everything ``save`` wrote, as a dict (tensors on CPU); RNG of ``rank`` under ``"rng"``. A file that cannot
    be read (truncated, corrupt) is a ``CheckpointError`` naming it (``verify`` checks the hashes first)."""
    path = Path(path)

    def read(name: str, fn: Callable[[Path], Any]) -> Any:
        try:
            return fn(path / name)
        except Exception as e:  # noqa: BLE001 - safetensors/torch/json raise many types; all mean "damaged"
            raise CheckpointError(f"checkpoint {str(path)!r}: cannot read {name} "
                                  f"({type(e).__name__}: {e})") from e

    out: dict[str, Any] = {
        "state": read("state.json", lambda f: json.loads(f.read_text())),
        "weights": read("weights.safetensors", lambda f: load_file(str(f))),
        "optimizer": read("optimizer.pt", lambda f: torch.load(f, weights_only=True)),
        "path": path,
    }
    out["files"] = out["state"].pop(MANIFEST, {})  # the state as the caller saved it; the manifest apart
    if (path / "ema.safetensors").is_file():
        out["ema"] = read("ema.safetensors", lambda f: load_file(str(f)))
    if (path / "scheduler.pt").is_file():
        out["scheduler"] = read("scheduler.pt", lambda f: torch.load(f, weights_only=True))
    rng = f"rng_{rank}.pt"
    if (path / rng).is_file():  # numpy state holds a dtype object; our own file
        out["rng"] = read(rng, lambda f: torch.load(f, weights_only=False))
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
