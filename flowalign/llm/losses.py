"""Per-token policy losses of the GRPO family, KL estimators and explicit loss aggregation.

Notation: ``logp = log pi_theta(o_t)``, ``old = log pi_old(o_t)``, ``rho = exp(logp - old)``, ``A`` the advantage
(``[B]`` broadcast over tokens, or ``[B, C]`` token-level), ``m`` the completion mask.

Policy losses (registry ``TOKEN_POLICY_LOSSES``; the image side's ``flowalign.losses.POLICY_LOSSES`` is another one):

* ``clip``: ``-min(rho' A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` with ``rho' = min(rho, delta)`` when
  ``delta`` is set (PPO; GRPO eq. 3; DAPO clip-higher when ``eps_high > eps_low``; TRL grpo/bnpo/dr_grpo/dapo).
  ``importance_sampling_level="sequence"`` uses GSPO's ``s_i = exp(mean_t log rho)``.
* ``reinforce``: ``-sg(rho) A logp``-free form ``-rho A`` without clipping (RLOO's REINFORCE on-policy).

KL to the reference (added per token as ``beta * kl``, GRPO eq. 4): ``k3 = exp(x) - x - 1`` with
``x = ref - logp`` (Schulman's estimator; TRL/verl ``low_var_kl``), ``k1 = logp - ref``, ``k2 = (logp - ref)^2 / 2``.
``kl_ratio_correction=True`` multiplies it by ``rho`` as TRL 1.x ``use_bias_correction_kl`` does.

Aggregation (``aggregate``), over one *optimizer step*; pass the step totals ``num_seqs`` / ``num_tokens`` when
the step is split into micro-batches so that the sum of micro-batch losses is exactly the step loss:

=============================  ==================================================  ========================
``seq-mean-token-mean``        (1/N_seq) sum_i (sum_t m l / |o_i|)                   GRPO; TRL "grpo"
``token-mean``                 sum m l / N_tok                                       DAPO; TRL "dapo"
``micro-token-mean``           (1/W) sum_w (sum_{i in w} sum_t m l) / N_tok(w)       TRL "bnpo"
``seq-mean-token-sum``         (1/N_seq) sum_i sum_t m l                             verl
``seq-mean-token-sum-norm``    sum m l / (N_seq * norm), norm = max completion len   Dr. GRPO; TRL "dr_grpo"
=============================  ==================================================  ========================

``micro-token-mean`` is TRL 1.16's ``loss_type="bnpo"`` under gradient accumulation: each accumulation
micro-batch ``w`` (of the ``W`` in the optimizer step) is normalised by *its own* masked token count ``N_tok(w)``,
then divided by ``W``. Without accumulation (``W = 1``) it equals ``token-mean``; with it, it does not (the
step-level ``token-mean`` is what TRL calls dapo). Pass each row's window token count as ``num_tokens`` (``[B]``)
and ``W`` as ``num_windows``; the trainer's windows are its ``train.batch_size`` splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from flowalign.registry import Registry, check_choice

AGG_MODES = ("seq-mean-token-mean", "token-mean", "micro-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
TOKEN_POLICY_LOSSES: Registry[Callable[..., Tensor]] = Registry("token policy loss")


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman 2020, k1/k2/k3)."""
    check_choice("kl", kind, KL_ESTIMATORS)
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    x = ref_logp - logp
    return torch.exp(x) - x - 1


def _ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str) -> Tensor:
    check_choice("importance_sampling_level", level, ("token", "sequence"))
    log_ratio = logp - old_logp
    if level == "sequence":  # GSPO: length-normalised sequence ratio, shape [B, 1]
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return torch.exp(log_ratio)


@TOKEN_POLICY_LOSSES.register("clip")
def clip_loss(ratio: Tensor, adv: Tensor, eps_low: float = 0.2, eps_high: float | None = None,
              delta: float | None = None) -> Tensor:
    """PPO clipped surrogate per token, ``-min(rho' A, clip(rho, 1-eps_low, 1+eps_high) A)``."""
    eps_high = eps_low if eps_high is None else eps_high
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    return -torch.min(unclipped * adv, clipped * adv)


@TOKEN_POLICY_LOSSES.register("reinforce")
def reinforce_loss(ratio: Tensor, adv: Tensor, **_: float) -> Tensor:
    """Unclipped importance-weighted policy gradient ``-rho A`` (gradient ``-A grad log pi`` at rho = 1)."""
    return -ratio * adv


