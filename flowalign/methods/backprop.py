"""Direct reward backpropagation: the shared engine every reward-backprop method composes (not a method itself).

Every reward-backprop method samples images with the current weights, keeps a graph through *some* of the
sampling, decodes, scores with a differentiable reward and minimises ``loss_scale * objective(r)``. They differ only
in which steps carry gradient and which image the reward sees (reference ``backprop_preference.md`` Part A):

=============  ================================================================  ======================
method         gradient path                                                      file
=============  ================================================================  ======================
``alignprop``  the last ``K`` steps of the chain, ``K`` drawn per micro-batch     ``alignprop.py``
``draft``      DRaFT-K: the last ``K`` steps, ``K`` fixed (1 by default)          ``draft.py``
``draft_lv``   DRaFT-LV: the last step, on the sample and ``n`` re-noised copies  ``draft.py``
``refl``       one step at a random late index, reward on its ``x0`` estimate    ``refl.py``
``leapalign``  two leaps between random steps of a no-grad ODE trajectory         ``leapalign.py``
=============  ================================================================  ======================

Each of them is a ``Method`` that holds a ``RewardBackprop`` engine and hands it its own ``forward`` (noise ->
differentiable images, a ``Tail``); the engine owns prompts, noise, batching, reward scoring and the objective, and
its options (``BackpropOptions``) are one group of the method's flat options (``methods/options.py``). Sampling
happens inside ``loss`` so that every optimizer step trains on samples of its own weights (on-policy; ``collect``
only deals prompts and rows). One round is ``sample.prompts_per_round x sample.group_size`` rows, split into
``train.updates_per_iteration`` optimizer steps and micro-batches of ``train.batch_size`` rows; row ``r`` of
iteration ``it`` starts from the noise of ``(seed, "noise", it, r)`` on any process count, and a micro-batch's draws
(``K``, ReFL's step, LeapAlign's indices) come from ``(seed, "draw", it, first row)``.

Objective per image (``objective``): ``maximize`` ``-r`` (DRaFT), ``hinge`` ``relu(hinge - r)`` (ReFL: 2.0 on
ImageReward; FlowBP: 0.55 on HPSv2.1), ``target`` ``|r - target|`` (AlignProp aesthetic: 10); times
``loss_scale`` (AlignProp 0.01, ReFL 1e-3). Rewards: every reward with a nonzero weight must be differentiable;
zero-weight non-differentiable components of ``reward.weights`` (e.g. ``shapes_geneval: 0.0``) are scored on
detached images and logged only (monitors). Logged per micro-batch: ``reward_mean`` (the reward the loss saw),
``reward_<name>_mean``, ``objective_mean``, the method's draws, and ``grad/{latent,out}_{first,mid,last}_third``:
gradient norms reaching each third of the trajectory (``flowalign.diff_sampling.GradNorms``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from flowalign import diff_sampling as ds
from flowalign import sde
from flowalign.adapter import Adapter, Cond
from flowalign.config import Config, ConfigError, help_field
from flowalign.data import RewardFn, load_prompts
from flowalign.methods.base import Batch, Collected, PromptSampler, Runtime, TrainState, generator, option_error


# ----------------------------------------------------------------------------------------------- options
@dataclass
class BackpropOptions:
    """The engine's options: one group of every reward-backprop method's ``train.method_options``."""

    objective: Literal["maximize", "hinge", "target"] = help_field(
        "maximize", "Per-image objective: maximize -r, hinge relu(hinge - r) (ReFL), target |r - target| (AlignProp).")
    loss_scale: float = help_field(1.0, "Multiplies the objective (AlignProp loss_coeff 0.01, ReFL grad_scale 1e-3).")
    hinge: float = help_field(2.0, "Hinge level c of objective=hinge (ReFL 2.0 on ImageReward; FlowBP 0.55 on "
                                   "HPSv2.1).")
    target: float = help_field(10.0, "Target of objective=target (AlignProp aesthetic: 10).")
    checkpoint: bool = help_field(True, "Checkpoint every denoiser call that keeps a graph (use_reentrant=False).")
    checkpoint_decode: bool = help_field(False, "Also checkpoint the decoder (VAE) call (worth it at >= 1024 px).")
    grad_norms: bool = help_field(True, "Record per-step gradient norms (backward hooks) and log them per third.")
    log_step_grad_norms: bool = help_field(False, "Also log grad/<latent|out>_step<i> for every step i.")

    def check(self, cfg) -> None:
        """Range checks that need the config (``ConfigError`` naming the key)."""
        if not math.isfinite(self.loss_scale) or self.loss_scale <= 0:
            raise option_error("loss_scale", f"must be a finite number > 0, got {self.loss_scale}")


def attach_engine(method: Any, cfg: Config, adapter: Adapter, reward_fn: RewardFn) -> Any:
    """Parse ``method``'s options, build its ``RewardBackprop`` (driven by ``method.forward``) as
    ``method.engine``, which is also its ``component`` (collect, loss and state delegate to it); returns the
    parsed options so the method can take its own part (``opts.part(...)``)."""
    opts = method.options(cfg)
    method.engine = method.component = RewardBackprop(method.name, cfg, adapter, reward_fn, method.runtime,
                                                      opts.part(BackpropOptions), method.forward)
    return opts


def check_backprop_config(name: str, cfg, deterministic_only: bool) -> None:
    """Load-time rules of every reward-backprop method ``name`` (after its options were checked).

    ``deterministic_only``: the method backpropagates through the deterministic sampler (ODE / DDIM eta=0)."""
    s, t = cfg.sample, cfg.train
    if deterministic_only and sde.is_stochastic(s.kernel, s.noise_level):
        raise ConfigError(f"{name} backpropagates through the deterministic sampler: set sample.kernel to "
                          f"ode (flow) or ddim (epsilon) and sample.noise_level=0 (got {s.kernel!r}, "
                          f"{s.noise_level})")
    if t.num_inner_epochs != 1:
        raise ConfigError(f"train.num_inner_epochs={t.num_inner_epochs}: {name} samples fresh images in "
                          "every update, so there is nothing to revisit; set it to 1")
    from flowalign.rewards.base import REWARDS

    for rname, w in cfg.reward.weights.items():
        if ":" in rname or w == 0:
            continue
        obj = REWARDS.get(rname)
        if not getattr(obj, "differentiable", False):
            raise ConfigError(f"reward.weights.{rname}: {name} backpropagates the reward, but {rname!r} is not "
                              "differentiable; use a differentiable reward or give it weight 0 (logged only)")


# ----------------------------------------------------------------------------------------------- the engine
@dataclass
class Tail:
    """What a method's ``forward`` returns: differentiable images and how they enter the loss.

    ``rows[m]`` is the micro-batch row image ``m`` belongs to (None: image m is row m); a row's loss is
    ``sum_m weight[m] * loss_scale * objective(r_m)`` over its images (``weight`` None: 1).
    """

    images: Tensor
    rows: Tensor | None = None
    weight: Tensor | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


#: ``forward(x [B, ...] initial noise, cond, sigmas [N+1], draw (CPU generator: index draws), noise (device
#: generator: kernel / re-noising noise), norms (GradNorms or None: watch the steps that keep a graph)) -> Tail``
Forward = Callable[[Tensor, Cond, Tensor, torch.Generator, torch.Generator, "ds.GradNorms | None"], Tail]


def score(reward_fn, images: Tensor, prompts: list[str], metadata: list[dict]) -> tuple[Tensor, dict[str, Tensor]]:
    """Differentiable total reward ``[M]`` and detached components.

    A ``Compose`` is evaluated component by component: differentiable ones on ``images`` (keeping the graph),
    non-differentiable ones (which must have weight 0: monitors) on detached images under ``no_grad``.
    """
    comps = getattr(reward_fn, "components", None)
    if comps is None:
        total = reward_fn(images, prompts, metadata)
        return total, {getattr(reward_fn, "name", "reward"): total.detach()}
    total: Tensor | float = 0.0
    parts = {}
    for name, rf in comps.items():
        w = reward_fn.weights[name]
        if rf.differentiable:
            v = rf(images, prompts, metadata)
        else:
            if w != 0:
                raise ValueError(f"reward {name!r} (weight {w}) is not differentiable; reward backprop needs every "
                                 "weighted reward differentiable (give monitors weight 0)")
            with torch.no_grad():
                v = rf(images.detach(), prompts, metadata)
        parts[name] = v.detach()
        if w != 0:
            total = total + w * v.to(images.device)
    if not torch.is_tensor(total):
        raise ValueError("reward.weights gives every reward weight 0: nothing to maximise")
    return total, parts


class RewardBackprop:
    """The engine of the reward-backprop methods (module docstring): ``collect``/``loss`` around a method's
    ``forward``. A method builds one in its ``__init__`` and delegates ``collect``, ``loss`` and the state to it."""

    def __init__(self, name: str, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime,
                 opts: BackpropOptions, forward: Forward) -> None:
        s = cfg.sample
        self.name, self.cfg, self.adapter, self.reward_fn, self.runtime = name, cfg, adapter, reward_fn, runtime
        self.opts, self.forward = opts, forward
        self.prompts, self.metadata = load_prompts(s.prompts)
        self.sampler = PromptSampler(len(self.prompts), seed=cfg.seed, shuffle=s.shuffle_prompts)
        ds.check_kernel(adapter, s.kernel)
        if getattr(reward_fn, "components", None) is None and not getattr(reward_fn, "differentiable", False):
            raise ValueError(f"{name} needs a differentiable reward, got {reward_fn!r}")
        self.need_uncond = s.guidance != 1.0
        self.last_norms: ds.GradNorms | None = None  # of the latest loss() (tests, notebooks)

    # ------------------------------------------------------------------------------------------ collect
    @torch.no_grad()
    def collect(self, state: TrainState) -> Collected:
        """Deal this round's rows: prompts, updates and this process's micro-batches (no sampling here)."""
        cfg, s, rt = self.cfg, self.cfg.sample, self.runtime
        pids = self.sampler.next(s.prompts_per_round).repeat_interleave(s.group_size)
        rows = torch.arange(len(pids))
        num_updates = min(cfg.train.updates_per_iteration, len(rows))
        mbs = cfg.train_batch_size
        batches, mine_total = [], 0
        for u, part in enumerate(torch.tensor_split(rows, num_updates)):
            mine = torch.tensor_split(part, rt.world_size)[rt.rank]
            mine_total += len(mine)
            for i in range(0, len(mine), mbs):
                r = mine[i: i + mbs]
                batches.append(Batch({"rows": r, "pids": pids[r], "iteration": state.iteration,
                                      "weight": 1.0 / len(part)}, update=u))
        return Collected(batches=batches, num_updates=num_updates, num_samples=mine_total,
                         metrics={"rows_per_update": len(rows) / num_updates})

    # ------------------------------------------------------------------------------------------ loss
    def objective(self, r: Tensor) -> Tensor:
        """Per-image objective of the rewards ``r [M]`` (before ``loss_scale``)."""
        o = self.opts
        if o.objective == "maximize":
            return -r
        if o.objective == "hinge":
            return torch.relu(o.hinge - r)
        return (r - o.target).abs()

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Any]]:
        d, s, rt, o = batch.data, self.cfg.sample, self.runtime, self.opts
        rows, pids, it = d["rows"], d["pids"], d["iteration"]
        prompts = [self.prompts[int(p)] for p in pids]
        meta = [dict(self.metadata[int(p)]) for p in pids]
        neg = [s.negative_prompt] if self.need_uncond else None
        t0 = time.perf_counter()
        with rt.autocast():
            cond = Cond.cat([self.adapter.encode([p], negative=neg) for p in prompts])
            x = torch.cat([self.adapter.init_noise(1, generator(self.cfg.seed, "noise", it, int(r),
                                                                  device=rt.device)) for r in rows])
            sigmas = self.adapter.sigmas(s.num_steps)
            draw = generator(self.cfg.seed, "draw", it, int(rows[0]))
            noise = generator(self.cfg.seed, "kernel_noise", it, int(rows[0]), device=rt.device)
            norms = ds.GradNorms(s.num_steps, len(rows)) if o.grad_norms else None
            tail = self.forward(x, cond, sigmas, draw, noise, norms)
            idx = tail.rows if tail.rows is not None else torch.arange(len(rows))
            r, parts = score(self.reward_fn, tail.images, [prompts[int(i)] for i in idx],
                             [meta[int(i)] for i in idx])
        obj = self.objective(r) * o.loss_scale
        per = obj if tail.weight is None else obj * tail.weight.to(obj.device, obj.dtype)
        loss = per.sum() * d["weight"]
        self.last_norms = norms
        metrics: dict[str, Any] = {"reward_mean": r.detach().mean(), "objective_mean": obj.detach().mean(),
                                   "time/forward": time.perf_counter() - t0, **tail.metrics}
        if getattr(self.reward_fn, "components", None) is not None:
            metrics.update({f"reward_{k}_mean": v.float().mean() for k, v in parts.items()})
        if norms is not None:
            metrics.update(norms.metrics(o.log_step_grad_norms))
        return loss, metrics

    # ------------------------------------------------------------------------------------------ helpers
    def chain_kwargs(self, norms: ds.GradNorms | None, noise: torch.Generator) -> dict[str, Any]:
        """Keyword arguments of ``diff_sampling.integrate`` for this run's sampler."""
        s = self.cfg.sample
        return {"guidance": s.guidance, "kernel": s.kernel, "noise_level": s.noise_level, "generator": noise,
                "checkpoint": self.opts.checkpoint, "norms": norms}

    def decode(self, x: Tensor) -> Tensor:
        return ds.decode(self.adapter, x, self.opts.checkpoint_decode)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
