"""DRaFT-K and DRaFT-LV (Clark, Vicol, Swersky, Fleet; arXiv 2309.17400, ICLR 2024; reference §A2).

* ``draft`` (DRaFT-K): backprop the reward through the last ``K`` steps of the *deterministic* sampler (ODE for
  flow models, DDIM eta=0 for epsilon models); the state ``x_K`` is a constant. It is AlignProp with a fixed
  truncation: ``truncation: fixed``, ``k: 1`` by default (K=1 works best in the paper); ``truncation: none`` is
  full DRaFT (every step, checkpointed). All AlignProp options apply (``alignprop.py``).
* ``draft_lv`` (DRaFT-LV, K=1): sample ``x_N`` without grad, re-noise it ``n = lv_samples`` times to the last
  step's level, ``x~_{N-1}^(i) = renoise(sg(x_N), eps_i, sigma_{N-1})`` (flow: ``(1 - s) x + s eps``; FlowBP
  ``sd35/draft_lv.py`` default n=2), run the last step with grad on the true ``x_{N-1}`` and on every copy (one
  batched call) and average the reward objective over the ``n + 1`` images: a lower-variance estimate of the
  K=1 gradient for the same number of backward passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from flowalign import diff_sampling as ds
from flowalign.config import ConfigError, help_field
from flowalign.methods.alignprop import (
    OPTIONS_KEY,
    AlignProp,
    AlignPropOptions,
    BackpropOptions,
    RewardBackprop,
    Tail,
)
from flowalign.methods.base import METHODS

from flowalign.adapter import Cond


@dataclass
class DraftOptions(AlignPropOptions):
    truncation: Literal["uniform", "gaussian", "fixed", "none"] = help_field(
        "fixed", "DRaFT-K: fixed (the last k steps); none = full DRaFT; uniform/gaussian as AlignProp.")


@dataclass
class DraftLVOptions(BackpropOptions):
    lv_samples: int = help_field(2, "n: re-noised copies of the sample that also get a differentiable last step "
                            "(DRaFT-LV; FlowBP default 2).")

    def check(self, cfg) -> None:
        super().check(cfg)
        if self.lv_samples < 0:
            raise ConfigError(f"{OPTIONS_KEY}.lv_samples must be >= 0, got {self.lv_samples}")


@METHODS.register("draft")
class DraftK(AlignProp):
    """DRaFT-K: AlignProp's chain through the deterministic sampler with a fixed truncation K (default 1)."""

    name = "draft"
    Options = DraftOptions
    deterministic_only = True


@METHODS.register("draft_lv")
class DraftLV(RewardBackprop):
    """DRaFT-LV: the K=1 gradient averaged over the sample and ``lv_samples`` re-noised copies of it."""

    name = "draft_lv"
    Options = DraftLVOptions
    deterministic_only = True

    def forward(self, x, cond, sigmas, draw, noise, norms) -> Tail:
        n, copies = len(sigmas) - 1, self.opts.lv_samples
        kw = self.chain_kwargs(None, noise)
        chain = ds.integrate(self.adapter, x, cond, sigmas, capture=[n - 1], **kw)  # no grad anywhere
        eps = torch.randn((copies, *x.shape), generator=noise, device=x.device, dtype=torch.float32)
        last = [chain.states[n - 1]] + [ds.renoise(self.adapter, chain.x, e, sigmas[n - 1]) for e in eps]
        x_in = torch.cat(last)
        if norms is not None:
            x_in.requires_grad_(True)
            norms.watch("latent", x_in, n - 1)
        cond_in = Cond.cat([cond] * (copies + 1))
        out = ds.predict(self.adapter, x_in, sigmas[n - 1], cond_in, kw["guidance"], self.opts.checkpoint)
        if norms is not None:
            norms.watch("out", out, n - 1)
        x_n = ds.transition(kw["kernel"], x_in, out, sigmas[n - 1], sigmas[n])
        b = x.shape[0]
        return Tail(self.decode(x_n), rows=torch.arange(b).repeat(copies + 1),
                    weight=torch.full((b * (copies + 1),), 1.0 / (copies + 1)))
