"""Policy losses and the KL-to-reference term, as small registered functions over tensors (verl ``core_algos``).

``POLICY_LOSSES.get(name)(log_prob, old_log_prob, advantages, **kw) -> (per_sample_loss [B], metrics)``;
the caller weights and reduces the per-sample loss (so the trainer can normalise over processes).

* ``ppo_clip`` -- PPO clipped surrogate (Schulman et al. 2017, eq. 7), as Flow-GRPO (arXiv 2505.05470 eq. 8;
  flow_grpo ``train_sd3.py`` l.887-908):
  ``ratio = exp(logp - logp_old)``, ``L = max(-A ratio, -A clip(ratio, 1 - lt, 1 + gt))``; symmetric when
  ``lt == gt`` (flow_grpo ``clip_range``), asymmetric otherwise (flow_grpo ``clip_range_lt/gt``, DAPO clip-higher).
  At the first update on fresh rollouts ``ratio == 1`` and ``L = -A``.

``gaussian_kl`` -- KL between the policy's and the reference's step Gaussians, which share the std:
``exact``: ``mean_d (mu - mu_ref)^2 / (2 std^2)`` (flow_grpo ``train_wan2_1.py``);
``flow_grpo``: the same times ``|dt|`` = ``mean_d (mu - mu_ref)^2 / (2 g^2)`` with ``std = g sqrt|dt|``
(flow_grpo ``train_sd3.py`` l.879-901). ``reduction="sum"`` sums over latent dims instead (the true KL).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from flowalign.registry import Registry, check_choice

POLICY_LOSSES: Registry[Callable[..., "tuple[Tensor, dict[str, Tensor]]"]] = Registry("policy loss")
KL_FORMS = ("flow_grpo", "exact")


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float = 1e-4,
             clip_range_lt: float | None = None, clip_range_gt: float | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate per sample ``[B]`` plus detached diagnostics (ratio stats, clipfrac, approx_kl)."""
    lt = clip_range if clip_range_lt is None else clip_range_lt
    gt = clip_range if clip_range_gt is None else clip_range_gt
    if not (lt > 0 and gt > 0):
        raise ValueError(f"clip ranges must be > 0, got lt={lt}, gt={gt}")
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(f"shape mismatch: log_prob {tuple(log_prob.shape)}, old_log_prob "
                         f"{tuple(old_log_prob.shape)}, advantages {tuple(advantages.shape)}")
    delta = log_prob - old_log_prob
    ratio = torch.exp(delta)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - lt, 1.0 + gt)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        r = ratio.detach()
        metrics = {
            "ratio_mean": r.mean(), "ratio_min": r.min(), "ratio_max": r.max(),
            "clipfrac": ((r < 1.0 - lt) | (r > 1.0 + gt)).float().mean(),
            "clipfrac_gt_one": (r > 1.0 + gt).float().mean(),
            "clipfrac_lt_one": (r < 1.0 - lt).float().mean(),
            "approx_kl": 0.5 * (delta.detach() ** 2).mean(),  # flow_grpo's approx_kl (Schulman's k2)
        }
    return loss, metrics


def gaussian_kl(mean: Tensor, mean_ref: Tensor, std: Tensor, dt: Tensor | float, form: str = "flow_grpo",
                reduction: str = "mean") -> Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per sample ``[B]`` in the named ``form`` (module docstring).

    ``std`` broadcasts to ``mean`` (``[B, 1, ...]``); ``dt = sigma_next - sigma`` (scalar or ``[B]``).
    Rows with ``std == 0`` (ODE steps) get 0.
    """
    check_choice("kl", form, KL_FORMS)
    check_choice("reduction", reduction, ("mean", "sum"))
    std = std.expand_as(mean)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    kl = (mean.float() - mean_ref.float()) ** 2 / (2 * safe.float() ** 2)
    kl = torch.where(std > 0, kl, torch.zeros_like(kl))
    dims = tuple(range(1, kl.ndim))
    kl = kl.mean(dims) if reduction == "mean" else kl.sum(dims)
    if form == "flow_grpo":
        kl = kl * torch.as_tensor(dt, dtype=kl.dtype, device=kl.device).abs()
    return kl
