"""Run guards of the LLM trainer (issue 22), over ``flowalign.guards`` (the image trainer's):

* ``prepare_output_dir``: a fresh run into an ``output_dir`` holding another run (``metrics.jsonl`` rows or a
  ``checkpoint-*``) is refused (``guards.RunDirError``) unless ``overwrite`` moves the old run aside.
* ``resume_changes``: the checkpoint's ``state.json["config"]`` against the new config (``guards.resume_changes``
  with the LLM schema's key lists); ``apply_changes`` puts allowed optimizer changes (lr, betas, weight decay,
  warm-up) into the loaded optimizer/scheduler, whose state carries the old values.
* ``check_rewards`` / ``check_update``: a NaN/inf reward component, loss or gradient raises
  ``guards.NonFiniteError`` naming the step and the component, before the optimizer step (so no checkpoint with
  non-finite weights follows; ``flowalign.checkpoint.save`` refuses such weights as well).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
import yaml

from flowalign import guards
from flowalign.llm.config import LLMConfig

if TYPE_CHECKING:
    from flowalign.llm.trainer import LLMTrainer

#: cadence / length / output keys of the LLM config: a resume may change them freely
ALWAYS_ALLOWED = ("train.steps", "output_dir", "eval", "checkpoint", "log", "resume")
#: keys that change the trained parameter set: never changed on resume
STRUCTURAL = ("kind", "model.path", "model.lora.enabled", "model.lora.rank", "model.lora.target_modules")


def _ckpt_root(cfg: LLMConfig) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.output_dir) / "checkpoints"


def prepare_output_dir(cfg: LLMConfig, overwrite: bool) -> Path | None:
    """Before a fresh run: refuse a used ``output_dir`` or (``overwrite``) move its run aside; returns where."""
    out = Path(cfg.output_dir)
    if overwrite and int(os.environ.get("RANK", "0")) != 0:  # launched processes: only rank 0 moves the files
        return None
    aside = guards.prepare_output_dir(out, out / "metrics.jsonl", _ckpt_root(cfg), overwrite)
    if aside is not None:
        print(f"--overwrite: the previous run in {out} was moved to {aside}", file=sys.stderr)
    return aside


def resume_changes(cfg: LLMConfig, path: Path, allow: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """The allowed config changes against checkpoint ``path`` (printed); raises ``guards.ResumeConfigError``
    (and restores ``<output_dir>/config.yaml`` to the checkpoint's config, which the trainer had overwritten)."""
    old = json.loads((Path(path) / "state.json").read_text()).get("config") or {}
    try:
        changes = guards.resume_changes(old, cfg.to_dict(), allow, where=str(path), defaults=LLMConfig().to_dict(),
                                        always_allowed=ALWAYS_ALLOWED, structural_keys=STRUCTURAL)
    except guards.ResumeConfigError:  # LLMTrainer wrote the refused config to config.yaml: put the run's back
        if old:
            (Path(cfg.output_dir) / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
        raise
    for key, a, b in changes:
        print(f"--resume: config change {key}: {a!r} -> {b!r}", file=sys.stderr)
    return changes


def apply_changes(tr: "LLMTrainer", changes: Sequence[tuple[str, Any, Any]]) -> None:
    """After ``load``: the new config's AdamW hyper-parameters and LR base. The trainer's schedule is LambdaLR
    (lr = base_lr * min(1, (s + 1) / warmup)); its lambda is already the new config's, its ``base_lrs`` not."""
    keys = {k for k, _, _ in changes}
    if not keys & {"train.lr", "train.betas", "train.weight_decay", "train.warmup_steps"} and \
            not any(k.startswith("train.betas.") for k in keys):
        return
    o = tr.cfg.train
    sched = getattr(tr.sched, "scheduler", tr.sched)  # accelerate wraps the LambdaLR
    sched.base_lrs = [o.lr for _ in sched.base_lrs]
    factors = [fn(sched.last_epoch) for fn in sched.lr_lambdas]
    for g, f in zip(tr.opt.param_groups, factors):
        g.update(initial_lr=o.lr, lr=o.lr * f, betas=tuple(o.betas), weight_decay=o.weight_decay)
    sched._last_lr = [g["lr"] for g in tr.opt.param_groups]


def check_rewards(R: torch.Tensor, names: Sequence[str], step: int) -> None:
    """``R [B, K]``: raise naming the first reward component (column) holding NaN or inf."""
    bad = guards.first_non_finite(list(names), list(R.T))
    if bad is not None:
        raise guards.NonFiniteError(f"step {step}: reward {bad!r} is NaN or inf; stopped before the update, "
                                    "no checkpoint written")


def check_update(step: int, loss: float, named_grads: Iterable[tuple[str, torch.Tensor | None]]) -> None:
    """Before clipping and the optimizer step: raise on a NaN/inf loss, else on the first parameter whose
    gradient holds NaN or inf (checked before clipping, which would smear one inf into NaN everywhere)."""
    if not math.isfinite(loss):
        raise guards.NonFiniteError(f"step {step}: loss is {loss}; stopped before the optimizer step, "
                                    "no checkpoint written")
    pairs = list(named_grads)
    bad = guards.first_non_finite([n for n, _ in pairs], [g for _, g in pairs])
    if bad is not None:
        raise guards.NonFiniteError(f"step {step}: gradient of {bad} is NaN or inf; stopped before the optimizer "
                                    "step, no checkpoint written")
