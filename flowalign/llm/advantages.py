"""The LLM trainer's advantage step: ``flowalign.advantages`` estimators over one or several processes.

``step_advantages`` returns ``[B]`` advantages, or ``[B, C]`` token advantages for REINFORCE++ with the per-token
KL in the reward (``r_t = 1[t = last] score - beta KL_t``, returns whitened over the tokens of every process).
Group statistics are local (a group never straddles processes); estimators with batch statistics
(``BATCH_STAT_ESTIMATORS``) see the rewards of all processes (gathered; equal batch sizes per process, so not with
dynamic sampling). RLOO with the KL in the reward scores ``r - beta * sum_t KL_t``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from flowalign.advantages import ADVANTAGES
from flowalign.llm.losses import token_returns_with_kl

if TYPE_CHECKING:
    from flowalign.llm.config import AlgoCfg
    from flowalign.llm.rollout import Rollout

BATCH_STAT_ESTIMATORS = ("batch_std", "gdpo", "reinforce_pp")
GlobalSum = Callable[[Tensor], Tensor]


def step_advantages(R: Tensor, group_size: int, algo: "AlgoCfg", weights: list[float], acc,
                    ro: "Rollout | None" = None, kl: Tensor | None = None) -> Tensor:
    """Advantages of this process's rows from reward components ``R [B, K]`` (weights ``[K]``); ``kl [B, C]`` is
    the per-token KL that goes into the reward (``algo.kl_in_reward``), ``acc`` the ``accelerate.Accelerator``."""
    P = acc.num_processes
    if P > 1 and algo.advantage in BATCH_STAT_ESTIMATORS and not algo.kl_in_reward:
        if algo.dynamic_sampling:
            raise ValueError(f"algo.advantage={algo.advantage!r} needs equal batches per process; "
                             "it cannot be combined with algo.dynamic_sampling on several processes")
        n = len(R)
        R_all = acc.gather(R.to(acc.device)).cpu()
        if ro is not None and algo.advantage == "reinforce_pp":
            lengths = acc.gather(ro.lengths.to(acc.device)).cpu()
            kw = dict(algo.advantage_kwargs)
            kw.setdefault("weights", lengths.float())
            A_all = ADVANTAGES.get("reinforce_pp")(R_all @ torch.tensor(weights, dtype=R.dtype), group_size, **kw)
        else:
            A_all = _local(R_all, group_size, algo, weights, None, None, _global_sum(acc))
        r = acc.process_index
        return A_all[r * n:(r + 1) * n]
    return _local(R, group_size, algo, weights, ro, kl, _global_sum(acc))


def _global_sum(acc) -> GlobalSum:
    if acc.num_processes == 1:
        return lambda x: x
    return lambda x: acc.reduce(x.to(acc.device), reduction="sum").cpu()


def _local(R: Tensor, group_size: int, a: "AlgoCfg", weights: list[float], ro: "Rollout | None",
           kl: Tensor | None, global_sum: GlobalSum) -> Tensor:
    w = torch.tensor(weights, dtype=R.dtype)
    kw = dict(a.advantage_kwargs)
    if a.advantage == "gdpo":
        return ADVANTAGES.get("gdpo")(R, group_size, weights=w, **kw)
    total = R @ w
    if a.kl_in_reward and kl is not None and a.advantage == "reinforce_pp":
        mask = ro.completion_mask.cpu()
        base = ADVANTAGES.get("no_std")(total, group_size)
        tok = token_returns_with_kl(base, kl.cpu(), mask, a.beta)
        return torch.where(mask.bool(), whiten_tokens(tok, mask, global_sum), torch.zeros_like(tok))
    if a.kl_in_reward and kl is not None:  # RLOO: sequence reward r - beta * sum_t KL_t
        total = total - a.beta * (kl.cpu() * ro.completion_mask.cpu()).sum(1)
    if a.advantage == "reinforce_pp" and "weights" not in kw and ro is not None:
        kw["weights"] = ro.lengths.cpu().float()  # token-weighted whitening, as verl
    return ADVANTAGES.get(a.advantage)(total, group_size, **kw)


def whiten_tokens(x: Tensor, mask: Tensor, global_sum: GlobalSum, eps: float = 1e-8) -> Tensor:
    """``flowalign.advantages.whiten(x, mask)`` (``[B, C]``) over the tokens of all processes.

    Statistics in float64, so that one process and several (partial sums added in another order) give the same
    float32 advantages.
    """
    w, xd = mask.double(), x.double()
    n, sx = global_sum(torch.stack([w.sum(), (xd * w).sum()]))
    mean = sx / n
    var = global_sum(((xd - mean) ** 2 * w).sum()[None])[0] / n
    if n > 1:
        var = var * n / (n - 1)
    return ((xd - mean) * torch.rsqrt(var + eps)).to(x.dtype)
