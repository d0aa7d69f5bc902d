"""Advantage estimators over a flat reward batch, shared by the image trainers and the LLM trainer.

Conventions (every estimator):

* ``rewards`` is ``[B]`` (``[B, K]`` for multi-reward GDPO) in *group-major* order: rows ``g*G .. g*G+G-1`` are
  the ``G = group_size`` samples of prompt ``g``; ``B`` must be a multiple of ``G``.
* NaN/inf rewards are rejected with a ValueError (a failed verifier must be mapped to a number explicitly).
* Every std-normalising estimator takes ``ddof``, the delta degrees of freedom of its std: ``ddof=1``
  (Bessel-corrected ``torch.std``, the registry default) is TRL's and verl's convention; ``ddof=0`` (numpy's
  biased ``np.std``) is flow_grpo's ``PerPromptStatTracker`` and DDPO's, and differs by ``sqrt((G-1)/G)``
  (x0.968 at G=16). The image trainer's ``train.advantage.ddof`` defaults to 0 (flow_grpo), the LLM presets keep
  1 (TRL). ``eps`` is *added to the std* (TRL and flow_grpo: 1e-4; verl: 1e-6).
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

import inspect
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


def _check_ddof(ddof: int) -> int:
    if ddof not in (0, 1) or isinstance(ddof, bool):
        raise ValueError(f"ddof must be 0 (numpy np.std, flow_grpo/DDPO) or 1 (torch.std, TRL/verl), got {ddof!r}")
    return ddof


def _group_mean_std(r: Tensor, group_size: int, ddof: int = 1) -> tuple[Tensor, Tensor]:
    """Per-row group mean and std (``ddof`` 1: Bessel, 0: biased), broadcast back to ``[B]``; singleton groups get
    (0, 1) as in verl."""
    g = _groups(r, group_size)
    if group_size == 1:
        return torch.zeros_like(r), torch.ones_like(r)
    mean = g.mean(1, keepdim=True).expand_as(g).reshape(-1)
    std = g.std(1, keepdim=True, correction=_check_ddof(ddof)).expand_as(g).reshape(-1)
    return mean, std


def _batch_std(r: Tensor, ddof: int = 1) -> Tensor:
    """Std of the whole batch (``ddof`` as above); 1 for a single element."""
    return r.std(correction=_check_ddof(ddof)) if r.numel() > 1 else r.new_tensor(1.0)


@ADVANTAGES.register("grpo")
def grpo(rewards: Tensor, group_size: int, eps: float = 1e-4, ddof: int = 1) -> Tensor:
    """Group z-score ``(r - mean_g) / (std_g + eps)``; an all-equal group gets 0.

    ``ddof=0`` is flow_grpo's ``PerPromptStatTracker`` (``np.std(r_prompt) + 1e-4``), ``ddof=1`` TRL's "group".
    """
    r = check_rewards(rewards, group_size)
    mean, std = _group_mean_std(r, group_size, ddof)
    return (r - mean) / (std + eps)


@ADVANTAGES.register("no_std")
def no_std(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO: group-mean baseline without std scaling ``r - mean_g``."""
    r = check_rewards(rewards, group_size)
    return r - _group_mean_std(r, group_size)[0]


@ADVANTAGES.register("batch_std")
def batch_std(rewards: Tensor, group_size: int, eps: float = 1e-4, ddof: int = 1) -> Tensor:
    """Group-mean baseline, std over the whole batch: ``(r - mean_g) / (std_B + eps)``.

    ``ddof=0`` is flow_grpo's ``global_std=True`` (``np.std`` of all gathered rewards), ``ddof=1`` TRL's "batch".
    """
    r = check_rewards(rewards, group_size)
    return (r - _group_mean_std(r, group_size)[0]) / (_batch_std(r, ddof) + eps)


@ADVANTAGES.register("rloo")
def rloo(rewards: Tensor, group_size: int) -> Tensor:
    """Leave-one-out baseline ``r_i - mean_{j != i} r_j``; singleton groups keep ``r``."""
    r = check_rewards(rewards, group_size)
    if group_size == 1:
        return r.clone()
    g = _groups(r, group_size)
    loo = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return (g - loo).reshape(-1)


