"""Run guards of the trainer (issue 22): non-finite values stop the run, runs never mix in one output directory,
and a resume refuses config changes that break exactness.

* ``NonFiniteError``: a NaN/inf loss, gradient, weight or reward, naming the iteration and the component; no
  checkpoint is written after it (``flowalign.checkpoint.save`` refuses non-finite weights as well).
* ``prepare_output_dir``: a fresh run (no ``resume``) into a directory that already holds a run (its metrics
  JSONL or a ``checkpoint-*`` directory) is refused, unless ``overwrite``: then the old run's files (metrics,
  checkpoints, ``config.yaml``, ``samples/``, ``eval/``) are **moved aside** into ``<output_dir>/overwritten-<UTC
  time>/`` (nothing is deleted; remove that folder by hand when it is not needed).
* ``resume_changes``: the checkpoint's config (``state.json["config"]``) against the new one, key by key.
  ``ALWAYS_ALLOWED`` keys (run length, cadence of logs/evals/checkpoints, output paths, eval settings) change
  freely; ``STRUCTURAL`` keys change the trained parameter set or the method's saved state and can never change
  on resume; every other change is refused unless named in ``allow`` (``--allow-config-change KEY``, a key or
  a section prefix such as ``reward``). Allowed changes are returned, to be applied and logged.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch


class NonFiniteError(FloatingPointError):
    """A NaN or inf in training (loss, gradient, weights, reward), naming the iteration and the component."""


class RunDirError(RuntimeError):
    """A fresh run into a directory that holds another run's metrics or checkpoints."""


class ResumeConfigError(ValueError):
    """The resumed config differs from the checkpoint's in keys that break an exact continuation."""


def first_non_finite(names: Sequence[str], tensors: Iterable[torch.Tensor | None]) -> str | None:
    """Name of the first tensor holding a NaN or inf (None: all finite; None entries are skipped)."""
    for name, t in zip(names, tensors):
        if t is not None and not bool(torch.isfinite(t.detach()).all()):
            return name
    return None


# ----------------------------------------------------------------------------------------------- output dir
def run_files(output_dir: Path, jsonl: Path, ckpt_dir: Path) -> list[Path]:
    """The files of a previous run found in ``output_dir`` (empty: the directory may be used)."""
    found = []
    if jsonl.is_file() and jsonl.stat().st_size > 0:
        found.append(jsonl)
    if ckpt_dir.is_dir() and any(p.name.startswith("checkpoint-") for p in ckpt_dir.iterdir()):
        found.append(ckpt_dir)
    return found


def prepare_output_dir(output_dir: Path, jsonl: Path, ckpt_dir: Path, overwrite: bool) -> Path | None:
    """Refuse (``RunDirError``) or, with ``overwrite``, move the previous run aside; returns where it went."""
    found = run_files(output_dir, jsonl, ckpt_dir)
    if not found:
        return None
    if not overwrite:
        raise RunDirError(
            f"output_dir {str(output_dir)!r} already holds a run ({', '.join(str(p) for p in found)}); a fresh run "
            "would mix its metrics and checkpoints with it. Continue it with --resume latest, choose another "
            "output_dir, or pass --overwrite (the old run is moved to <output_dir>/overwritten-<time>/)")
    aside = output_dir / time.strftime("overwritten-%Y%m%d-%H%M%S", time.gmtime())
    aside.mkdir(parents=True, exist_ok=False)
    for p in {jsonl, ckpt_dir, output_dir / "config.yaml", output_dir / "samples", output_dir / "eval"}:
        if p.exists():
            shutil.move(str(p), str(aside / p.name))
    return aside


# ----------------------------------------------------------------------------------------------- resume
#: keys whose change keeps the continuation exact (or only changes when things are logged/saved/evaluated)
ALWAYS_ALLOWED = ("max_iterations", "max_minutes", "resume", "output_dir", "log", "eval", "checkpoint")
#: keys that change the trainable parameter set or the method's saved state: never changed on resume
STRUCTURAL = ("model.adapter", "model.lora.enabled", "model.lora.rank", "model.lora.target_modules", "train.method",
              "ema.enabled")

_MISSING = object()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _covered(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return a == b or (math.isnan(a) and math.isnan(float(b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def config_changes(old: dict, new: dict, defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for every dotted key whose value differs (missing on one side: ``<absent>``). A key the
    old config lacks (a checkpoint of an older version) counts as its value in ``defaults`` when given."""
    fo, fn, fd = _flat(old), _flat(new), _flat(defaults or {})
    out = []
    for key in sorted(set(fo) | set(fn)):
        a, b = fo.get(key, fd.get(key, _MISSING)), fn.get(key, _MISSING)
        if a is _MISSING or b is _MISSING or not _same(a, b):
            out.append((key, "<absent>" if a is _MISSING else a, "<absent>" if b is _MISSING else b))
    return out


def resume_changes(old: dict, new: dict, allow: Sequence[str] = (), where: str = "the checkpoint",
                   defaults: dict | None = None, always_allowed: Sequence[str] = ALWAYS_ALLOWED,
                   structural_keys: Sequence[str] = STRUCTURAL) -> list[tuple[str, Any, Any]]:
    """The config changes of a resume that are allowed (to apply and log); raises ``ResumeConfigError`` listing
    every refused key with its old and new value. ``always_allowed`` / ``structural_keys``: the key lists of the
    trainer's config schema (default: the image config's; the LLM trainer passes its own)."""
    changes = config_changes(old, new, defaults)
    structural = [c for c in changes if _covered(c[0], structural_keys)]
    refused = [c for c in changes if not _covered(c[0], always_allowed) and not _covered(c[0], allow)
               and c not in structural]
    if structural or refused:
        lines = [f"  {k}: {a!r} -> {b!r}" for k, a, b in structural + refused]
        msg = f"--resume: the config differs from {where} in keys that break an exact continuation:\n" + \
            "\n".join(lines)
        if structural:
            msg += ("\n" + ", ".join(k for k, _, _ in structural) + " change(s) the trained parameters or the "
                    "method's state and cannot change on resume: start a new run (another output_dir), or start "
                    "from these weights with model.lora.path")
        if refused:
            msg += ("\nto accept them, pass --allow-config-change " + " ".join(k for k, _, _ in refused))
        raise ResumeConfigError(msg)
    return [c for c in changes if not _covered(c[0], ("resume",))]
