"""Advantage estimators over a flat reward batch, shared by the image trainers and the LLM trainer.

Conventions (every estimator):

* ``rewards`` is ``[B]`` (``[B, K]`` for multi-reward GDPO) in *group-major* order: rows ``g*G .. g*G+G-1`` are
  the ``G = group_size`` samples of prompt ``g``; ``B`` must be a multiple of ``G``.
* NaN/inf rewards are rejected with a ValueError (a failed verifier must be mapped to a number explicitly).
* Group std is the Bessel-corrected ``torch.std`` and ``eps`` is *added to the std* (TRL: 1e-4; verl: 1e-6).
* A singleton group (``G = 1``) has no relative information; we follow verl's convention: baseline 0,
  scale 1, so ``A = r`` (REINFORCE without baseline) for the group estimators and for RLOO.

Registered names (``ADVANTAGES.get(name)(rewards, group_size, **kw)``):

=================  =========================================================================================
``grpo``           (r - mean_g) / (std_g + eps)                                DeepSeekMath eq. (3); TRL "group"
``no_std``         r - mean_g                                                  Dr. GRPO (arXiv 2503.20783)
``batch_std``      (r - mean_g) / (std_B + eps)                                TRL scale_rewards="batch"
``rloo``           r_i - mean_{j!=i} r_j = G/(G-1) (r - mean_g)                RLOO (arXiv 2402.14740)
``reinforce_pp``   whiten_B(r - mean_g)  (REINFORCE++-baseline)                arXiv 2501.03262; verl
``median``         (r - median_g) / (MAD_g + eps), pivot -> 0                  MC-GRPO (arXiv 2601.22582)
``gdpo``           z_B( sum_k w_k z_g(r_k) )                                   GDPO (arXiv 2601.05242)
``per_prompt``     (r - mean_p) / (std_p + eps) over prompt p's recent rewards  DDPO stat tracking (2305.13301)
=================  =========================================================================================
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from flowalign.registry import Registry

ADVANTAGES: Registry[Callable[..., Tensor]] = Registry("advantage estimator")


def check_rewards(rewards: Tensor, group_size: int, *, ndim: int = 1) -> Tensor:
    """Validate shape, group divisibility and finiteness; return float32 rewards."""
    if not torch.is_tensor(rewards):
        rewards = torch.as_tensor(rewards)
    if rewards.ndim != ndim:
        raise ValueError(f"rewards must have {ndim} dim(s) ([B]{' x K' if ndim == 2 else ''}), "
                         f"got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"batch of {rewards.shape[0]} rewards is not a multiple of group_size={group_size}")
    bad = ~torch.isfinite(rewards)
    if bad.any():
        rows = bad.reshape(rewards.shape[0], -1).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"rewards contain NaN/inf at rows {rows[:10]}; map failed scores to a number "
                         "(e.g. 0.0) before computing advantages")
    return rewards.float()


def _groups(r: Tensor, group_size: int) -> Tensor:
    return r.reshape(-1, group_size)


def _group_mean_std(r: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Per-row group mean and Bessel std, broadcast back to ``[B]``; singleton groups get (0, 1) as in verl."""
    g = _groups(r, group_size)
    if group_size == 1:
        return torch.zeros_like(r), torch.ones_like(r)
    mean = g.mean(1, keepdim=True).expand_as(g).reshape(-1)
    std = g.std(1, keepdim=True).expand_as(g).reshape(-1)
    return mean, std


