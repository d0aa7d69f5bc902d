"""Step kernels: turn one denoising step into a Gaussian policy ``x_t -> x_next`` with an exact log-density.

Notation (diffusers flow-matching convention): ``x_t = (1 - sigma) x_0 + sigma * eps``; the flow model predicts
velocity ``v = eps - x_0``; one step goes ``sigma -> sigma_next`` with ``dt = sigma_next - sigma < 0``.
Derived: ``x0_hat = x - sigma v``, ``eps_hat = x + (1 - sigma) v``.

For epsilon-prediction (DDPM/DDIM) models we use the same ``sigma`` slot with ``sigma = sqrt(1 - alpha_bar_t)``,
so ``alpha_bar = 1 - sigma**2``: one schedule tensor serves every kernel.

Kernels (``KERNELS`` registry; each returns ``(mean, std)``, ``std`` broadcastable to ``x``):

* ``flow_sde`` -- Flow-GRPO (arXiv 2505.05470, eq. 9; flow_grpo ``sde_step_with_logprob``):
  ``g = a sqrt(sigma / (1 - sigma))`` (``sigma == 1`` uses ``sigma_next`` in the denominator, as flow_grpo
  uses ``sigmas[1]``), ``mean = x + [v + g^2/(2 sigma) (x + (1 - sigma) v)] dt``, ``std = g sqrt(-dt)``.
* ``cps`` -- Coefficients-Preserving Sampling (arXiv 2509.05952): ``s = sigma_next sin(a pi/2)``,
  ``mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - s^2) eps_hat``, ``std = s``.
* ``dance`` -- DanceGRPO (arXiv 2505.07818, ``flux_step``): same drift with constant ``g = eta``,
  ``std = eta sqrt(sigma - sigma_next)``.
* ``ode`` -- Euler: ``mean = x + v dt``, ``std = 0``.
* ``ddim`` -- DDIM with eta for epsilon models (DDPO, arXiv 2305.13301, ``ddim_step_with_logprob``):
  ``x0 = (x - sqrt(1 - ab) eps) / sqrt(ab)``, ``var = (1 - ab')/(1 - ab) (1 - ab/ab')``, ``std = eta sqrt(var)``,
  ``mean = sqrt(ab') x0 + sqrt(1 - ab' - std^2) eps``. It runs in float64 (``FP64_KERNELS``): rebuilding
  ``ab = 1 - sigma^2`` cancels catastrophically where ``ab`` is small (t >~ 900: ``ab`` ~ 5e-3), and fp32 there
  moved re-sampled latents by ~1.5e-5 from DDPO's step. Epsilon adapters hand out float64 sigmas for the same
  reason (the rollout keeps them), so ``ab`` is exact to ~1e-16.

All other arithmetic is fp32 ("bf16 can overflow here", flow_grpo). ``x_next`` is cast to the input dtype *before*
its log-prob is taken, so recomputing the log-prob of a stored transition gives ratio == 1 exactly.

Log-prob reduction over non-batch dims: ``"mean"`` (default; what flow_grpo, DanceGRPO and DDPO do -- the
PPO ratio is then the true ratio to the power 1/D, hence their tiny clip ranges) or ``"sum"`` (the true
log-density). ``density="unnormalized"`` reproduces flow_grpo's CPS form ``-(x_next - mean)^2`` (no 1/2s^2,
no constants). Steps with ``std == 0`` are deterministic: their log-prob is 0 and they must not be trained.

Marginals (tests/test_sde.py, exact denoisers of closed-form toys): ``flow_sde`` and ``dance`` are Euler-Maruyama
steps of reverse SDEs with the ODE's marginals, and converge to them as steps grow (``flow_sde`` slowly: near
``sigma = 1`` its ``g^2 dt`` stays O(a^2) however fine the grid; 0.2-0.6% of the variance at a=0.7 and 1000-4000
steps on Gaussian data). ``cps`` is not: its noise ``sigma' sin(a pi/2)`` does not shrink with the step size,
and with an exact posterior-mean denoiser it loses variance at any step count (N(0, 1) data, a=0.8: terminal
variance 0.62 at 50 steps, 0.65 at 400). Fine for RL exploration over a short SDE window (Flow-GRPO-Fast's use);
not a sampler of the model's distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from flowalign.registry import Registry, check_choice

KernelFn = Callable[[Tensor, Tensor, Tensor, Tensor, float], "tuple[Tensor, Tensor]"]
KERNELS: Registry[KernelFn] = Registry("kernel")
#: kernels whose arithmetic runs in float64 (mean/std are returned in the inputs' fp32-or-wider dtype)
FP64_KERNELS: set[str] = {"ddim"}
REDUCTIONS = ("mean", "sum")
DENSITIES = ("gaussian", "unnormalized")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOut:
    """One transition: the sample, the Gaussian it was drawn from, and its log-density ``[B]``."""

    x_next: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor


def per_sample(value, x: Tensor) -> Tensor:
    """Scalar / [B] sigma -> tensor of x's dtype shaped [B, 1, ..., 1] broadcastable to x."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)  # a Python float must not pass through fp32
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape [batch]={x.shape[0]}, got {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.ndim - 1)))


@KERNELS.register("flow_sde")
def flow_sde(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, a: float) -> tuple[Tensor, Tensor]:
    dt = sigma_next - sigma
    denom_sigma = torch.where(sigma >= 1.0, sigma_next, sigma)
    g = a * torch.sqrt(sigma / (1.0 - denom_sigma))
    mean = x + (v + g**2 / (2.0 * sigma) * (x + (1.0 - sigma) * v)) * dt
    return mean, g * torch.sqrt(-dt)


