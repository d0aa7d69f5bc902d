"""PRDP (Deng et al., arXiv 2402.08714, CVPR 2024): proximal reward-difference prediction on online pairs.

The Reward Difference Prediction (RDP) objective turns reward maximisation into a regression: for two samples
``a, b`` of one prompt, the model's implicit reward difference (DPO's ``beta log pi/pi_ref``, over the denoising
steps) must predict the true one::

    dr_hat_j = beta (l^a_j - l^b_j),   l^i_j = clip(log p_theta(x^i_{j+1} | x^i_j) - log p_old(x^i_{j+1} | x^i_j))
    L        = mean_j (dr - dr_hat_j)^2 [+ kl_coef * KL(p_theta || p_base) at step j]

*Proximal* (paper §4.2): the reference is the policy that sampled the round (online, refreshed every iteration),
and each step's log-ratio is clipped to ``[log(1 - eps), log(1 + eps)]`` (``ratio_clip``), PPO-style, so an update
cannot move a step's likelihood far from the sampler. ``train.beta`` is ``beta``; the optional KL to the base model
(LoRA disabled) is the paper's KL regularisation, in Flow-GRPO's Gaussian form (``train.kl``).

Pairs and sampling are the shared online pair round (``pair_round.PairRound``, composed by D3PO too: ``pairing``,
``same_noise``, whole groups per chunk); ties are kept (a zero difference is a target too). ``reward_scale:
batch_std`` divides the differences by the round's reward std (the paper regresses raw differences: ``none``).
The paper's exact per-timestep weighting is not public (no code was released; reference ``backprop_preference.md``
B5 marks the formula unverified): here every trained step regresses the whole difference, which shares the
optimum ``dr_hat = dr`` of the summed form. The KL term is the shared ``online.reference_kl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from flowalign.adapter import Adapter
from flowalign.config import Config, help_field
from flowalign.data import RewardFn
from flowalign import sde
from flowalign.losses import reward_difference_loss
from flowalign.methods.base import METHODS, Batch, Collected, Method, Runtime, TrainState, option_error
from flowalign.methods.online import reference_kl
from flowalign.methods.options import compose_options
from flowalign.methods.pair_round import (
    PairOptions,
    PairRound,
    PairStore,
    RoundRewards,
    check_pair_config,
    check_ratio_clip,
)


@dataclass
class PRDPLoss:
    """PRDP's loss options."""

    ratio_clip: float | None = help_field(1e-4, "eps of the proximal clip of each step's log-ratio to the sampling "
                                                "policy (PPO-style; 1e-4 as Flow-GRPO/DDPO for mean-reduced "
                                                "log-probs).")
    reward_scale: Literal["batch_std", "none"] = help_field(
        "batch_std", "Divide reward differences by the round's reward std (batch_std) or regress raw ones (none).")
    kl_coef: float = help_field(0.0, "Weight of the KL to the base model (LoRA disabled) at each trained step "
                                     "(0 = off).")

    def check(self, cfg) -> None:
        check_ratio_clip(self.ratio_clip)
        if self.kl_coef < 0:
            raise option_error("kl_coef", f"must be >= 0, got {self.kl_coef}")


@METHODS.register("prdp")
class PRDP(Method):
    """Reward-difference regression with proximal (clipped, sampler-referenced) updates; see module docstring."""

    name = "prdp"
    Options = compose_options("PRDPOptions", PairOptions, PRDPLoss)

    def __init__(self, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, adapter, reward_fn, runtime)
        opts = self.options(cfg)
        self.loss_opts = opts.part(PRDPLoss)
        self.round = PairRound(cfg, adapter, reward_fn, self.runtime, opts.part(PairOptions), self.label_pairs)
        self.component = self.round
        self._store: PairStore | None = None

    @classmethod
    def check_config(cls, cfg) -> None:
        opts = cls.options(cfg)
        if opts.preference != "reward":
            raise option_error(f"preference={opts.preference!r}:", f"{cls.name} regresses reward differences, so "
                               "it needs preference=reward")
        check_pair_config(cls.name, cfg)


    def collect(self, state: TrainState) -> Collected:
        self._store, collected = self.round.collect(state)
        return collected

    def label_pairs(self, r: RoundRewards) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Every candidate pair ``(a, b)`` with its target ``r_a - r_b`` (scaled by ``reward_scale``)."""
        dr = r.rewards[r.cand[:, 0]] - r.rewards[r.cand[:, 1]]
        scale = 1.0
        if self.loss_opts.reward_scale == "batch_std" and len(r.all_rewards) > 1:
            scale = float(r.all_rewards.std()) + 1e-6
        return r.cand, dr / scale, {"pair_reward_gap": float(dr.abs().mean()) if len(dr) else 0.0,
                                    "reward_scale": scale}

    @staticmethod
    def sampler_log_prob(store: PairStore, rows: Tensor, j: int) -> Tensor:
        """PRDP's reference: the policy that sampled this round (its stored step log-probs)."""
        return store.log_probs[rows, j]

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Any]]:
        st, idx, j = self._store, batch.data["pairs"], batch.data["step"]
        step = self.round.log_ratios(st, idx, j, self.sampler_log_prob, self.loss_opts.ratio_clip)
        lr, inv = step.lr, step.inv
        per_pair, metrics = reward_difference_loss(st.target[idx].to(lr.dtype),
                                                   self.cfg.train.beta * (lr[inv[:, 0]] - lr[inv[:, 1]]))
        metrics.update(step.metrics)
        if self.loss_opts.kl_coef != 0:
            kl, metrics["kl"] = self.base_kl(step.new, step.rows, inv, j)
            per_pair = per_pair + self.loss_opts.kl_coef * kl
        return per_pair.sum() * batch.data["weight"], metrics

    def base_kl(self, new: sde.StepOut, rows: Tensor, inv: Tensor, j: int) -> tuple[Tensor, Tensor]:
        """Per pair: the mean over its two rows of KL(p_theta || p_base) at step ``j`` (``online.reference_kl``:
        Flow-GRPO's Gaussian form, ``train.kl``); and the detached row mean for the log."""
        st, s = self._store, self.cfg.sample
        kl = reference_kl(self.adapter, self.runtime, st.latents[rows, j], st.sigmas[j], st.sigmas[j + 1],
                          st.cond.index(rows), self.round.train_guidance, new.mean, new.std, s.kernel, s.noise_level,
                          self.cfg.train.kl, s.reduction)
        return (kl[inv[:, 0]] + kl[inv[:, 1]]) / 2, kl.detach().mean()


