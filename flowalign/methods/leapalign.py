"""LeapAlign (Liang, Yang, Wu, Feng, Zheng; "Post-Training Flow Matching Models at Any Generation Step by Building
Two-Step Trajectories", arXiv 2604.15311, CVPR 2026; reference ``backprop_preference.md`` §A5).

Full backprop through the sampler costs memory that grows with the number of steps and its gradients explode;
ReFL / DRaFT-K only train the last steps. LeapAlign shortens the long trajectory to two *leaps* so any step can be
trained at the memory of two denoiser calls:

1. Sample the whole ODE trajectory ``x_0 .. x_N`` without grad (``x_i`` = state before step ``i``; ``x_N`` the
   sample). Draw two indices ``k < j`` (``index_sampler``).
2. **Leap 1** from ``x_k``: ``x^_j = x_k + (sigma_j - sigma_k) v(x_k, sigma_k)`` (one prediction over ``j - k``
   steps). **Connector** (``connector``): ``straight_through`` continues from ``x^_j + sg(x_j - x^_j)`` -- the true
   ``x_j`` in value, the leap's gradient (FlowBP ``flux1/leapalign.py``); ``leap`` continues from ``x^_j`` itself
   (a genuine two-step trajectory).
3. **Leap 2** from there: ``x^_0 = x_j + (sigma_N - sigma_j) v(x_j~, sigma_j)`` where the network input ``x_j~``
   carries the *nested* gradient term (through the network's input Jacobian, the large-magnitude part) scaled by
   ``nested_scale`` ``a``: ``x_j~ = a x_j + (1 - a) sg(x_j)`` -- down-weighted instead of dropped (``a = 0`` is
   DRTune's stop-gradient, ``a = 1`` the plain chain rule; FlowBP ``alpha = 0.3``). The linear path ``x_j -> x^_0``
   keeps its full gradient.
4. **Reward input** (``reward_input``): ``endpoint`` scores the true sample through ``x^_0 + sg(x_N - x^_0)`` (the
   reward sees ``x_N``, gradients flow through both leaps; FlowBP); ``leap`` scores ``x^_0`` itself.
5. **Trajectory-consistency weight** (``weighting``): ``inverse_distance`` multiplies a sample's loss by
   ``1 / (max(d_j, tau) + max(d_0, tau))`` with ``d_j = dist(x^_j, x_j)``, ``d_0 = dist(x^_0, x_N)`` (``distance``:
   ``l1`` mean absolute difference as FlowBP, or ``l2`` root mean square), so two-step trajectories that agree with
   the long path count more; ``none`` weighs every sample 1. Weights are not normalised over the batch.

Index draws (``index_sampler``, FlowBP ``jk_sampling.py``; indices in ``index_range`` ``[lo, hi)``, default
``[0, N)``, always ``lo <= k < j < hi``): ``uniform`` a uniformly random pair (FlowBP's default), ``midpoint`` ``k``
uniform and ``j = (k + hi) // 2``, ``midpoint_j`` ``j`` uniform and ``k = (lo + j) // 2``, ``dirichlet`` segment
lengths ``[lo, k), [k, j), [j, hi)`` from ``Dir(alpha, alpha, alpha)`` (``dirichlet_alpha``, FlowBP 4.2: lower
variance of the gap). ``draw``: one pair per micro-batch (``batch``, FlowBP) or one per sample (``sample``).
The paper's loss on HPSv2.1: ``objective: hinge``, ``hinge: 0.55``. Memory: the no-grad trajectory keeps only the
current state and the two captured ones, and two checkpointed calls keep a graph: flat in ``N``
(``benchmarks/backprop_memory.py``). Cost: ``N + 2`` denoiser calls per sample (the two leaps re-run the calls at
``k`` and ``j`` with grad).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from flowalign.adapter import Adapter
from flowalign.config import Config, help_field
from flowalign.data import RewardFn
from flowalign import diff_sampling as ds
from flowalign.methods.backprop import BackpropOptions, Tail, attach_engine, check_backprop_config
from flowalign.methods.base import METHODS, Method, Runtime, option_error
from flowalign.methods.options import compose_options

INDEX_SAMPLERS = ("uniform", "midpoint", "midpoint_j", "dirichlet")


@dataclass
class Leaps:
    """LeapAlign's index draws, leaps and weights (module docstring)."""

    index_sampler: Literal["uniform", "midpoint", "midpoint_j", "dirichlet"] = help_field(
        "uniform", "How (k, j) are drawn: uniform pair, midpoint (j halfway from k to the end), midpoint_j (k halfway "
                   "from the start to j), dirichlet segment lengths (FlowBP jk_sampling).")
    dirichlet_alpha: float = help_field(4.2, "Concentration of index_sampler=dirichlet (FlowBP 4.2).")
    index_range: list[int] | None = help_field(None, "[lo, hi): steps k and j may take; null = [0, num_steps).")
    draw: Literal["batch", "sample"] = help_field("batch", "One (k, j) per micro-batch (FlowBP) or one per sample.")
    nested_scale: float = help_field(0.3, "Scale a of the nested gradient through the network input at j (0 = DRTune's "
                                  "stop-gradient, 1 = full chain rule; FlowBP 0.3).")
    connector: Literal["straight_through", "leap"] = help_field(
        "straight_through", "Leap 2 starts from x^_j + sg(x_j - x^_j) (true x_j in value) or from x^_j itself.")
    reward_input: Literal["endpoint", "leap"] = help_field(
        "endpoint", "The reward sees the true sample via x^_0 + sg(x_N - x^_0) (FlowBP) or the leap's x^_0.")
    weighting: Literal["inverse_distance", "none"] = help_field(
        "inverse_distance", "Per-sample weight 1 / (max(d_j, tau) + max(d_0, tau)) (FlowBP), or none.")
    distance: Literal["l1", "l2"] = help_field("l1", "d_j, d_0: mean |difference| (l1, FlowBP) or root mean square "
                                                     "(l2).")
    tau: float = help_field(0.1, "Floor of each distance in the weight (FlowBP 0.1): caps a weight at 1 / (2 tau).")

    def check(self, cfg) -> None:
        n = cfg.sample.num_steps
        lo, hi = self.index_range if self.index_range is not None else (0, n)
        if self.index_range is not None and len(self.index_range) != 2:
            raise option_error(f"index_range={self.index_range}", "must be [lo, hi)")
        if not (0 <= lo and lo + 2 <= hi <= n):
            raise option_error(f"index_range=[{lo}, {hi})", f"must hold two steps k < j within "
                               f"[0, sample.num_steps={n}) (LeapAlign needs num_steps >= 2)")
        if not 0 <= self.nested_scale <= 1:
            raise option_error("nested_scale", f"must be in [0, 1], got {self.nested_scale}")
        if self.tau <= 0:
            raise option_error("tau", f"must be > 0, got {self.tau}")
        if self.dirichlet_alpha <= 0:
            raise option_error("dirichlet_alpha", f"must be > 0, got {self.dirichlet_alpha}")

    def window(self, num_steps: int) -> tuple[int, int]:
        return tuple(self.index_range) if self.index_range is not None else (0, num_steps)  # type: ignore[return-value]