@KERNELS.register("cps")
def cps(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, a: float) -> tuple[Tensor, Tensor]:
    x0 = x - sigma * v
    eps = x + (1.0 - sigma) * v
    s = sigma_next * math.sin(a * math.pi / 2)
    mean = (1.0 - sigma_next) * x0 + torch.sqrt((sigma_next**2 - s**2).clamp_min(0.0)) * eps
    return mean, s


@KERNELS.register("dance")
def dance(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    dt = sigma_next - sigma
    eps = x + (1.0 - sigma) * v
    mean = x + (v + 0.5 * eta**2 * eps / sigma) * dt
    return mean, eta * torch.sqrt(-dt)


@KERNELS.register("ode")
def ode(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, _: float) -> tuple[Tensor, Tensor]:
    return x + v * (sigma_next - sigma), torch.zeros_like(sigma)


@KERNELS.register("ddim")
def ddim(x: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    ab, ab_next = 1.0 - sigma**2, 1.0 - sigma_next**2
    x0 = (x - sigma * eps) / torch.sqrt(ab)
    var = (1.0 - ab_next) / (1.0 - ab) * (1.0 - ab / ab_next)
    std = eta * torch.sqrt(var.clamp_min(0.0))
    mean = torch.sqrt(ab_next) * x0 + torch.sqrt((1.0 - ab_next - std**2).clamp_min(0.0)) * eps
    return mean, std


def validate(kind: str, noise_level: float, reduction: str = "mean", density: str = "gaussian") -> None:
    """Early, named errors for the step options."""
    KERNELS.get(kind)
    if not isinstance(noise_level, (int, float)) or not math.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"noise_level must be a finite number >= 0, got {noise_level!r}")
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("density", density, DENSITIES)


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Tensor, reduction: str = "mean",
                      density: str = "gaussian") -> Tensor:
    """log N(x_next; mean, std^2) reduced over non-batch dims; 0 where std == 0 (deterministic steps)."""
    std = std.expand_as(mean) if std.ndim else std.expand(mean.shape)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    diff2 = (x_next.to(mean.dtype) - mean) ** 2  # fp32 (fp64 for fp64 inputs: .float() would round x_next)
    if density == "gaussian":
        lp = -diff2 / (2 * safe**2) - torch.log(safe) - _LOG_SQRT_2PI
    else:
        lp = -diff2
    lp = torch.where(std > 0, lp, torch.zeros_like(lp))
    dims = tuple(range(1, lp.ndim))
    return lp.mean(dim=dims) if reduction == "mean" else lp.sum(dim=dims)


def mean_std(kind: str, x: Tensor, model_out: Tensor, sigma, sigma_next, noise_level: float) -> tuple[Tensor, Tensor]:
    """The Gaussian ``(mean, std)`` in fp32 (fp64 inputs stay fp64, for gradient checks); ``std`` is ``[B, 1, ...]``."""
    fn = KERNELS.get(kind)
    if model_out.shape != x.shape:  # a broadcast here would silently give every row the same prediction
        raise ValueError(f"model_out must have x's shape {tuple(x.shape)}, got {tuple(model_out.shape)}")
    dt = torch.promote_types(torch.promote_types(x.dtype, model_out.dtype), torch.float32)
    work = torch.float64 if kind in FP64_KERNELS else dt
    xf, mf = x.to(work), model_out.to(work)
    s, s_next = per_sample(sigma, xf), per_sample(sigma_next, xf)
    mean, std = fn(xf, mf, s, s_next, float(noise_level))
    mean, std = mean.to(dt), torch.as_tensor(std, device=x.device).to(dt)
    if std.ndim == 0:
        std = std.expand(x.shape[0]).view(-1, *([1] * (x.ndim - 1)))
    return mean, std


def step(kind: str, x: Tensor, model_out: Tensor, sigma, sigma_next, noise_level: float, noise: Tensor | None = None,
         generator: torch.Generator | None = None, reduction: str = "mean", density: str = "gaussian") -> StepOut:
    """Sample ``x_next`` from the kernel's Gaussian and return it with mean, std and log-prob ``[B]``."""
    validate(kind, noise_level, reduction, density)
    mean, std = mean_std(kind, x, model_out, sigma, sigma_next, noise_level)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    elif noise.shape != x.shape:
        raise ValueError(f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    x_next = (mean + std * noise.float()).to(x.dtype)
    return StepOut(x_next, mean, std, gaussian_log_prob(x_next, mean, std, reduction, density))


def log_prob_of(kind: str, x: Tensor, x_next: Tensor, model_out: Tensor, sigma, sigma_next, noise_level: float,
                reduction: str = "mean", density: str = "gaussian") -> StepOut:
    """Recompute the density of a stored transition ``x -> x_next`` under (possibly updated) ``model_out``."""
    validate(kind, noise_level, reduction, density)
    mean, std = mean_std(kind, x, model_out, sigma, sigma_next, noise_level)
    return StepOut(x_next, mean, std, gaussian_log_prob(x_next, mean, std, reduction, density))


def is_stochastic(kind: str, noise_level: float) -> bool:
    """Whether the kernel draws noise (and so has a trainable log-prob)."""
    return kind != "ode" and noise_level > 0
