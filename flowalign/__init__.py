"""flowalign: align flow-matching / diffusion generators (and LLMs) with rewards.

Public API (imported lazily, so ``import flowalign`` stays cheap)::

    from flowalign import load_config, Trainer, train          # the trainer and its config
    from flowalign import METHODS, Method, ADVANTAGES, POLICY_LOSSES, KERNELS, SCHEDULES, Registry
    from flowalign import sample, Trajectory, make_plan, EMA
    from flowalign import run_checks, set_deterministic                # flowalign doctor, deterministic mode
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "flowalign.config", "load_config": "flowalign.config", "ConfigError": "flowalign.config",
    "Trainer": "flowalign.trainer", "train": "flowalign.trainer",
    "Method": "flowalign.methods.base", "METHODS": "flowalign.methods", "Batch": "flowalign.methods.base",
    "Collected": "flowalign.methods.base", "Runtime": "flowalign.methods.base",
    "ADVANTAGES": "flowalign.advantages", "POLICY_LOSSES": "flowalign.losses",
    "KERNELS": "flowalign.sde", "SCHEDULES": "flowalign.schedules", "make_plan": "flowalign.schedules",
    "StepPlan": "flowalign.schedules", "sample": "flowalign.rollout", "Trajectory": "flowalign.rollout",
    "recompute_log_probs": "flowalign.rollout", "Registry": "flowalign.registry", "EMA": "flowalign.ema",
    "run_checks": "flowalign.doctor", "set_deterministic": "flowalign.determinism",
}

__all__ = [*sorted(_EXPORTS), "__version__"]  # noqa: PLE0605


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flowalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
