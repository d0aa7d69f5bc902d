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

``ratio_norm`` -- GRPO-Guard's RatioNorm (arXiv 2510.22319): the per-step log-ratio re-centred with the stored old
mean and rescaled by the step std, fed to any policy loss as ``log_prob - old_log_prob``.

Preference losses (D3PO, Diffusion-/Flow-DPO, PRDP; reference ``backprop_preference.md`` Part B):

* ``dpo_loss`` -- DPO (Rafailov et al. 2023, eq. 7) on implicit rewards ``beta * log(pi/pi_ref)``:
  ``L = -log sigmoid(beta (c - r))`` for chosen/rejected log-ratios ``c, r``; ``label_smoothing`` = cDPO.
* ``clipped_log_ratio`` -- D3PO's per-step ratio ``clip(pi/pi_ref, 1 - eps, 1 + eps)`` in log space
  (yk7333/d3po ``scripts/train.py``): no gradient once the step has left the trust region.
* ``diffusion_dpo_loss`` -- Diffusion-DPO (arXiv 2311.12908, eq. 14; SalesforceAIResearch/DiffusionDPO
  ``train.py``) and Flow-DPO (arXiv 2501.13918; flow_grpo ``train_sd3_dpo.py``): the log-ratio is replaced by
  minus the denoising-error gap, ``L = -log sigmoid(-beta/2 [(e_w - e_ref_w) - (e_l - e_ref_l)])``.
* ``reward_difference_loss`` -- PRDP (arXiv 2402.08714): ``(dr - dr_hat)^2``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
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


def ratio_norm(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor,
               reduction: str = "mean") -> Tensor:
    """GRPO-Guard RatioNorm (arXiv 2510.22319; flow_grpo ``train_sd3_GRPO_Guard.py`` l.915-922): the re-centred
    and rescaled per-step log-ratio ``s (logp - logp_old + reduce((mu - mu_old)^2) / (2 s^2))``, ``[B]``.

    With ``x' = mu_old + s eps`` the raw Gaussian log-ratio is ``reduce(eps d)/s - reduce(d^2)/(2 s^2)``
    (``d = mu - mu_old``): biased below 0 and with a spread ``~ 1/s`` that grows at low-noise steps. Adding the
    bias back and multiplying by ``s`` (``std = g sqrt|dt|``) leaves ``reduce(eps d)``, centred on 0 for every step.

    ``mean``/``old_mean`` are the latent-shaped step means; the bias is reduced over *their* non-batch dims, so each
    row keeps its own bias. (flow_grpo reduces over ``range(1, log_prob.ndim)`` of the 1-D log-prob: an empty tuple,
    and ``Tensor.mean(dim=())`` averages over every dim, the batch included -- one bias for the whole micro-batch.)
    Rows with ``std == 0`` (ODE steps, never trained) get 0.
    """
    check_choice("reduction", reduction, ("mean", "sum"))
    if mean.shape != old_mean.shape or mean.ndim < 2:
        raise ValueError(f"mean and old_mean must share a latent shape [B, ...], got {tuple(mean.shape)} and "
                         f"{tuple(old_mean.shape)}")
    dims = tuple(range(1, mean.ndim))
    d2 = (mean.float() - old_mean.float()) ** 2
    bias2 = d2.mean(dims) if reduction == "mean" else d2.sum(dims)
    s = std.reshape(std.shape[0], -1)[:, 0].to(bias2.dtype) if std.ndim else std.expand(mean.shape[0])
    safe = torch.where(s > 0, s, torch.ones_like(s))
    out = (log_prob - old_log_prob + bias2 / (2 * safe**2)) * safe
    return torch.where(s > 0, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------------- preference
def clipped_log_ratio(log_prob: Tensor, ref_log_prob: Tensor, clip: float | None = None) -> Tensor:
    """``log(pi / pi_ref)`` clamped to ``[log(1 - clip), log(1 + clip)]`` (D3PO's ratio clip); None: no clamp."""
    delta = log_prob - ref_log_prob
    if clip is None:
        return delta
    if not 0 < clip < 1:
        raise ValueError(f"clip must be in (0, 1) or None, got {clip}")
    return delta.clamp(math.log1p(-clip), math.log1p(clip))


def dpo_loss(chosen_log_ratio: Tensor, rejected_log_ratio: Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO per pair ``[B]``: ``-(1 - ls) log sigmoid(z) - ls log sigmoid(-z)``, ``z = beta (c - r)``.

    ``c, r`` are the log-ratios ``log pi/pi_ref`` of the chosen and rejected sample (for D3PO: of one denoising
    step; for Diffusion-DPO: minus the error gap). Metrics: ``dpo_accuracy`` (share of pairs with ``z > 0``), the
    implicit rewards ``beta c``, ``beta r`` and their margin.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if chosen_log_ratio.shape != rejected_log_ratio.shape:
        raise ValueError(f"shape mismatch: chosen {tuple(chosen_log_ratio.shape)}, rejected "
                         f"{tuple(rejected_log_ratio.shape)}")
    z = beta * (chosen_log_ratio - rejected_log_ratio)
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    with torch.no_grad():
        metrics = {"dpo_accuracy": (z > 0).float().mean(), "reward_chosen": beta * chosen_log_ratio.detach().mean(),
                   "reward_rejected": beta * rejected_log_ratio.detach().mean(), "reward_margin": z.detach().mean()}
    return loss, metrics


def diffusion_dpo_loss(err_w: Tensor, err_ref_w: Tensor, err_l: Tensor, err_ref_l: Tensor, beta: float,
                       label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-/Flow-DPO per pair ``[B]`` from per-sample denoising errors (mean squared error of the prediction).

    ``-log sigmoid(-beta/2 [(e_w - e_ref_w) - (e_l - e_ref_l)])`` = ``dpo_loss`` with log-ratios ``-(e - e_ref)``
    and ``beta / 2``. Logs the errors too (both rising = divergence, reference B3).
    """
    loss, metrics = dpo_loss(-(err_w - err_ref_w), -(err_l - err_ref_l), beta / 2, label_smoothing)
    with torch.no_grad():
        metrics.update({"err_chosen": err_w.detach().mean(), "err_rejected": err_l.detach().mean(),
                        "err_ref_chosen": err_ref_w.detach().mean(), "err_ref_rejected": err_ref_l.detach().mean()})
    return loss, metrics


def reward_difference_loss(target: Tensor, prediction: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """PRDP's regression per pair ``[B]``: ``(dr - dr_hat)^2`` (reward difference vs its prediction)."""
    if target.shape != prediction.shape:
        raise ValueError(f"shape mismatch: target {tuple(target.shape)}, prediction {tuple(prediction.shape)}")
    loss = (target - prediction) ** 2
    with torch.no_grad():
        metrics = {"rdp_mse": loss.detach().mean(), "rdp_pred_abs": prediction.detach().abs().mean(),
                   "rdp_sign_accuracy": ((target * prediction.detach()) > 0).float().mean()}
    return loss, metrics
