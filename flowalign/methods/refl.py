"""ReFL (Xu et al., ImageReward, arXiv 2304.05977; ``ImageReward/ReFL.py`` L700-767; reference §A3).

Sample without grad down to a random *late* step ``m``, run the denoiser there with grad, jump to the clean estimate
in one step (``x0_hat = x_m - sigma_m v`` for flow models; DDIM's ``pred_original_sample`` for epsilon models) and
score that. Only one denoiser call carries gradient, so memory does not grow with the number of steps.

Options (``train.method_options``, plus the engine's ``backprop.BackpropOptions``): ``step_range`` ``[lo, hi]`` as
fractions of ``sample.num_steps``: ``m`` is drawn uniformly per micro-batch from
``floor(lo N) .. ceil(hi N) - 1`` (ReFL: 40 steps, ``m in 30..39`` = ``[0.75, 1.0]``; FlowBP: the last 11 of 25);
``endpoint_faithful`` (FlowBP ``flux1/refl.py``): finish the chain without grad and let the reward see the true
sample through ``x0_hat + sg(x_N - x0_hat)`` instead of the blurry estimate (original ReFL: false). Original
defaults to copy in a recipe: ``objective: hinge``, ``hinge: 2.0``, ``loss_scale: 1e-3``, DDPM sampling without CFG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flowalign.adapter import Adapter
from flowalign.config import Config, help_field
from flowalign.data import RewardFn
from flowalign import diff_sampling as ds
from flowalign import sde
from flowalign.methods.backprop import BackpropOptions, Tail, attach_engine, check_backprop_config
from flowalign.methods.base import METHODS, Method, Runtime, option_error
from flowalign.methods.options import compose_options


@dataclass
class ReFLStep:
    """Where ReFL's one differentiable step is, and which image the reward sees."""

    step_range: list[float] = help_field(factory=lambda: [0.75, 1.0], help=(
        "[lo, hi] fractions of sample.num_steps: the grad step m is uniform in floor(lo N) .. ceil(hi N) - 1 "
        "(ReFL 30..39 of 40)."))
    endpoint_faithful: bool = help_field(False, "Reward sees the true final sample via x0_hat + sg(x_N - x0_hat) "
                                                "(FlowBP) instead of x0_hat (ReFL).")

    def check(self, cfg) -> None:
        r = self.step_range
        if not (len(r) == 2 and 0 <= r[0] < r[1] <= 1):
            raise option_error(f"step_range={r}", "must be [lo, hi] with 0 <= lo < hi <= 1")

    def bounds(self, num_steps: int) -> tuple[int, int]:
        """Inclusive index range of the grad step."""
        lo = min(math.floor(self.step_range[0] * num_steps), num_steps - 1)
        hi = max(min(math.ceil(self.step_range[1] * num_steps) - 1, num_steps - 1), lo)
        return lo, hi


@METHODS.register("refl")
class ReFL(Method):
    """Reward feedback learning: one differentiable step at a random late index, reward on its x0 estimate."""

    name = "refl"
    Options = compose_options("ReFLOptions", BackpropOptions, ReFLStep)

    def __init__(self, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, adapter, reward_fn, runtime)
        self.step = attach_engine(self, cfg, adapter, reward_fn).part(ReFLStep)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        check_backprop_config(cls.name, cfg, deterministic_only=False)

    def forward(self, x, cond, sigmas, draw, noise, norms) -> Tail:
        e, n = self.engine, len(sigmas) - 1
        lo, hi = self.step.bounds(n)
        m = int(torch.randint(lo, hi + 1, (1,), generator=draw))
        kw = e.chain_kwargs(None, noise)
        x_m = ds.integrate(e.adapter, x, cond, sigmas, stop=m, **kw).x  # no grad
        if norms is not None:
            x_m = x_m.detach().requires_grad_(True)
            norms.watch("latent", x_m, m)
        out = ds.predict(e.adapter, x_m, sigmas[m], cond, kw["guidance"], e.opts.checkpoint)
        if norms is not None:
            norms.watch("out", out, m)
        x0 = ds.predict_x0(e.adapter, x_m, out, sigmas[m])
        metrics = {"refl_step": float(m)}
        if self.step.endpoint_faithful:
            with torch.no_grad():  # finish the chain: step m with its own prediction, then the rest
                step_noise = (torch.randn(x.shape, generator=noise, device=x.device, dtype=torch.float32)
                              if sde.is_stochastic(kw["kernel"], kw["noise_level"]) else None)
                x_next = ds.transition(kw["kernel"], x_m.detach(), out.detach(), sigmas[m], sigmas[m + 1],
                                       kw["noise_level"], step_noise)
                x_end = ds.integrate(e.adapter, x_next, cond, sigmas, start=m + 1, **kw).x
            metrics["refl_endpoint_gap"] = (x_end - x0.detach()).abs().mean()
            x0 = ds.straight_through(x0, x_end)
        return Tail(e.decode(x0), metrics=metrics)