def aggregate(per_token: Tensor, mask: Tensor, mode: str, *, num_seqs: float | None = None,
              num_tokens: "float | Tensor | None" = None, norm: float | None = None,
              num_windows: float | None = None) -> Tensor:
    """Reduce ``[B, C]`` (or ``[B, 1]``) per-token losses to a scalar; see the module table.

    ``num_seqs``/``num_tokens`` default to this batch's rows / masked tokens. ``norm`` is required by
    ``seq-mean-token-sum-norm`` (TRL: ``max_completion_length``; verl: ``loss_scale_factor``).
    ``micro-token-mean``: ``num_tokens`` may be a ``[B]`` tensor (each row's accumulation-window token count)
    and ``num_windows`` the windows per step ``W`` (default 1: this batch is the only window).
    """
    check_choice("loss_agg_mode", mode, AGG_MODES)
    mask = mask.to(per_token.dtype)
    tok = per_token * mask
    n_seq = per_token.shape[0] if num_seqs is None else num_seqs
    if mode == "micro-token-mean":  # TRL bnpo: (per_token * mask).sum() / mask.sum().clamp(min=1) / W
        n_tok = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=tok.dtype,
                                                                       device=tok.device)
        per_row = tok.sum(-1) / n_tok.clamp(min=1.0)
        return per_row.sum() / (1.0 if num_windows is None else float(num_windows))
    if mode == "token-mean":
        n_tok = mask.sum().clamp(min=1.0) if num_tokens is None else max(float(num_tokens), 1.0)
        return tok.sum() / n_tok
    if mode == "seq-mean-token-mean":
        return (tok.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / n_seq
    if mode == "seq-mean-token-sum":
        return tok.sum() / n_seq
    if norm is None or norm <= 0:
        raise ValueError("loss_agg_mode='seq-mean-token-sum-norm' needs norm > 0 (e.g. max_new_tokens)")
    return tok.sum() / (n_seq * norm)


@dataclass
class LossOut:
    loss: Tensor
    metrics: dict


def policy_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, loss: str = "clip",
                agg: str = "seq-mean-token-mean", eps_low: float = 0.2, eps_high: float | None = None,
                delta: float | None = None, importance_sampling_level: str = "token",
                ref_logp: Tensor | None = None, beta: float = 0.0, kl: str = "k3", kl_ratio_correction: bool = True,
                entropy: Tensor | None = None, entropy_coef: float = 0.0, num_seqs: float | None = None,
                num_tokens: "float | Tensor | None" = None, norm: float | None = None,
                num_windows: float | None = None) -> LossOut:
    """The full per-micro-batch objective: policy term (+ beta * KL) aggregated by ``agg`` (- entropy bonus).

    With ``old_logp = logp.detach()`` (on-policy) ``rho == 1`` and the gradient is ``-A grad logp / normaliser``.
    The entropy bonus is a token mean over this batch (TRL), not rescaled by ``agg``.
    """
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (reference-model token log-probs)")
    mask = mask.to(logp.dtype)
    adv = adv.to(logp.dtype)
    if adv.ndim == 1:
        adv = adv.unsqueeze(1)
    ratio = _ratio(logp, old_logp, mask, importance_sampling_level)
    fn = TOKEN_POLICY_LOSSES.get(loss)
    per_token = fn(ratio, adv, eps_low=eps_low, eps_high=eps_high, delta=delta)
    metrics: dict = {}
    if beta:
        k = kl_estimate(logp, ref_logp, kl)
        if kl_ratio_correction:
            k = k * ratio
        per_token = per_token + beta * k
        metrics["kl"] = float((k.detach() * mask).sum() / mask.sum().clamp(min=1))
    out = aggregate(per_token, mask, agg, num_seqs=num_seqs, num_tokens=num_tokens, norm=norm,
                    num_windows=num_windows)
    if entropy is not None and entropy_coef:
        out = out - entropy_coef * (entropy * mask).sum() / mask.sum().clamp(min=1)
    with torch.no_grad():
        eh = eps_low if eps_high is None else eps_high
        r = ratio.expand_as(mask) if ratio.shape != mask.shape else ratio
        a = adv.expand_as(mask)
        n = mask.sum().clamp(min=1)
        low = ((r < 1 - eps_low) & (a < 0)).to(mask.dtype)
        high = ((r > 1 + eh) & (a > 0)).to(mask.dtype)
        metrics.update({
            "clip_frac_low": float((low * mask).sum() / n), "clip_frac_high": float((high * mask).sum() / n),
            "ratio_mean": float((r * mask).sum() / n),
        })
        if entropy is not None:
            metrics["entropy"] = float((entropy.detach() * mask).sum() / n)
    return LossOut(out, metrics)


def token_returns_with_kl(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """REINFORCE++ token advantages before whitening: ``A_t = score - beta * sum_{s>=t} KL_s`` (gamma = 1).

    Token reward ``r_t = 1[t = last] score - beta KL_t`` (arXiv 2501.03262 eq. 4-5; ``score`` may already carry
    a group baseline). Whiten the result over valid tokens with ``flowalign.advantages.whiten(x, mask)``.
    """
    m = mask.to(kl.dtype)
    pen = (beta * kl * m).flip(-1).cumsum(-1).flip(-1)
    return (scores[:, None] - pen) * m
