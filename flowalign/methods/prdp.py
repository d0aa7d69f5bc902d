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

Pairs and sampling are D3PO's (``d3po.py``: ``pairing``, ``same_noise``, whole groups per chunk); ties are kept
(a zero difference is a target too). ``reward_scale: batch_std`` divides the differences by the round's reward std
(the paper regresses raw differences: ``none``). The paper's exact per-timestep weighting is not public (no code
was released; reference ``backprop_preference.md`` B5 marks the formula unverified): here every trained step
regresses the whole difference, which shares the optimum ``dr_hat = dr`` of the summed form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flowalign import sde
from flowalign.config import ConfigError, help_field
from flowalign.losses import gaussian_kl, reward_difference_loss
from flowalign.methods.base import METHODS
from flowalign.methods.d3po import D3PO, OPTIONS_KEY, PairOptions


@dataclass
class PRDPOptions(PairOptions):
    ratio_clip: float | None = help_field(1e-4, "eps of the proximal clip of each step's log-ratio to the sampling policy "
                                        "(PPO-style; 1e-4 as Flow-GRPO/DDPO for mean-reduced log-probs).")
    reward_scale: Literal["batch_std", "none"] = help_field(
        "batch_std", "Divide reward differences by the round's reward std (batch_std) or regress raw ones (none).")
    kl_coef: float = help_field(0.0, "Weight of the KL to the base model (LoRA disabled) at each trained step (0 = off).")

    def check(self, cfg, method: str) -> None:
        super().check(cfg, method)
        if self.preference != "reward":
            raise ConfigError(f"{OPTIONS_KEY}.preference={self.preference!r}: {method} regresses reward "
                              "differences, so it needs preference=reward")
        if self.kl_coef < 0:
            raise ConfigError(f"{OPTIONS_KEY}.kl_coef must be >= 0, got {self.kl_coef}")


@METHODS.register("prdp")
class PRDP(D3PO):
    """Reward-difference regression with proximal (clipped, sampler-referenced) updates; see module docstring."""

    name = "prdp"
    Options = PRDPOptions

    def label_pairs(self, it, cand, rewards, all_rewards, images, pids, row0):
        dr = rewards[cand[:, 0]] - rewards[cand[:, 1]]
        scale = 1.0
        if self.opts.reward_scale == "batch_std" and len(all_rewards) > 1:
            scale = float(all_rewards.std()) + 1e-6
        return cand, dr / scale, {"pair_reward_gap": float(dr.abs().mean()) if len(dr) else 0.0,
                                  "reward_scale": scale}

    def reference_log_prob(self, rows: Tensor, j: int) -> Tensor:
        """The policy that sampled this round (its stored step log-probs)."""
        return self._store.log_probs[rows, j]

    def pair_loss(self, lr_a: Tensor, lr_b: Tensor, target: Tensor):
        return reward_difference_loss(target.to(lr_a.dtype), self.cfg.train.beta * (lr_a - lr_b))

    def extra_loss(self, new: sde.StepOut, rows: Tensor, inv: Tensor, j: int):
        if self.opts.kl_coef == 0:
            return 0.0, {}
        st, s, rt = self._store, self.cfg.sample, self.runtime
        x = st.latents[rows, j]
        with torch.no_grad(), rt.reference(), rt.autocast():
            out_ref = self.adapter.predict(x, st.sigmas[j], st.cond.index(rows), self.train_guidance)
        mean_ref, _ = sde.mean_std(s.kernel, x, out_ref, st.sigmas[j], st.sigmas[j + 1], s.noise_level)
        kl = gaussian_kl(new.mean, mean_ref, new.std, st.sigmas[j + 1] - st.sigmas[j], form=self.cfg.train.kl,
                         reduction=s.reduction)
        per_pair = (kl[inv[:, 0]] + kl[inv[:, 1]]) / 2
        return self.opts.kl_coef * per_pair, {"kl": kl.detach().mean()}
