"""DiffusionNFT (Zheng et al., arXiv 2509.16117; NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``): online RL on
the *forward* (noising) process of a flow model, with no likelihoods and no CFG.

One iteration:

1. **Sample** clean images ``x0`` with the *old* policy ``v_old`` -- an EMA of the trained weights -- and **any**
   sampler: deterministic Euler or DPM-Solver++(2M) (``sample.kernel: ode`` + ``method_options.ode_solver: dpm2``,
   NFT's default) or an SDE kernel. Only ``x0`` is kept. Rewards and group advantages as in Flow-GRPO (the rollout
   and scoring loop is the shared online round, ``flowalign.methods.online``, run with the old weights swapped in).
2. **Optimality weight** ``r = clip((clip(A, +-c) / c) / 2 + 1/2, 0, 1)`` with ``c = train.adv_clip_max``.
3. **Loss** per row and timestep: re-noise ``x_t = (1 - t) x0 + t eps`` at ``K = int(N * timestep_fraction)``
   timesteps per sample (a random subset of the sampling schedule, fresh ``eps``), and contrast the implicit
   positive and negative policies built from the trained ``v`` and the old ``v_old`` (no grad)::

       v+ = b v + (1 - b) v_old,        v- = (1 + b) v_old - b v          (b = method_options.nft_beta)
       L+ = mean((x_t - t v+ - x0)^2) / sg(mean|x_t - t v+ - x0|)       (adaptive weight, clipped >= 1e-5)
       L- = same with v-
       L  = c (r L+ + (1 - r) L-) / b  +  train.beta mean((v - v_ref)^2)

   ``v_ref`` is the reference (LoRA disabled). Minimising ``L`` moves ``v`` towards the high-reward samples'
   flow and away from the low-reward ones; ``x0`` comes from any sampler, so the loss is solver-agnostic.
4. **Old policy** after each iteration's updates: ``old <- d old + (1 - d) theta`` with
   ``d = min(max(0, step - flat) * rate, cap)`` at optimizer step ``step`` (NFT ``return_decay``;
   ``decay_type`` 0/1/2 = (0, 0, 0) / (0, 0.001, 0.5) / (75, 0.0075, 0.999), or ``old_decay: [flat, rate, cap]``).

NFT defaults (``config/nft.py``): 10 DPM2 steps, CFG-free (``guidance 1``), ``nft_beta`` 1 (0.1 for OCR and
multi-reward), KL ``beta`` 1e-4, ``decay_type`` 1 (2 for OCR), lr 3e-4, 48 groups x 24, global std, 1 update per
iteration (2 for OCR), ``timestep_fraction`` 0.99.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from flowalign.adapter import Adapter, Cond
from flowalign.config import Config, ConfigError, help_field
from flowalign.data import RewardFn
from flowalign import sde
from flowalign.methods.base import METHODS, Batch, Collected, Method, Runtime, TrainState, generator, option_error
from flowalign.methods.online import OnlineRound, flat_metrics, flat_sampler, row_batches, split_updates
from flowalign.schedules import StepPlan
from flowalign.solvers import SOLVERS

#: NFT ``return_decay`` presets: (flat, rate, cap)
DECAY_TYPES: dict[int, tuple[float, float, float]] = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}
ADV_MODES = ("all", "positive_only", "negative_only", "one_only", "binary")


@dataclass
class NFTOptions:
    """``train.method_options`` of nft; ``check``: the rules that need the whole config."""

    nft_beta: float = help_field(1.0, "b of the implicit policies v+- (NFT: 1.0, 0.1 for OCR and multi-reward).")
    decay_type: int = help_field(1, "Old-policy EMA preset (NFT return_decay): 0, 1 or 2 (module docstring).")
    old_decay: list[float] | None = help_field(None, "[flat, rate, cap] of the old-policy EMA; overrides decay_type.")
    timestep_fraction: float = help_field(0.99, "Train at int(N * fraction) of the N sampling timesteps per row.")
    adv_mode: Literal[ADV_MODES] = help_field("all", "Reshape of the clipped advantage (NFT adv_mode).")
    ode_solver: str = help_field("euler", "Deterministic sampler of the old policy: euler or dpm2 (NFT's default).")
    post_compress: float = help_field(1.0, "Keep this fraction of the post-window ODE steps (flowalign.solvers).")

    def check(self, cfg) -> None:
        s = cfg.sample
        if not self.nft_beta > 0:
            raise option_error("nft_beta", f"must be a number > 0 (NFT: 1.0, 0.1 for OCR), got {self.nft_beta!r}")
        d = self.old_decay
        if d is not None and not (len(d) == 3 and d[0] >= 0 and d[1] >= 0 and 0 <= d[2] < 1):
            raise option_error("old_decay", f"must be [flat >= 0, rate >= 0, cap in [0, 1)], got {d!r}")
        if d is None and self.decay_type not in DECAY_TYPES:
            raise option_error(f"decay_type={self.decay_type!r}", "is not allowed. Allowed: "
                               f"{', '.join(map(str, DECAY_TYPES))} (NFT return_decay presets)")
        if not 0 < self.timestep_fraction <= 1 or int(s.num_steps * self.timestep_fraction) < 1:
            raise option_error(f"timestep_fraction={self.timestep_fraction!r}", "must be in (0, 1] and train at "
                               f"least one of sample.num_steps={s.num_steps} timesteps")
        if self.ode_solver not in SOLVERS:
            raise option_error(f"ode_solver={self.ode_solver!r}", f"is not allowed. Allowed: {', '.join(SOLVERS)}")
        if not 0 < self.post_compress <= 1:
            raise option_error("post_compress", "must be in (0, 1]")
        if (self.ode_solver != "euler" or self.post_compress != 1.0) and sde.is_stochastic(s.kernel, s.noise_level):
            raise ConfigError("train.method_options.ode_solver/post_compress apply to deterministic rollouts: "
                              "set sample.kernel=ode (sample.noise_level=0)")


@dataclass
class X0Store:
    """This process's clean samples of the iteration (rows in global order of its chunk range)."""

    latents: Tensor  # [n, 1, ...] the old policy's clean samples x0
    cond: Cond
    adv: Tensor  # [n]
    sigmas: Tensor  # [N+1] the sampling schedule (timesteps are drawn from it)
    tidx: list[Tensor]  # per inner epoch [n, K]: the sigma indices each row trains at