def draw_pair(sampler: str, lo: int, hi: int, gen: torch.Generator, alpha: float = 4.2) -> tuple[int, int]:
    """Two step indices ``lo <= k < j < hi`` (see module docstring, ``index_sampler``)."""
    if hi - lo < 2:
        raise ValueError(f"need at least two steps in [lo={lo}, hi={hi})")
    if sampler == "uniform":
        k, j = sorted((torch.randperm(hi - lo, generator=gen)[:2] + lo).tolist())
    elif sampler == "midpoint":
        k = int(torch.randint(lo, hi - 1, (1,), generator=gen))
        j = (k + hi) // 2
    elif sampler == "midpoint_j":
        j = int(torch.randint(lo + 1, hi, (1,), generator=gen))
        k = (lo + j) // 2
    elif sampler == "dirichlet":
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
        free = hi - lo - 2  # [k, j) and [j, hi) hold at least one step each
        props = rng.dirichlet([alpha] * 3)
        seg = np.floor(props * free).astype(int)
        seg[int(np.argmax(props))] += free - int(seg.sum())
        k = lo + int(seg[0])
        j = k + 1 + int(seg[1])
    else:
        raise ValueError(f"index_sampler={sampler!r} is not allowed. Allowed: {', '.join(INDEX_SAMPLERS)}")
    assert lo <= k < j < hi, (sampler, lo, hi, k, j)
    return int(k), int(j)


