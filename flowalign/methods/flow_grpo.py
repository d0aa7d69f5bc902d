"""Flow-GRPO (Liu et al., arXiv 2505.05470): group-relative PPO on the SDE rollouts of a flow model.

One iteration is the shared online round (``flowalign.methods.online``: deal, sample flat rollouts, score in the
background, gather, group advantages with zero-std groups dropped, shared-seed split into ``updates_per_iteration``
optimizer steps) with a step plan (which steps are SDE / trained; Fast window) drawn once per round from a shared
seed, so every member of a group gets the same window (flow_grpo draws it per GPU). A micro-batch is
``train_batch_size`` rows x one trained timestep (flow_grpo's accumulation over samples x timesteps).

**Loss** per row and step: PPO clip on ``ratio = exp(logp_theta - logp_old)`` with advantages clipped to
``adv_clip_max`` + ``beta`` x KL to the reference (LoRA disabled, no grad), weighted by
``1 / (rows of the update over all processes x trained steps)``.

Recipes, not new methods: DanceGRPO = ``kernel: dance`` + ``same_noise`` + ``schedule: subsample`` (+ ``best_worst_k``:
train only the best and worst ``k`` of each group, DanceGRPO ``--bestofn``); MixGRPO = ``schedule: sliding`` (+
``ode_solver: dpm2`` / ``post_compress``: MixGRPO-Flash, ``flowalign.solvers``); Flow-GRPO-Fast = ``schedule:
window``; CPS = ``kernel: cps``; GRPO-Guard (arXiv 2510.22319) = ``ratio_norm`` (the rollout keeps each step's mean;
``flowalign.losses.ratio_norm``) + ``step_reweight`` (policy loss / ``|dt|``, flow_grpo
``train_sd3_GRPO_Guard.py``); DDPO-IS (arXiv 2305.13301) = ``kernel: ddim`` on an epsilon model +
``advantage.estimator: per_prompt`` (DDPO's per-prompt stat tracking, checkpointed) + ``drop_zero_std: false``
(``recipes/sd15_ddpo_*.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowalign.adapter import Adapter
from flowalign.config import Config, ConfigError, help_field
from flowalign.data import RewardFn
from flowalign import sde
from flowalign.losses import POLICY_LOSSES, ratio_norm
from flowalign.methods.base import (METHODS, OPTIONS_KEY, Batch, Collected, Method, Runtime, TrainState, generator,
                                    option_error)
from flowalign.methods.online import (OnlineRound, Rollouts, RowStep, flat_metrics, flat_sampler, reference_kl,
                                      row_batches, split_updates)
from flowalign.schedules import StepPlan, make_plan
from flowalign.solvers import SOLVERS
from flowalign.trackers import captions


@dataclass
class FlowGRPOOptions:
    """``train.method_options`` of flow_grpo and its recipes; ``check``: the rules that need the whole config."""

    policy_loss: str = help_field("ppo_clip", "Registered policy loss (flowalign.losses.POLICY_LOSSES).")
    best_worst_k: int | None = help_field(None, "DanceGRPO --bestofn: train only the k extremes of each group.")
    ode_solver: str = help_field("euler", "MixGRPO-Flash: solver of the ODE steps after the SDE window (dpm2).")
    post_compress: float = help_field(1.0, "MixGRPO-Flash: keep this fraction of the post-window steps (0.4).")
    ratio_norm: bool = help_field(False, "GRPO-Guard: re-centre and rescale the log-ratio with the step means.")
    step_reweight: bool = help_field(False, "GRPO-Guard: divide each step's policy loss by |dt|.")

    def check(self, cfg) -> None:
        s = cfg.sample
        if not sde.is_stochastic(s.kernel, s.noise_level):
            raise ConfigError(f"flow_grpo needs a stochastic kernel: sample.kernel={s.kernel!r} with "
                              f"sample.noise_level={s.noise_level} draws no noise, so there is no policy ratio")
        if self.ratio_norm and s.density != "gaussian":
            raise option_error("ratio_norm", "(GRPO-Guard) re-centres a Gaussian log-ratio: it needs "
                               f"sample.density='gaussian', got {s.density!r}")
        k = self.best_worst_k
        if k is not None and not 2 <= k <= s.group_size:
            raise option_error(f"best_worst_k={k!r}", f"must be an int in [2, sample.group_size={s.group_size}] "
                               "(DanceGRPO --bestofn)")
        if self.ode_solver not in SOLVERS:
            raise option_error(f"ode_solver={self.ode_solver!r}", f"is not allowed. Allowed: {', '.join(SOLVERS)}")
        if not 0 < self.post_compress <= 1:
            raise option_error("post_compress", "must be in (0, 1] (MixGRPO-Flash: 0.4)")
        try:
            POLICY_LOSSES.get(self.policy_loss)
        except ValueError as e:
            raise ConfigError(f"{OPTIONS_KEY}.policy_loss: {e}") from None


def best_worst(adv: Tensor, group_size: int, k: int) -> Tensor:
    """Bool ``[B]``: per group the ``k // 2`` highest- and ``k - k // 2`` lowest-advantage rows (DanceGRPO
    ``--bestofn``, ``train_grpo_hunyuan.py``: advantages use the whole group, only the extremes are trained)."""
    order = torch.argsort(adv.view(-1, group_size), dim=1, stable=True)
    mask = torch.zeros_like(order, dtype=torch.bool)
    mask.scatter_(1, order[:, : k - k // 2], True)
    mask.scatter_(1, order[:, group_size - k // 2:], True)
    return mask.view(-1)


@METHODS.register("flow_grpo")
class FlowGRPO(Method):
    """Flow-GRPO; DanceGRPO, MixGRPO, Flow-GRPO-Fast, CPS, GRPO-Guard and DDPO are recipes of it."""

    name = "flow_grpo"
    Options = FlowGRPOOptions

    def __init__(self, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, adapter, reward_fn, runtime)
        self.opts: FlowGRPOOptions = self.options(cfg)
        self.round = OnlineRound(cfg, adapter, reward_fn, self.runtime)
        self.component = self.round
        self.policy_loss = POLICY_LOSSES.get(self.opts.policy_loss)
        self.train_guidance = cfg.sample.guidance if cfg.train.train_cfg else 1.0
        self.need_uncond = cfg.sample.guidance != 1.0 or self.train_guidance != 1.0
        self._store: Rollouts | None = None

    def rollout_plan(self, it: int) -> StepPlan:
        """Which steps of iteration ``it``'s rollouts are SDE / trained (drawn from a shared seed)."""
        s = self.cfg.sample
        return make_plan(s.schedule, s.num_steps, generator=generator(self.cfg.seed, "plan", it), iteration=it,
                         **s.schedule_options)


    @torch.no_grad()
    def collect(self, state: TrainState) -> Collected:
        cfg, o, G, it = self.cfg, self.opts, self.cfg.sample.group_size, state.iteration
        deal = self.round.deal(it)
        plan = self.rollout_plan(it)
        sc = self.round.run(deal, flat_sampler(self.round, deal, plan, need_uncond=self.need_uncond,
                                               return_means=o.ratio_norm, ode_solver=o.ode_solver,
                                               post_compress=o.post_compress))
        adv, zero, keep = self.round.advantages(sc)
        if o.best_worst_k:  # DanceGRPO best-of-n: train the extremes of each group
            keep &= best_worst(adv, G, o.best_worst_k)
        self._store = Rollouts.of(sc, adv, plan, self.runtime.device, means=o.ratio_norm)
        steps = plan.trained_indices()
        parts, num_updates = split_updates(keep.nonzero().flatten(), cfg, it) if steps else ([], 0)
        batches = row_batches(parts, deal.row0, deal.num_rows, cfg.train_batch_size, steps,
                              lambda rows, j, e: RowStep(rows, j))
        return Collected(batches=batches, num_updates=num_updates, metrics=flat_metrics(sc, G, adv, zero, keep, plan),
                         timings=sc.timings(), num_samples=deal.num_rows, images=sc.rollouts[0].images,
                         captions=captions([self.round.prompts[int(i)] for i in deal.local_pids], sc.local_total))

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        st, t, s, rt = self._store, self.cfg.train, self.cfg.sample, self.runtime
        rows, j = batch.data.rows, batch.data.step
        x, x_next, cond = st.latents[rows, j], st.latents[rows, j + 1], st.cond.index(rows)
        sigma, sigma_next = st.sigmas[j], st.sigmas[j + 1]
        with rt.autocast():
            out = self.adapter.predict(x, sigma, cond, self.train_guidance)
        new = sde.log_prob_of(s.kernel, x, x_next, out, sigma, sigma_next, s.noise_level,
                              reduction=s.reduction, density=s.density)
        adv = st.adv[rows].clamp(-t.adv_clip_max, t.adv_clip_max)
        old = st.log_probs[rows, j].to(new.log_prob.device)
        clip = {"clip_range": t.clip_range, "clip_range_lt": t.clip_range_lt, "clip_range_gt": t.clip_range_gt}
        if self.opts.ratio_norm:  # GRPO-Guard: the normalised log-ratio goes in as log_prob - old_log_prob
            delta = ratio_norm(new.log_prob, old, new.mean, st.means[rows, j].to(new.mean.device), new.std,
                               reduction=s.reduction)
            per_row, metrics = self.policy_loss(delta, torch.zeros_like(delta), adv, **clip)
        else:
            per_row, metrics = self.policy_loss(new.log_prob, old, adv, **clip)
        if self.opts.step_reweight:  # GRPO-Guard: equalise the steps' gradient scale (flow_grpo: / sqrt_dt^2)
            per_row = per_row / (sigma_next - sigma).abs().to(per_row.device)
        if batch.update == 0:  # rollout-vs-train consistency: |log p_train - log p_rollout| before any update
            gap = (new.log_prob.detach() - old).abs()
            metrics.update({"logprob_gap_mean": gap.mean(), "logprob_gap_max": gap.max(),
                            f"logprob_gap_max_step{j}": gap.max()})
        metrics["policy_loss"] = per_row.detach().mean()
        if t.beta > 0:
            kl = reference_kl(self.adapter, rt, x, sigma, sigma_next, cond, self.train_guidance, new.mean, new.std,
                              s.kernel, s.noise_level, t.kl, s.reduction)
            per_row = per_row + t.beta * kl
            metrics["kl"] = kl.detach().mean()
        return per_row.sum() * batch.weight, metrics


