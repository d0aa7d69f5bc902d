"""AlignProp (Prabhudesai et al., arXiv 2310.03739): reward backprop through the last ``K`` steps of the chain.

AlignProp (``alignprop_trainer.py``, ``sd_pipeline.py`` of mihirp1998/AlignProp; reference §A1): full-chain backprop
with every denoiser call checkpointed and randomized truncation: the denoiser outputs of all but the last ``K`` steps
are cut (here: run under ``no_grad``, equivalent for the weights' gradient since nothing before them requires
grad). ``truncation``: ``uniform`` K in ``k_range`` (TRL's default, ``(0, 50)``), ``gaussian`` round(N(k_mean,
k_std)) redrawn until in ``[1, N]`` (AlignProp's: start index N(42, 5) of 50 -> K ~ N(8, 5)), ``fixed`` ``k``
(AlignProp ``*_k1.sh``), ``none`` (K = N, full chain). CFG is applied inside the chain (``sample.guidance``).

The engine (prompts, noise, batching, reward, objective and its options) is ``backprop.RewardBackprop``; this file
adds the truncation rule (``Truncation``, also composed by DRaFT-K in ``draft.py``) and its ``truncated_chain``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flowalign.adapter import Adapter, Cond
from flowalign.config import Config, help_field
from flowalign.data import RewardFn
from flowalign import diff_sampling as ds
from flowalign.methods.backprop import BackpropOptions, RewardBackprop, Tail, attach_engine, check_backprop_config
from flowalign.methods.base import METHODS, Method, Runtime, option_error
from flowalign.methods.options import compose_options


@dataclass
class Truncation:
    """How many steps keep a graph (``K``, counted from the end), per micro-batch (AlignProp, DRaFT-K)."""

    truncation: Literal["uniform", "gaussian", "fixed", "none"] = help_field(
        "uniform", "How K (steps that keep a graph, from the end) is drawn per micro-batch: uniform in k_range, "
                   "gaussian N(k_mean, k_std), fixed k, none (K = num_steps: full chain).")
    k: int = help_field(1, "K of truncation=fixed (AlignProp K=1 scripts; DRaFT-K).")
    k_range: list[int] | None = help_field(None, "[lo, hi] (inclusive) of truncation=uniform; null = [1, num_steps].")
    k_mean: float = help_field(8.0, "Mean of truncation=gaussian (AlignProp: 50 - 42).")
    k_std: float = help_field(5.0, "Std of truncation=gaussian (AlignProp: 5); draws outside [1, num_steps] are "
                                   "redrawn.")

    def check(self, cfg) -> None:
        n = cfg.sample.num_steps
        if self.truncation == "fixed" and not 1 <= self.k <= n:
            raise option_error("k", f"={self.k} must be in [1, sample.num_steps={n}]")
        if self.k_range is not None and not (len(self.k_range) == 2 and 1 <= self.k_range[0] <= self.k_range[1] <= n):
            raise option_error("k_range", f"={self.k_range} must be [lo, hi] with 1 <= lo <= hi <= "
                                          f"sample.num_steps={n}")
        if self.k_std < 0:
            raise option_error("k_std", f"must be >= 0, got {self.k_std}")

    def draw_k(self, num_steps: int, gen: torch.Generator) -> int:
        """K for one micro-batch (see ``truncation``)."""
        if self.truncation == "none":
            return num_steps
        if self.truncation == "fixed":
            return self.k
        if self.truncation == "uniform":
            lo, hi = self.k_range or (1, num_steps)
            return int(torch.randint(lo, hi + 1, (1,), generator=gen))
        for _ in range(100):  # AlignProp redraws until the start index is valid
            k = round(self.k_mean + self.k_std * float(torch.randn((), generator=gen)))
            if 1 <= k <= num_steps:
                return k
        return min(max(round(self.k_mean), 1), num_steps)


def truncated_chain(engine: RewardBackprop, trunc: Truncation, x: Tensor, cond: Cond, sigmas: Tensor,
                    draw: torch.Generator, noise: torch.Generator, norms: ds.GradNorms | None) -> Tail:
    """The whole chain from the noise ``x [B, ...]``, keeping a graph through its last ``K`` steps only."""
    n = len(sigmas) - 1
    k = trunc.draw_k(n, draw)
    chain = ds.integrate(engine.adapter, x, cond, sigmas, grad_from=n - k, **engine.chain_kwargs(norms, noise))
    return Tail(engine.decode(chain.x), metrics={"truncation_k": float(k)})


@METHODS.register("alignprop")
class AlignProp(Method):
    """Full-chain reward backprop with checkpointing and randomized truncation (module docstring)."""

    name = "alignprop"
    Options = compose_options("AlignPropOptions", BackpropOptions, Truncation)

    def __init__(self, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, adapter, reward_fn, runtime)
        self.trunc = attach_engine(self, cfg, adapter, reward_fn).part(Truncation)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        check_backprop_config(cls.name, cfg, deterministic_only=False)

    def forward(self, x, cond, sigmas, draw, noise, norms) -> Tail:
        return truncated_chain(self.engine, self.trunc, x, cond, sigmas, draw, noise, norms)


