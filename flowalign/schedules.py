"""Which denoising steps are stochastic (SDE) and which are trained.

A schedule returns a ``StepPlan`` for one rollout round: boolean masks over the ``num_steps`` transitions.
Steps outside ``sde`` use the deterministic ODE kernel (log-prob 0); ``train`` is always a subset of ``sde``.

* ``all`` -- every step SDE; train the first ``int(num_steps * fraction)`` steps in order (flow_grpo
  ``timestep_fraction``, default 0.99 -> 9 of 10; the near-deterministic last step is left out).
* ``fraction`` -- train the leading fraction; with ``ode_outside=True`` the other steps are ODE (the shapes
  prototype: SDE on the first 4 of 10 steps).
* ``window`` -- Flow-GRPO-Fast: a window of ``size`` consecutive steps with start drawn uniformly in
  ``[lo, hi - size]`` from the run's generator, once per round, so every member of a group gets the same window
  (flow_grpo draws it per GPU from Python's global ``random``; that splits groups -- see reference §2.7).
* ``sliding`` -- MixGRPO (arXiv 2507.21802): a window of ``size`` steps that advances by ``stride`` every
  ``shift_interval`` iterations, rolling back to 0 past ``max_start`` (= num_steps - 2 by default, as MixGRPO).
* ``branch`` -- tree rollouts: all steps SDE and trained; ``branch_steps`` lists the split steps.
* ``subsample`` -- DanceGRPO (arXiv 2505.07818) timestep subsampling: every step SDE; train a random
  ``int(n * fraction)`` of the ``n`` candidate steps (all but the last with ``exclude_last``, as DanceGRPO's
  ``[:, :-1]``), drawn once per round from the run's generator. DanceGRPO draws a permutation per sample; one draw per
  round trains every step with the same probability and lets the trainer batch rows by step.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from flowalign.registry import Registry

SCHEDULES: Registry[Callable[..., "StepPlan"]] = Registry("schedule")


@dataclass
class StepPlan:
    sde: Tensor  # bool [num_steps]
    train: Tensor  # bool [num_steps], subset of sde
    branch_steps: list[int] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return int(self.sde.numel())

    def trained_indices(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.train).flatten()]


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")


def _window_plan(num_steps: int, start: int, size: int) -> StepPlan:
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[start : start + size] = True
    return StepPlan(sde=mask.clone(), train=mask)


@SCHEDULES.register("all")
def all_steps(num_steps: int, fraction: float = 0.99, **_) -> StepPlan:
    return fraction_steps(num_steps, fraction=fraction, ode_outside=False)


@SCHEDULES.register("fraction")
def fraction_steps(num_steps: int, fraction: float = 0.99, ode_outside: bool = False, **_) -> StepPlan:
    _check_steps(num_steps)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, int(num_steps * fraction))
    train = torch.zeros(num_steps, dtype=torch.bool)
    train[:k] = True
    sde = train.clone() if ode_outside else torch.ones(num_steps, dtype=torch.bool)
    return StepPlan(sde=sde, train=train)


@SCHEDULES.register("window")
def random_window(num_steps: int, size: int = 2, lo: int = 0, hi: int | None = None,
                  generator: torch.Generator | None = None, **_) -> StepPlan:
    _check_steps(num_steps)
    hi = num_steps if hi is None else hi
    if not 1 <= size <= hi - lo or lo < 0 or hi > num_steps:
        raise ValueError(
            f"window size={size} must fit in range [lo={lo}, hi={hi}) within num_steps={num_steps}; "
            f"use 1 <= size <= hi - lo <= num_steps"
        )
    start = lo + int(torch.randint(0, hi - size - lo + 1, (1,), generator=generator))
    return _window_plan(num_steps, start, size)


@SCHEDULES.register("sliding")
def sliding_window(num_steps: int, size: int = 4, stride: int = 1, shift_interval: int = 25, iteration: int = 0,
                   max_start: int | None = None, **_) -> StepPlan:
    _check_steps(num_steps)
    max_start = num_steps - 2 if max_start is None else max_start
    if not 1 <= size <= num_steps:
        raise ValueError(f"sliding window size={size} must be in [1, num_steps={num_steps}]")
    if stride < 1 or shift_interval < 1:
        raise ValueError(f"stride ({stride}) and shift_interval ({shift_interval}) must be >= 1")
    positions = max(1, min(max_start, num_steps - size) // stride + 1)
    start = ((iteration // shift_interval) % positions) * stride
    return _window_plan(num_steps, start, size)


@SCHEDULES.register("branch")
def branch_points(num_steps: int, branch_steps: Sequence[int] = (0, 3, 6, 9), **_) -> StepPlan:
    _check_steps(num_steps)
    steps = sorted(set(int(s) for s in branch_steps))
    if any(s < 0 or s >= num_steps for s in steps):
        raise ValueError(f"branch_steps {steps} must lie in [0, num_steps={num_steps})")
    ones = torch.ones(num_steps, dtype=torch.bool)
    return StepPlan(sde=ones, train=ones.clone(), branch_steps=steps)


@SCHEDULES.register("subsample")
def subsample(num_steps: int, fraction: float = 0.6, exclude_last: bool = True,
              generator: torch.Generator | None = None, **_) -> StepPlan:
    _check_steps(num_steps)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = num_steps - 1 if exclude_last and num_steps > 1 else num_steps
    pick = torch.randperm(n, generator=generator)[: max(1, int(n * fraction))]
    train = torch.zeros(num_steps, dtype=torch.bool)
    train[pick] = True
    return StepPlan(sde=torch.ones(num_steps, dtype=torch.bool), train=train)


#: arguments every schedule receives from the caller, not from ``sample.schedule_options``
_CALLER_ARGS = {"num_steps", "generator", "iteration"}


def schedule_options(name: str) -> set[str] | None:
    """The option names schedule ``name`` accepts (its keyword parameters minus ``num_steps``, ``generator``,
    ``iteration``); None when it takes arbitrary ``**kwargs``. A ``**_`` catch-all (the built-ins') swallows the
    caller's arguments only, so it does not make every option valid."""
    params = inspect.signature(SCHEDULES.get(name)).parameters.values()
    if any(p.kind is p.VAR_KEYWORD and p.name != "_" for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - _CALLER_ARGS


def make_plan(name: str, num_steps: int, generator: torch.Generator | None = None, iteration: int = 0,
              **options) -> StepPlan:
    """Build the plan of schedule ``name`` (see module docstring) for one rollout round. An option the schedule
    does not take is a ValueError (a typo such as ``fration`` must not fall back to the default silently)."""
    allowed = schedule_options(name)
    unknown = sorted(set(options) - allowed) if allowed is not None else []
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(allowed or ()), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"schedule {name!r} has no option {unknown[0]!r}.{hint} "
                         f"Options: {', '.join(sorted(allowed or ())) or '(none)'}")
    return SCHEDULES.get(name)(num_steps, generator=generator, iteration=iteration, **options)