def whiten(x: Tensor, weights: Tensor | None = None, eps: float = 1e-8, ddof: int = 1) -> Tensor:
    """``(x - mean) * rsqrt(var + eps)`` with the (weighted) variance, unbiased for ``ddof=1`` as verl
    ``masked_whiten``."""
    w = torch.ones_like(x) if weights is None else weights.to(x)
    n = w.sum()
    mean = (x * w).sum() / n
    var = ((x - mean) ** 2 * w).sum() / n
    if _check_ddof(ddof) and n > 1:
        var = var * n / (n - 1)
    return (x - mean) * torch.rsqrt(var + eps)


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp(rewards: Tensor, group_size: int, weights: Tensor | None = None, eps: float = 1e-8,
                 ddof: int = 1) -> Tensor:
    """REINFORCE++-baseline: ``r - mean_g`` then global batch whitening.

    ``weights`` (e.g. completion lengths) reproduces verl's token-weighted whitening; None = per sequence.
    """
    r = check_rewards(rewards, group_size)
    return whiten(r - _group_mean_std(r, group_size)[0], weights, eps, ddof)


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
def gdpo(rewards: Tensor, group_size: int, weights: Sequence[float] | None = None, eps: float = 1e-4,
         ddof: int = 1) -> Tensor:
    """GDPO decoupled normalisation for ``[B, K]`` rewards (NVlabs TRL patch / TRL normalize_then_sum).

    ``z_k = (r_k - mean_g r_k) / (std_g r_k + eps)``, ``S = sum_k w_k z_k``, ``A = (S - mean_B S) / (std_B S + eps)``.
    """
    r = check_rewards(rewards, group_size, ndim=2)
    k = r.shape[1]
    w = torch.ones(k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (k,):
        raise ValueError(f"weights must have one entry per reward ({k}), got {tuple(w.shape)}")
    z = torch.stack([grpo(r[:, j], group_size, eps, ddof) for j in range(k)], 1)
    s = (z * w).sum(1)
    return (s - s.mean()) / (_batch_std(s, ddof) + eps)


@ADVANTAGES.register("per_prompt")
def per_prompt(rewards: Tensor, group_size: int, keys: Sequence[str] | None = None,
               history: dict[str, list[float]] | None = None, buffer_size: int = 16, min_count: int = 16,
               eps: float = 1e-6, ddof: int = 0) -> Tensor:
    """DDPO per-prompt stat tracking (kvablack/ddpo-pytorch ``stat_tracking.py``).

    Each prompt's rewards of this round join its history (the last ``buffer_size`` kept); a prompt with at least
    ``min_count`` rewards is normalised by its history's mean/std, otherwise by the whole round's:
    ``A = (r - mean) / (std + eps)``, population std (``np.std``, ``ddof=0``) as DDPO. ``keys`` name each row's prompt
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
    batch_mean, batch_std = r.mean(), _batch_std(r, ddof)
    for key in dict.fromkeys(keys):  # unique, in order
        rows = torch.tensor([i for i, k in enumerate(keys) if k == key])
        hist = (history.get(key, []) + r[rows].tolist())[-buffer_size:]
        history[key] = hist
        if len(hist) < min_count:
            mean, std = batch_mean, batch_std
        else:
            h = torch.tensor(hist, dtype=torch.float64)
            mean, std = h.mean().float(), h.std(correction=ddof if len(h) > 1 else 0).float()
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
                      kwargs: dict | None = None, ddof: int | None = None) -> tuple[str, dict]:
    """Map the config's (std, baseline, per_reward) options to ``(registered name, kwargs)``.

    ==========================  ===================  =========================================
    baseline / std              name                 note
    ==========================  ===================  =========================================
    mean / group                grpo                 flow_grpo per-prompt std (with ddof=0)
    mean / global               batch_std            flow_grpo ``global_std=True`` (SD3.5; ddof=0)
    mean / none                 no_std               Dr. GRPO
    median / group | none       median (mad | none)  MC-GRPO
    loo / none                  rloo                 RLOO
    per_reward (mean / group)   gdpo                 GDPO decoupled normalisation
    ==========================  ===================  =========================================

    An explicit ``estimator`` name wins; then ``std``/``baseline``/``per_reward`` must be left at their defaults.
    ``ddof`` (not None) goes to every estimator that takes one (the std's delta degrees of freedom, see the module
    docstring) unless ``kwargs`` sets it.
    """
    kwargs = dict(kwargs or {})
    if estimator is not None:
        if (std, baseline, per_reward) != ("group", "mean", False):
            raise ValueError(f"estimator={estimator!r} is explicit; leave std/baseline/per_reward at their defaults "
                             f"(got std={std!r}, baseline={baseline!r}, per_reward={per_reward})")
        return estimator, _with_ddof(estimator, kwargs, ddof)
    if per_reward:
        if (std, baseline) != ("group", "mean"):
            raise ValueError("per_reward (GDPO) normalises each reward by its group mean/std; "
                             f"use std='group', baseline='mean' (got std={std!r}, baseline={baseline!r})")
        return "gdpo", _with_ddof("gdpo", {"eps": eps, **kwargs}, ddof)
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
    return name, _with_ddof(name, {**kw, **kwargs}, ddof)


def _with_ddof(name: str, kwargs: dict, ddof: int | None) -> dict:
    """``kwargs`` plus ``ddof`` when the estimator ``name`` takes one and ``kwargs`` does not set it."""
    if ddof is None or "ddof" in kwargs:
        return kwargs
    try:
        fn = ADVANTAGES.get(name)
    except ValueError:
        return kwargs  # an unknown name is reported by the caller's registry check
    if "ddof" in inspect.signature(fn).parameters:
        return {**kwargs, "ddof": _check_ddof(ddof)}
    return kwargs