def _distance(a: Tensor, b: Tensor, kind: str) -> Tensor:
    diff = (a.detach() - b.detach()).flatten(1).double()
    return diff.abs().mean(1) if kind == "l1" else diff.pow(2).mean(1).sqrt()


@METHODS.register("leapalign")
class LeapAlign(Method):
    """Two-leap reward backprop from a no-grad ODE trajectory (module docstring)."""

    name = "leapalign"
    Options = compose_options("LeapAlignOptions", BackpropOptions, Leaps)

    def __init__(self, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, adapter, reward_fn, runtime)
        self.leaps = attach_engine(self, cfg, adapter, reward_fn).part(Leaps)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        check_backprop_config(cls.name, cfg, deterministic_only=True)


    def forward(self, x, cond, sigmas, draw, noise, norms) -> Tail:
        o, e = self.leaps, self.engine
        a, ckpt = e.adapter, e.opts.checkpoint
        n, b = len(sigmas) - 1, x.shape[0]
        lo, hi = o.window(n)
        pairs = [draw_pair(o.index_sampler, lo, hi, draw, o.dirichlet_alpha)
                 for _ in range(b if o.draw == "sample" else 1)]
        k = torch.tensor([p[0] for p in pairs]).expand(b)
        j = torch.tensor([p[1] for p in pairs]).expand(b)
        kw = e.chain_kwargs(None, noise)
        chain = ds.integrate(a, x, cond, sigmas, capture=sorted(set(k.tolist()) | set(j.tolist())), **kw)
        x_n = chain.x
        x_k = torch.stack([chain.states[int(k[i])][i] for i in range(b)])
        x_j = torch.stack([chain.states[int(j[i])][i] for i in range(b)])
        # per-sample sigmas only when the indices differ per sample (every adapter takes a scalar)
        s_k, s_j = (sigmas[k], sigmas[j]) if o.draw == "sample" else (sigmas[int(k[0])], sigmas[int(j[0])])
        s_n = sigmas[n]

        if norms is not None:
            x_k = x_k.detach().requires_grad_(True)
            norms.watch("latent", x_k, k)
        v_k = ds.predict(a, x_k, s_k, cond, kw["guidance"], ckpt)  # leap 1
        xj_hat = ds.leap(a, x_k, v_k, s_k, s_j)
        xj = ds.straight_through(xj_hat, x_j) if o.connector == "straight_through" else xj_hat
        if norms is not None:
            norms.watch("out", v_k, k)
            norms.watch("latent", xj, j)
        v_j = ds.predict(a, ds.scale_grad(xj, o.nested_scale), s_j, cond, kw["guidance"], ckpt)  # leap 2
        if norms is not None:
            norms.watch("out", v_j, j)
        x0_hat = ds.leap(a, xj, v_j, s_j, s_n)
        d_j, d_0 = _distance(xj_hat, x_j, o.distance), _distance(x0_hat, x_n, o.distance)
        x0 = ds.straight_through(x0_hat, x_n) if o.reward_input == "endpoint" else x0_hat
        weight = None
        if o.weighting == "inverse_distance":
            weight = 1.0 / (d_j.clamp_min(o.tau) + d_0.clamp_min(o.tau))
        metrics = {"leap_k": k.double().mean(), "leap_j": j.double().mean(), "leap_dj": d_j.mean(),
                   "leap_d0": d_0.mean()}
        if weight is not None:
            metrics["leap_weight"] = weight.mean()
        return Tail(e.decode(x0), weight=weight, metrics=metrics)