@dataclass
class RowSlot:
    """A micro-batch: local rows ``[b]``, their ``slot``-th timestep draw of inner epoch ``epoch``."""

    rows: Tensor
    slot: int
    epoch: int
    row0: int  # global index of local row 0 (the noise seeds are global)


def old_decay(step: int, flat: float, rate: float, cap: float) -> float:
    """NFT's old-policy EMA decay at optimizer step ``step``: ``0`` before ``flat``, then ``min((step - flat) rate,
    cap)``."""
    return 0.0 if step < flat else min((step - flat) * rate, cap)


def optimality_weight(adv: Tensor, clip_max: float, mode: str = "all") -> Tensor:
    """``r = clip((A' / c) / 2 + 1/2, 0, 1)`` with ``A' = clip(A, -c, c)`` reshaped by ``mode`` (NFT ``adv_mode``)."""
    a = adv.clamp(-clip_max, clip_max)
    if mode == "positive_only":
        a = a.clamp(0, clip_max)
    elif mode == "negative_only":
        a = a.clamp(-clip_max, 0)
    elif mode == "one_only":
        a = torch.where(a > 0, torch.ones_like(a), torch.zeros_like(a))
    elif mode == "binary":
        a = torch.sign(a)
    elif mode != "all":
        raise ValueError(f"adv_mode={mode!r} is not allowed. Allowed: {', '.join(ADV_MODES)}")
    return ((a / clip_max) / 2.0 + 0.5).clamp(0, 1)