@ADVANTAGES.register("grpo")
def grpo(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Group z-score ``(r - mean_g) / (std_g + eps)``; an all-equal group gets 0."""
    r = check_rewards(rewards, group_size)
    mean, std = _group_mean_std(r, group_size)
    return (r - mean) / (std + eps)


@ADVANTAGES.register("no_std")
def no_std(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO: group-mean baseline without std scaling ``r - mean_g``."""
    r = check_rewards(rewards, group_size)
    return r - _group_mean_std(r, group_size)[0]


@ADVANTAGES.register("batch_std")
def batch_std(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Group-mean baseline, std over the whole batch: ``(r - mean_g) / (std_B + eps)`` (TRL "batch")."""
    r = check_rewards(rewards, group_size)
    std_b = r.std() if r.numel() > 1 else r.new_tensor(1.0)
    return (r - _group_mean_std(r, group_size)[0]) / (std_b + eps)


@ADVANTAGES.register("rloo")
def rloo(rewards: Tensor, group_size: int) -> Tensor:
    """Leave-one-out baseline ``r_i - mean_{j != i} r_j``; singleton groups keep ``r``."""
    r = check_rewards(rewards, group_size)
    if group_size == 1:
        return r.clone()
    g = _groups(r, group_size)
    loo = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return (g - loo).reshape(-1)


def whiten(x: Tensor, weights: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """``(x - mean) * rsqrt(var + eps)`` with unbiased (weighted) variance, as verl ``masked_whiten``."""
    w = torch.ones_like(x) if weights is None else weights.to(x)
    n = w.sum()
    mean = (x * w).sum() / n
    var = ((x - mean) ** 2 * w).sum() / n
    if n > 1:
        var = var * n / (n - 1)
    return (x - mean) * torch.rsqrt(var + eps)


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp(rewards: Tensor, group_size: int, weights: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """REINFORCE++-baseline: ``r - mean_g`` then global batch whitening.

    ``weights`` (e.g. completion lengths) reproduces verl's token-weighted whitening; None = per sequence.
    """
    r = check_rewards(rewards, group_size)
    return whiten(r - _group_mean_std(r, group_size)[0], weights, eps)


def median_pivots(rewards: Tensor, group_size: int) -> Tensor:
    """Row index of each group's median sample (``torch.median``: the lower median), ``[B / G]``."""
    r = check_rewards(rewards, group_size)
    idx = _groups(r, group_size).median(1).indices
    return idx + torch.arange(idx.numel()) * group_size


@ADVANTAGES.register("median")
def median(rewards: Tensor, group_size: int, scale: str = "mad", eps: float = 1e-3) -> Tensor:
    """MC-GRPO: median baseline, ``(r - med_g) / (MAD_g + eps)`` (``scale="none"``: ``r - med_g``).

    Sample ``G + 1`` rollouts per prompt and drop the pivot rows (``median_pivots``), whose advantage is 0, before
    the loss. Defaults follow the reference code (lotusroot-kim/MC-GRPO): MAD scale, eps 1e-3. Note that with
    binary rewards MAD is usually 0, so non-zero advantages have magnitude 1/eps = 1000.
    """
    if scale not in ("mad", "none"):
        raise ValueError(f"scale={scale!r} is not allowed. Allowed: mad, none")
    r = check_rewards(rewards, group_size)
    g = _groups(r, group_size)
    med = g.median(1, keepdim=True).values
    a = g - med
    if scale == "mad":
        mad = a.abs().median(1, keepdim=True).values
        a = a / (mad + eps)
    return a.reshape(-1)


@ADVANTAGES.register("gdpo")
def gdpo(rewards: Tensor, group_size: int, weights: Sequence[float] | None = None, eps: float = 1e-4) -> Tensor:
    """GDPO decoupled normalisation for ``[B, K]`` rewards (NVlabs TRL patch / TRL normalize_then_sum).

    ``z_k = (r_k - mean_g r_k) / (std_g r_k + eps)``, ``S = sum_k w_k z_k``, ``A = (S - mean_B S) / (std_B S + eps)``.
    """
    r = check_rewards(rewards, group_size, ndim=2)
    k = r.shape[1]
    w = torch.ones(k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (k,):
        raise ValueError(f"weights must have one entry per reward ({k}), got {tuple(w.shape)}")
    z = torch.stack([grpo(r[:, j], group_size, eps) for j in range(k)], 1)
    s = (z * w).sum(1)
    std_b = s.std() if s.numel() > 1 else s.new_tensor(1.0)
    return (s - s.mean()) / (std_b + eps)


@ADVANTAGES.register("per_prompt")
def per_prompt(rewards: Tensor, group_size: int, keys: Sequence[str] | None = None,
               history: dict[str, list[float]] | None = None, buffer_size: int = 16, min_count: int = 16,
               eps: float = 1e-6) -> Tensor:
    """DDPO per-prompt stat tracking (kvablack/ddpo-pytorch ``stat_tracking.py``).

    Each prompt's rewards of this round join its history (the last ``buffer_size`` kept); a prompt with at least
    ``min_count`` rewards is normalised by its history's mean/std, otherwise by the whole round's:
    ``A = (r - mean) / (std + eps)``, population std (``np.std``) as DDPO. ``keys`` name each row's prompt
    (default: its group index); pass the same ``history`` dict every round to track across rounds (it is updated
    in place and is plain JSON for checkpoints). Without a history each call starts fresh.
    """
    r = check_rewards(rewards, group_size)
    keys = [str(i // group_size) for i in range(len(r))] if keys is None else [str(k) for k in keys]
    if len(keys) != len(r):
        raise ValueError(f"keys has {len(keys)} entries for {len(r)} rewards")
    if buffer_size < 1 or min_count < 0:
        raise ValueError(f"buffer_size must be >= 1 and min_count >= 0, got {buffer_size}, {min_count}")
    history = {} if history is None else history
    adv = torch.empty_like(r)
    batch_mean, batch_std = r.mean(), r.std(unbiased=False)
    for key in dict.fromkeys(keys):  # unique, in order
        rows = torch.tensor([i for i, k in enumerate(keys) if k == key])
        hist = (history.get(key, []) + r[rows].tolist())[-buffer_size:]
        history[key] = hist
        if len(hist) < min_count:
            mean, std = batch_mean, batch_std
        else:
            h = torch.tensor(hist, dtype=torch.float64)
            mean, std = h.mean().float(), h.std(unbiased=False).float()
        adv[rows] = (r[rows] - mean) / (std + eps)
    return adv


def zero_std_groups(rewards: Tensor, group_size: int, atol: float = 0.0) -> Tensor:
    """Bool ``[B]``: rows whose group has all-equal rewards (max - min <= atol), hence zero advantage.

    flow_grpo drops these samples before the update and logs their fraction as ``zero_std_ratio``.
    ``rewards`` may be ``[B]`` or ``[B, K]`` (a group counts as constant only if every component is).
    """
    r = check_rewards(rewards, group_size, ndim=rewards.ndim if torch.is_tensor(rewards) else 1)
    g = r.reshape(-1, group_size, *r.shape[1:])
    spread = (g.amax(1) - g.amin(1)).reshape(g.shape[0], -1).amax(1)
    return (spread <= atol).repeat_interleave(group_size)


def resolve_estimator(estimator: str | None = None, std: str = "group", baseline: str = "mean",
                      per_reward: bool = False, eps: float = 1e-4,
                      kwargs: dict | None = None) -> tuple[str, dict]:
    """Map the config's (std, baseline, per_reward) options to ``(registered name, kwargs)``.

    ==========================  ===================  =========================================
    baseline / std              name                 note
    ==========================  ===================  =========================================
    mean / group                grpo                 flow_grpo per-prompt std
    mean / global               batch_std            flow_grpo ``global_std=True`` (SD3.5)
    mean / none                 no_std               Dr. GRPO
    median / group | none       median (mad | none)  MC-GRPO
    loo / none                  rloo                 RLOO
    per_reward (mean / group)   gdpo                 GDPO decoupled normalisation
    ==========================  ===================  =========================================

    An explicit ``estimator`` name wins; then ``std``/``baseline``/``per_reward`` must be left at their defaults.
    """
    kwargs = dict(kwargs or {})
    if estimator is not None:
        if (std, baseline, per_reward) != ("group", "mean", False):
            raise ValueError(f"estimator={estimator!r} is explicit; leave std/baseline/per_reward at their defaults "
                             f"(got std={std!r}, baseline={baseline!r}, per_reward={per_reward})")
        return estimator, kwargs
    if per_reward:
        if (std, baseline) != ("group", "mean"):
            raise ValueError("per_reward (GDPO) normalises each reward by its group mean/std; "
                             f"use std='group', baseline='mean' (got std={std!r}, baseline={baseline!r})")
        return "gdpo", {"eps": eps, **kwargs}
    table = {
        ("mean", "group"): ("grpo", {"eps": eps}),
        ("mean", "global"): ("batch_std", {"eps": eps}),
        ("mean", "none"): ("no_std", {}),
        ("median", "group"): ("median", {"scale": "mad"}),
        ("median", "none"): ("median", {"scale": "none"}),
        ("loo", "none"): ("rloo", {}),
    }
    if (baseline, std) not in table:
        allowed = ", ".join(f"baseline={b!r}/std={s!r}" for b, s in table)
        raise ValueError(f"baseline={baseline!r} with std={std!r} is not supported. Allowed: {allowed}")
    name, kw = table[(baseline, std)]
    return name, {**kw, **kwargs}
