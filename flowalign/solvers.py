"""Deterministic solvers for the ODE steps *after* the SDE window (MixGRPO-Flash, arXiv 2507.21802).

Steps after the last stochastic step are never trained, so they may use a coarser grid and a higher-order solver.
``rollout.sample(..., ode_solver="dpm2", post_compress=r)`` keeps the schedule up to the end of the window and
replaces the remaining ``R`` transitions by ``max(1, round(r R))`` transitions on a subset of the pipeline's own grid
(MixGRPO rebuilds a shifted linspace of ``(N - last) r`` points instead; on a grid that is a shifted linspace, as
SD3/FLUX's, the subset is nearly the same points and works for any adapter's schedule), integrated with ``dpm2``.

``dpm2`` -- DPM-Solver++(2M), midpoint form (Lu et al., arXiv 2211.01095, Alg. 2; MixGRPO ``sampling_utils.dpm_step``
with ``dpmsolver++``, order 2, ``midpoint``; diffusers ``DPMSolverMultistepScheduler``), in flow-matching notation:
``alpha = 1 - sigma``, ``lambda = log(alpha / sigma)``, data prediction ``x0 = x - sigma v``, ``h = lambda' - lambda``:

* first order (DDIM):  ``x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) x0``
* second order:        ``D1 = (x0 - x0_prev) / r`` with ``r = (lambda - lambda_prev) / h``,
  ``x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) (x0 + D1 / 2)``

The first step without history and the final step to ``sigma' = 0`` are first order (diffusers
``lower_order_final``; at ``sigma' = 0`` the step returns ``x0``). The history may come from the last (stochastic)
window step, as MixGRPO keeps its DPM state through the window.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SOLVERS = ("euler", "dpm2")


def _lambda(sigma: float) -> float:
    """Half log-SNR ``log((1 - sigma) / sigma)`` (+inf at sigma = 0, -inf at sigma = 1)."""
    if sigma <= 0:
        return math.inf
    if sigma >= 1:
        return -math.inf
    return math.log((1.0 - sigma) / sigma)


def dpm2_step(x: Tensor, v: Tensor, sigma: float, sigma_next: float, prev_x0: Tensor | None = None,
              prev_sigma: float | None = None) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++(2M) step ``sigma -> sigma_next`` from velocity ``v``; returns ``(x_next, x0)`` (fp32 math,
    ``x_next`` in ``x``'s dtype). Pass the previous step's ``x0`` and ``sigma`` for the second-order correction."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    xf = x.float()
    x0 = xf - sigma * v.float()
    if sigma_next <= 0:  # final step: x' = x0
        return x0.to(x.dtype), x0
    lam, lam_next = _lambda(sigma), _lambda(sigma_next)
    h = lam_next - lam
    alpha_next = 1.0 - sigma_next
    d = x0
    if prev_x0 is not None and prev_sigma is not None and math.isfinite(_lambda(float(prev_sigma))):
        r = (lam - _lambda(float(prev_sigma))) / h
        d = x0 + 0.5 * (x0 - prev_x0.float()) / r
    x_next = (sigma_next / sigma) * xf - alpha_next * math.expm1(-h) * d
    return x_next.to(x.dtype), x0


def compress_tail(sigmas: Tensor, last_sde: int, ratio: float) -> Tensor:
    """Keep ``sigmas[: last_sde + 2]`` (every step up to the end of the window) and a subset of the remaining grid
    with ``max(1, round(ratio R))`` transitions, ``R = N - last_sde - 1``; the terminal sigma is always kept."""
    if not 0 < ratio <= 1:
        raise ValueError(f"post_compress must be in (0, 1], got {ratio}")
    n = sigmas.numel() - 1
    start = last_sde + 1  # index of the first post-window state
    remaining = n - start
    if remaining <= 1 or ratio == 1:
        return sigmas.clone()
    keep = max(1, round(ratio * remaining))
    idx = torch.linspace(start, n, keep + 1).round().long().unique()
    return torch.cat([sigmas[:start], sigmas[idx]])