def nft_loss(v: Tensor, v_old: Tensor, x_t: Tensor, x0: Tensor, t: Tensor, r: Tensor, beta: float
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """The DiffusionNFT policy loss per row ``[B]`` before the ``adv_clip_max`` factor (NFT ``ori_policy_loss``).

    ``t`` is ``[B]`` (the noise level of each row), ``r`` the optimality weight ``[B]``. Adaptive weights are
    ``mean|x0_hat - x0|`` (float64, no grad, clipped at 1e-5) as in NFT.
    """
    dims = tuple(range(1, x0.ndim))
    tt = t.view(-1, *([1] * (x0.ndim - 1))).to(v.dtype)
    v_old = v_old.detach()
    pos = beta * v + (1 - beta) * v_old
    neg = (1 + beta) * v_old - beta * v

    def weighted(pred: Tensor) -> Tensor:
        x0_hat = x_t - tt * pred
        with torch.no_grad():
            w = (x0_hat.double() - x0.double()).abs().mean(dims, keepdim=True).clamp_min(1e-5).to(x0_hat.dtype)
        return ((x0_hat - x0) ** 2 / w).mean(dims)

    pos_loss, neg_loss = weighted(pos), weighted(neg)
    loss = r * pos_loss / beta + (1 - r) * neg_loss / beta
    return loss, {"nft_positive_loss": pos_loss.detach().mean(), "nft_negative_loss": neg_loss.detach().mean(),
                  "old_deviate": ((v - v_old) ** 2).detach().mean()}


@METHODS.register("nft")
class DiffusionNFT(Method):
    """DiffusionNFT: forward-process RL with implicit positive/negative policies (see module docstring)."""

    name = "nft"
    Options = NFTOptions

    def __init__(self, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, adapter, reward_fn, runtime)
        self.opts: NFTOptions = self.options(cfg)
        self.round = OnlineRound(cfg, adapter, reward_fn, self.runtime)
        self.component = self.round
        self.decay = tuple(self.opts.old_decay) if self.opts.old_decay is not None \
            else DECAY_TYPES[self.opts.decay_type]
        self.k = max(1, int(cfg.sample.num_steps * self.opts.timestep_fraction))  # trained timesteps per row
        # the trained parameters (LoRA or full, set up by the trainer) and their old-policy copy
        self.params = [p for p in adapter.trainable_module().parameters() if p.requires_grad]
        self.old = [p.detach().clone() for p in self.params]
        self._synced_step = 0  # optimizer step the old policy was last mixed at
        self._iteration = 0
        self._store: X0Store | None = None

    @classmethod
    def check_config(cls, cfg) -> None:
        s = cfg.sample
        if s.guidance != 1.0:
            raise ConfigError(f"nft is CFG-free: the old policy samples without guidance and the loss trains the "
                              f"conditional velocity; set sample.guidance=1.0 (got {s.guidance})")
        super().check_config(cfg)
        from flowalign.adapter import ADAPTERS

        if ":" not in cfg.model.adapter and ADAPTERS.get(cfg.model.adapter).prediction_type != "flow":
            raise ConfigError(f"nft trains a flow-matching (velocity) model; model.adapter={cfg.model.adapter!r} "
                              "predicts noise")


    # ------------------------------------------------------------------------------------------ old policy
    @contextlib.contextmanager
    def old_policy(self) -> Iterator[None]:
        """Inside: the adapter computes the old (EMA) policy (the trained tensors are swapped, not copied)."""
        live = [p.data for p in self.params]
        for p, o in zip(self.params, self.old):
            p.data = o
        try:
            yield
        finally:
            for p, d in zip(self.params, live):
                p.data = d

    @torch.no_grad()
    def sync_old(self, global_step: int) -> float:
        """``old <- d old + (1 - d) theta`` at optimizer step ``global_step`` (once per step count); returns ``d``."""
        d = old_decay(global_step, *self.decay)
        if global_step != self._synced_step:
            for p, o in zip(self.params, self.old):
                o.mul_(d).add_(p.detach(), alpha=1.0 - d)
            self._synced_step = global_step
        return d

    # ------------------------------------------------------------------------------------------ collect
    def rollout_plan(self, it: int) -> StepPlan:
        """Deterministic samplers: no SDE step (so ``ode_solver`` runs the whole chain); SDE kernels: every step
        (the same plan every iteration ``it``)."""
        s = self.cfg.sample
        mask = torch.full((s.num_steps,), sde.is_stochastic(s.kernel, s.noise_level), dtype=torch.bool)
        return StepPlan(sde=mask, train=mask.clone())

    @torch.no_grad()
    def collect(self, state: TrainState) -> Collected:
        """The shared round sampled by the old policy; each kept row trains at ``K`` of the ``N`` sampling
        timesteps, a random subset per row and inner epoch drawn from ``(seed, "nft_t", it, epoch, row)``."""
        cfg, o, it, n_steps = self.cfg, self.opts, state.iteration, self.cfg.sample.num_steps
        decay = self.sync_old(state.global_step)
        self._iteration = it
        plan = self.rollout_plan(it)
        with self.old_policy():
            deal = self.round.deal(it)
            sc = self.round.run(deal, flat_sampler(self.round, deal, plan, need_uncond=False,
                                                   ode_solver=o.ode_solver, post_compress=o.post_compress))
        adv, zero, keep = self.round.advantages(sc)
        trajs, row0, n = sc.rollouts, deal.row0, deal.num_rows
        parts, num_updates = split_updates(keep.nonzero().flatten(), cfg, it)
        tidx = [torch.stack([torch.randperm(n_steps, generator=generator(cfg.seed, "nft_t", it, e, row0 + r))[:self.k]
                             for r in range(n)]) for e in range(cfg.train.num_inner_epochs)] if parts else []
        self._store = X0Store(latents=torch.cat([tr.latents[:, -1:] for tr in trajs]).contiguous(),
                              cond=Cond.cat([tr.cond for tr in trajs]), adv=adv[row0: row0 + n].to(self.runtime.device),
                              sigmas=trajs[0].sigmas, tidx=tidx)
        batches = row_batches(parts, row0, n, cfg.train_batch_size, range(self.k),
                              lambda rows, j, e: RowSlot(rows, j, e, row0))
        metrics = {**flat_metrics(sc, cfg.sample.group_size, adv, zero, keep, plan), "trained_steps": self.k,
                   "sde_window_start": -1, "train_nfe_per_leaf": self.k * float(keep.float().mean()),
                   "old_decay": decay}
        return Collected(batches=batches, num_updates=num_updates, metrics=metrics, timings=sc.timings(),
                         num_samples=n, images=trajs[0].images)

    # ------------------------------------------------------------------------------------------ loss
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        st, tr, rt, b = self._store, self.cfg.train, self.runtime, batch.data
        rows, j, e = b.rows, b.slot, b.epoch
        x0 = st.latents[rows, -1]
        sigma = st.sigmas[st.tidx[e][rows, j]].to(x0.device)  # [B] one noise level per row
        noise = torch.stack([
            torch.randn(x0.shape[1:], generator=generator(self.cfg.seed, "nft_eps", self._iteration, e,
                                                          b.row0 + int(r), j), dtype=torch.float32)
            for r in rows]).to(x0.device)
        s = sigma.view(-1, *([1] * (x0.ndim - 1)))
        x_t = ((1 - s) * x0.float() + s * noise).to(x0.dtype)
        cond = st.cond.index(rows)
        with torch.no_grad(), self.old_policy(), rt.autocast():
            v_old = self.adapter.predict(x_t, sigma, cond, 1.0)
        with rt.autocast():
            v = self.adapter.predict(x_t, sigma, cond, 1.0)
        r = optimality_weight(st.adv[rows], tr.adv_clip_max, self.opts.adv_mode).to(v.device)
        per_row, metrics = nft_loss(v.float(), v_old.float(), x_t.float(), x0.float(), sigma, r, self.opts.nft_beta)
        per_row = per_row * tr.adv_clip_max
        metrics["policy_loss"] = per_row.detach().mean()
        if tr.beta > 0:  # NFT's KL: the velocity's squared distance to the reference (LoRA disabled)
            with torch.no_grad(), rt.reference(), rt.autocast():
                v_ref = self.adapter.predict(x_t, sigma, cond, 1.0)
            kl = ((v.float() - v_ref.float()) ** 2).mean(tuple(range(1, v.ndim)))
            per_row = per_row + tr.beta * kl
            metrics["kl"] = kl.detach().mean()
        return per_row.sum() * batch.weight, metrics

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Prompt sampler + the old policy (safetensors bytes, base64: the method state is JSON)."""
        blob = st_save({f"old.{i}": o.detach().cpu().contiguous() for i, o in enumerate(self.old)})
        return {**self.round.state_dict(), "old": base64.b64encode(blob).decode("ascii"),
                "synced_step": self._synced_step}

    def load_state_dict(self, state: dict) -> None:
        self.round.load_state_dict(state)
        tensors = st_load(base64.b64decode(state["old"]))
        with torch.no_grad():
            for i, o in enumerate(self.old):
                o.copy_(tensors[f"old.{i}"])
        self._synced_step = int(state["synced_step"])

