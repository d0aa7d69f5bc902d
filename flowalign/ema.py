"""EMA of the trainable parameters with flow_grpo's schedule (``flow_grpo/ema.py::EMAModuleWrapper``).

``decay_n = min((1 + n) / (10 + n), decay)`` and the average is applied only when ``(n + 1) % interval == 0``,
``n`` being the trainer's optimizer-step counter (flow_grpo: decay 0.9, interval 8, LoRA params only).

Why not ``diffusers.training_utils.EMAModel``: its warm-up counts its *own* ``step`` calls
(``(1 + k) / (10 + k)`` with ``k`` = number of calls minus one), so applying it every 8th step gives a different
decay sequence from flow_grpo; it also has no notion of an update interval. The schedule is 3 lines, so we keep
them here and make the state a plain tensor dict (safetensors) for exact resume.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn


class EMA:
    """Shadow copies of ``params`` (fp32, same device)."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float = 0.9, interval: int = 8) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.params = list(params)
        self.decay = decay
        self.interval = interval
        self.shadow = [p.detach().clone().float() for p in self.params]

    def decay_at(self, step: int) -> float:
        """flow_grpo ``get_current_decay``: warm-up ``(1 + n) / (10 + n)`` capped at ``decay``."""
        return min((1 + step) / (10 + step), self.decay)

    @torch.no_grad()
    def step(self, step: int) -> bool:
        """Average in the live weights after optimizer step ``step`` (0-based); returns whether it applied."""
        if (step + 1) % self.interval:
            return False
        w = 1.0 - self.decay_at(step)
        for s, p in zip(self.shadow, self.params):
            s.add_(w * (p.detach().float() - s))
        return True

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the live parameters (eval, save); restores them bit-exactly."""
        backup = [p.detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)
        try:
            yield
        finally:
            for b, p in zip(backup, self.params):
                p.copy_(b)

    def state_dict(self, names: Sequence[str]) -> dict[str, Tensor]:
        return {n: s for n, s in zip(names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], names: Sequence[str]) -> None:
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for s, n in zip(self.shadow, names):
            s.copy_(state[n])
