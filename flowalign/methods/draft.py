"""DRaFT-K and DRaFT-LV (Clark, Vicol, Swersky, Fleet; arXiv 2309.17400, ICLR 2024; reference §A2).

* ``draft`` (DRaFT-K): backprop the reward through the last ``K`` steps of the *deterministic* sampler (ODE for
  flow models, DDIM eta=0 for epsilon models); the state ``x_K`` is a constant. It composes AlignProp's truncation
  rule (``alignprop.Truncation``) with another default: ``truncation: fixed``, ``k: 1`` (K=1 works best in the
  paper); ``truncation: none`` is full DRaFT (every step, checkpointed). All AlignProp options apply.
* ``draft_lv`` (DRaFT-LV, K=1): sample ``x_N`` without grad, re-noise it ``n = lv_samples`` times to the last
  step's level, ``x~_{N-1}^(i) = renoise(sg(x_N), eps_i, sigma_{N-1})`` (flow: ``(1 - s) x + s eps``; FlowBP
  ``sd35/draft_lv.py`` default n=2), run the last step with grad on the true ``x_{N-1}`` and on every copy (one
  batched call) and average the reward objective over the ``n + 1`` images: a lower-variance estimate of the
  K=1 gradient for the same number of backward passes.

Both hold the shared engine ``backprop.RewardBackprop`` (prompts, noise, batching, reward, objective).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowalign.adapter import Adapter, Cond
from flowalign.config import Config, help_field
from flowalign.data import RewardFn
from flowalign import diff_sampling as ds
from flowalign.methods.alignprop import Truncation, truncated_chain
from flowalign.methods.backprop import BackpropOptions, Tail, attach_engine, check_backprop_config
from flowalign.methods.base import METHODS, Method, Runtime, option_error
from flowalign.methods.options import compose_options


@METHODS.register("draft")
class DraftK(Method):
    """DRaFT-K: AlignProp's chain through the deterministic sampler with a fixed truncation K (default 1)."""

    name = "draft"
    Options = compose_options("DraftOptions", BackpropOptions, Truncation, truncation=help_field(
        "fixed", "DRaFT-K: fixed (the last k steps); none = full DRaFT; uniform/gaussian as AlignProp."))

    def __init__(self, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, adapter, reward_fn, runtime)
        self.trunc = attach_engine(self, cfg, adapter, reward_fn).part(Truncation)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        check_backprop_config(cls.name, cfg, deterministic_only=True)

    def forward(self, x, cond, sigmas, draw, noise, norms) -> Tail:
        return truncated_chain(self.engine, self.trunc, x, cond, sigmas, draw, noise, norms)


@dataclass
class LowVariance:
    """DRaFT-LV's re-noised copies."""

    lv_samples: int = help_field(2, "n: re-noised copies of the sample that also get a differentiable last step "
                                    "(DRaFT-LV; FlowBP default 2).")

    def check(self, cfg) -> None:
        if self.lv_samples < 0:
            raise option_error("lv_samples", f"must be >= 0, got {self.lv_samples}")


@METHODS.register("draft_lv")
class DraftLV(Method):
    """DRaFT-LV: the K=1 gradient averaged over the sample and ``lv_samples`` re-noised copies of it."""

    name = "draft_lv"
    Options = compose_options("DraftLVOptions", BackpropOptions, LowVariance)

    def __init__(self, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, adapter, reward_fn, runtime)
        self.lv = attach_engine(self, cfg, adapter, reward_fn).part(LowVariance)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        check_backprop_config(cls.name, cfg, deterministic_only=True)

    def forward(self, x, cond, sigmas, draw, noise, norms) -> Tail:
        e, n, copies = self.engine, len(sigmas) - 1, self.lv.lv_samples
        kw = e.chain_kwargs(None, noise)
        chain = ds.integrate(e.adapter, x, cond, sigmas, capture=[n - 1], **kw)  # no grad anywhere
        eps = torch.randn((copies, *x.shape), generator=noise, device=x.device, dtype=torch.float32)
        last = [chain.states[n - 1]] + [ds.renoise(e.adapter, chain.x, z, sigmas[n - 1]) for z in eps]
        x_in = torch.cat(last)
        if norms is not None:
            x_in.requires_grad_(True)
            norms.watch("latent", x_in, n - 1)
        cond_in = Cond.cat([cond] * (copies + 1))
        out = ds.predict(e.adapter, x_in, sigmas[n - 1], cond_in, kw["guidance"], e.opts.checkpoint)
        if norms is not None:
            norms.watch("out", out, n - 1)
        x_n = ds.transition(kw["kernel"], x_in, out, sigmas[n - 1], sigmas[n])
        b = x.shape[0]
        return Tail(e.decode(x_n), rows=torch.arange(b).repeat(copies + 1),
                    weight=torch.full((b * (copies + 1),), 1.0 / (copies + 1)))


