"""BranchGRPO (Li et al., arXiv 2509.06040): GRPO on tree rollouts with depth-wise advantages and pruning.

The sampling, reward fusion, advantages and pruning live in ``flowalign.tree``; the round (prompt dealing,
background scoring, gathering, shared-seed update split, KL to the reference) is ``flowalign.methods.online``.
One iteration:

1. **Sample trees.** ``prompts_per_round`` trees (one per prompt), ``group_size = branching ** len(branch_steps)``
   leaves each. A chunk of ``sample.batch_size`` leaf rows holds ``sample.batch_size // group_size`` whole trees
   (``sample.batch_size`` is then the most rows one denoiser forward sees); chunk ``c`` draws its noise from
   ``(seed, iteration, c)`` and process ``r`` samples its contiguous chunk range, as ``flow_grpo`` does.
2. **Score** the leaves (background thread), gather them; trees whose leaves all score the same are dropped when
   ``train.advantage.drop_zero_std`` (their advantages are all 0).
3. **Advantages** per tree: fused node rewards (``mean`` or ``prob_weighted``), depth-wise normalisation.
4. **Transitions**: every stochastic edge on a trainable step not removed by depth/width pruning (pruning applies
   during the first ``pruning_until`` fraction of ``max_iterations``, BranchGRPO ``--pruning_step_ratio``).
   Siblings share their parent's forward: the training unit is a parent with its kept children, so a split step
   costs one denoiser row per parent, not per child. Units are shuffled with a shared seed and split into
   ``updates_per_iteration`` optimizer steps.
5. **Loss** per edge: PPO clip on the rescored edge log-prob (``flowalign.tree.edge_log_prob``; split edges keep
   their noise scale), weighted by ``1 / (edges of the update over all processes)``; + ``beta`` x KL as Flow-GRPO.

The split steps come from ``sample.schedule: branch`` with ``sample.schedule_options.branch_steps``; the options
are ``BranchOptions`` (``flowalign train --help-config``). BranchGRPO-Mix is ``mix``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from flowalign.adapter import Adapter, Cond
from flowalign.config import Config, ConfigError, help_field
from flowalign.data import RewardFn
from flowalign import sde
from flowalign import tree as T
from flowalign.losses import POLICY_LOSSES
from flowalign.methods.base import (METHODS, OPTIONS_KEY, Batch, Collected, Method, Runtime, TrainState, generator,
                                    option_error)
from flowalign.methods.online import Deal, OnlineRound, SampleFn, reference_kl, reward_metrics, unit_batches
from flowalign.schedules import StepPlan, make_plan


@dataclass
class BranchOptions:
    """``train.method_options`` of branch_grpo; ``check``: ranges and the tree geometry (needs the whole config)."""

    branching: int = help_field(2, "Children per split.")
    split_noise_scale: float = help_field(1.0, "Noise multiplier at split steps (reference script: 4.0).")
    split_logprob: Literal[T.SPLIT_LOGPROBS] = help_field("drawn", "Log-prob of a split edge: with the drawn (scaled) "
                                                          "std, or the unscaled one.")
    fusion: Literal[T.FUSIONS] = help_field("mean", "Node reward from its leaves: mean or prob_weighted.")
    fusion_temperature: float = help_field(1.0, "Temperature of prob_weighted fusion.")
    depth_pruning: list[int] = help_field(factory=list, help="Child depths whose edges are not trained, e.g. [9, 10].")
    depth_pruning_slide_interval: int | None = help_field(None, "Slide the pruned depths one shallower every N "
                                                          "iterations.")
    depth_pruning_stop_depth: int | None = help_field(None, "Stop sliding at this depth.")
    width_pruning: Literal[T.WIDTH_MODES] | None = help_field(None, "Train only the best (or best and worst) "
                                                              "branches of each split.")
    width_pruning_ratio: float = help_field(0.5, "Fraction of branches width pruning keeps.")
    pruning_until: float = help_field(1.0, "Prune during this fraction of max_iterations (--pruning_step_ratio).")
    mix: dict[str, Any] | None = help_field(None, "BranchGRPO-Mix: a schedule spec such as {schedule: sliding, size: "
                                            "4, shift_interval: 25}; split steps stay SDE, others SDE in the window.")
    policy_loss: str = help_field("ppo_clip", "Registered policy loss (flowalign.losses.POLICY_LOSSES).")

    def check(self, cfg) -> None:
        s, t = cfg.sample, cfg.train
        if not 0 < self.width_pruning_ratio <= 1:
            raise option_error("width_pruning_ratio", f"must be in (0, 1], got {self.width_pruning_ratio}")
        if not self.split_noise_scale > 0:
            raise option_error("split_noise_scale", f"must be > 0, got {self.split_noise_scale}")
        if not 0 <= self.pruning_until <= 1:
            raise option_error("pruning_until", f"must be in [0, 1], got {self.pruning_until}")
        try:
            POLICY_LOSSES.get(self.policy_loss)
        except ValueError as e:
            raise ConfigError(f"{OPTIONS_KEY}.policy_loss: {e}") from None
        try:
            steps = T.check_branching(s.num_steps, tree_plan(cfg, self, 0).branch_steps, self.branching)
            T.sliding_depths(self.depth_pruning, 0, self.depth_pruning_slide_interval, self.depth_pruning_stop_depth)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"branch_grpo: {e} (sample.schedule={s.schedule!r}, sample.schedule_options="
                              f"{s.schedule_options}, {OPTIONS_KEY}={t.method_options})") from None
        if not steps:
            raise ConfigError("branch_grpo needs split steps: sample.schedule: branch with "
                              "sample.schedule_options.branch_steps, e.g. [0, 3, 6, 9]")
        leaves = self.branching ** len(steps)
        if s.group_size != leaves:
            raise ConfigError(f"sample.group_size={s.group_size} must equal the leaves per tree, {OPTIONS_KEY}."
                              f"branching ** len(branch_steps) = {self.branching} ** {len(steps)} = {leaves}")
        if s.batch_size % s.group_size:
            raise ConfigError(f"sample.batch_size={s.batch_size} must be a multiple of sample.group_size="
                              f"{s.group_size}: a sampling chunk holds whole trees")


@dataclass
class TreeStore:
    """This process's trees of the iteration, concatenated (node ids offset per chunk)."""

    latents: Tensor  # [M, ...]
    cond: Cond  # per local tree
    sigmas: Tensor
    edges: T.Transitions  # parent/child are store node ids, tree is the local tree index


@dataclass
class EdgeStep:
    """A micro-batch: store edges ``[e]`` (whole units: a parent with its kept children) at step ``step``."""

    edges: Tensor
    step: int


def tree_plan(cfg, opts: BranchOptions, iteration: int) -> StepPlan:
    """The iteration's plan: ``sample.schedule`` (branch points), with the Mix window if ``mix`` is set."""
    s = cfg.sample
    plan = make_plan(s.schedule, s.num_steps, iteration=iteration, **s.schedule_options)
    if opts.mix:
        mix = dict(opts.mix)
        window = make_plan(mix.pop("schedule", "sliding"), s.num_steps, iteration=iteration,
                           generator=generator(cfg.seed, "mix", iteration), **mix)
        plan = T.mix_plan(plan, window)
    return plan


@METHODS.register("branch_grpo")
class BranchGRPO(Method):
    """BranchGRPO; see the module docstring. BranchGRPO-Mix is ``method_options.mix``."""

    name = "branch_grpo"
    Options = BranchOptions

    def __init__(self, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, adapter, reward_fn, runtime)
        self.opts: BranchOptions = self.options(cfg)
        self.round = OnlineRound(cfg, adapter, reward_fn, self.runtime, chunks_what=(
            "tree chunks per round (sample.prompts_per_round / (sample.batch_size / sample.group_size))"))
        self.component = self.round
        self.policy_loss = POLICY_LOSSES.get(self.opts.policy_loss)
        self.train_guidance = cfg.sample.guidance if cfg.train.train_cfg else 1.0
        self.need_uncond = cfg.sample.guidance != 1.0 or self.train_guidance != 1.0
        self._tree_store: TreeStore | None = None

    @classmethod
    def check_config(cls, cfg) -> None:
        s, a = cfg.sample, cfg.train.advantage
        if a.estimator or a.per_reward or (a.std, a.baseline) != ("group", "mean"):
            raise ConfigError("branch_grpo computes depth-wise tree advantages (flowalign.tree); leave "
                              "train.advantage.estimator/std/baseline/per_reward at their defaults "
                              "(only train.advantage.drop_zero_std applies)")
        if not sde.is_stochastic(s.kernel, s.noise_level):
            raise ConfigError(f"branch_grpo needs a stochastic kernel: sample.kernel={s.kernel!r} with "
                              f"sample.noise_level={s.noise_level} cannot split")
        super().check_config(cfg)


    def _sampler(self, deal: Deal, plan: StepPlan) -> SampleFn:
        """The round's sampling function: one ``sample_tree`` call per chunk of whole trees."""
        s, o, prompts, G = self.cfg.sample, self.opts, self.round.prompts, self.cfg.sample.group_size
        neg = [s.negative_prompt] * (s.batch_size // G) if self.need_uncond else None

        def chunk(c: int, rows: Tensor, gen: torch.Generator) -> T.RolloutTree:
            tree_prompts = [prompts[int(p)] for p in deal.row_pid[rows][::G]]
            # encoded per chunk: a chunk's rows (and so its floats) do not depend on the process count
            cond = self.adapter.encode(tree_prompts, negative=neg)
            return T.sample_tree(self.adapter, tree_prompts, num_steps=s.num_steps, kernel=s.kernel,
                                 noise_level=s.noise_level, branching=o.branching,
                                 split_noise_scale=o.split_noise_scale, split_logprob=o.split_logprob, plan=plan,
                                 guidance=s.guidance, generator=gen, batch_size=s.batch_size,
                                 negative_prompt=s.negative_prompt, reduction=s.reduction, density=s.density,
                                 cond=cond)

        return chunk

    @torch.no_grad()
    def collect(self, state: TrainState) -> Collected:
        cfg, rt, o, it, G = self.cfg, self.runtime, self.opts, state.iteration, self.cfg.sample.group_size
        deal = self.round.deal(it)
        plan = tree_plan(cfg, o, it)
        sc = self.round.run(deal, self._sampler(deal, plan))
        trees, per_chunk = sc.rollouts, cfg.sample.batch_size // G
        tree0, n_trees = deal.row0 // G, deal.num_rows // G  # this process's first tree (global), tree count
        by_tree = sc.total.view(-1, G)
        zero = (by_tree.amax(1) - by_tree.amin(1)) <= 0
        drop = zero if cfg.train.advantage.drop_zero_std else torch.zeros_like(zero)

        # per-tree advantages and pruning (every tree of a process lives on that process)
        pruning = it < o.pruning_until * cfg.max_iterations
        depths = T.sliding_depths(o.depth_pruning, it, o.depth_pruning_slide_interval,
                                  o.depth_pruning_stop_depth) if pruning else []
        edges, offset, adv_all, sde_edges, nfe = [], 0, [], 0, 0
        for n, tr in enumerate(trees):
            node_r = T.fuse_rewards(tr, sc.local_total[n * per_chunk * G: (n + 1) * per_chunk * G], o.fusion,
                                    o.fusion_temperature)
            adv = T.depth_advantages(tr, node_r)
            keep = T.depth_prune(tr, depths)
            if pruning and o.width_pruning:
                keep &= T.width_prune(tr, adv, o.width_pruning, o.width_pruning_ratio)
            live = ~drop[tree0 + n * per_chunk + tr.tree]  # zero-std trees are not trained (dropped as units)
            sde_edges += len(T.transitions(tr, adv, live))
            e = T.transitions(tr, adv, keep)
            e.parent, e.child, e.tree = e.parent + offset, e.child + offset, e.tree + n * per_chunk
            edges.append(e)
            offset += tr.num_nodes
            adv_all.append(adv[tr.parent >= 0])
            nfe += tr.nfe
        cat = T.Transitions(*(torch.cat([getattr(e, f) for e in edges]) for f in T.Transitions.__dataclass_fields__))
        self._tree_store = TreeStore(latents=torch.cat([tr.latents for tr in trees]),
                                     cond=Cond.cat([tr.cond for tr in trees]), sigmas=trees[0].sigmas, edges=cat)
        batches, num_updates, units, trained = self._tree_batches(it, tree0, n_trees, drop)

        # metrics: global sums over processes
        vec = torch.tensor([float(nfe), float(trained), float(units), float(sde_edges),
                            float(offset)], dtype=torch.float64, device=rt.device)
        g = rt.gather(vec.view(1, -1)).view(-1, 5).sum(0).cpu()
        leaves = float(sc.total.numel())
        adv = rt.gather(torch.cat(adv_all).to(rt.device)).cpu()  # every tree has the same number of edges
        metrics = {**reward_metrics(sc, G), "adv_abs_mean": float(adv.abs().mean()),
                   "zero_std_frac": float(zero.float().mean()),
                   "nfe_per_leaf": float(g[0]) / leaves, "tree_size": float(g[4]) / len(by_tree),
                   "trained_edges_per_tree": float(g[1]) / len(by_tree),
                   "train_nfe_per_leaf": float(g[2]) / leaves,
                   "pruned_frac": 1.0 - float(g[1]) / max(float(g[3]), 1.0),
                   "sde_steps": int(plan.sde.sum()), "kept_frac": float((~drop).float().mean())}
        return Collected(batches=batches, num_updates=num_updates, metrics=metrics, timings=sc.timings(),
                         num_samples=int(sc.local_total.numel()), images=trees[0].images)

    def _tree_batches(self, it: int, tree0: int, n_trees: int, drop: Tensor) -> tuple[list[Batch], int, int, int]:
        """The store's edges sorted tree-major then by parent, cut into units (a parent + its kept children) per
        local tree and batched by ``online.unit_batches`` over the trees not dropped (known on every process from
        the gathered rewards). Returns the batches, the update count and this process's unit and edge counts."""
        e = self._tree_store.edges
        span = int(e.parent.max()) + 1 if len(e) else 1
        order = torch.argsort(e.tree * span + e.parent, stable=True)  # tree-major, then creation (step) order
        e = self._tree_store.edges = e.index(order)
        units = []
        for lt in range(n_trees):
            rows = torch.nonzero(e.tree == lt).flatten()
            parents, inverse = torch.unique_consecutive(e.parent[rows], return_inverse=True)
            units.append([rows[inverse == u] for u in range(len(parents))])
        return unit_batches(units, (~drop).nonzero().flatten(), tree0, self.cfg, it, self.runtime,
                            step_of=lambda x: int(e.step[x[0]]), payload=EdgeStep)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        st, t, s, rt = self._tree_store, self.cfg.train, self.cfg.sample, self.runtime
        e, j = st.edges.index(batch.data.edges), batch.data.step
        parents, inv = torch.unique(e.parent, return_inverse=True)  # siblings share the parent's forward
        tree_of = torch.zeros(int(parents.max()) + 1, dtype=torch.long)
        tree_of[e.parent] = e.tree
        x_par, cond = st.latents[parents], st.cond.index(tree_of[parents])
        sigma, sigma_next = st.sigmas[j], st.sigmas[j + 1]
        with rt.autocast():
            out = self.adapter.predict(x_par, sigma, cond, self.train_guidance)
        x, x_next = x_par[inv], st.latents[e.child]
        new = T.edge_log_prob(s.kernel, x, x_next, out[inv], sigma, sigma_next, s.noise_level, e.scale.to(x.device),
                              reduction=s.reduction, density=s.density)
        adv = e.advantage.to(new.log_prob.device).clamp(-t.adv_clip_max, t.adv_clip_max)
        per_row, metrics = self.policy_loss(new.log_prob, e.old_log_prob.to(new.log_prob.device), adv,
                                            clip_range=t.clip_range, clip_range_lt=t.clip_range_lt,
                                            clip_range_gt=t.clip_range_gt)
        metrics["policy_loss"] = per_row.detach().mean()
        if t.beta > 0:
            kl = reference_kl(self.adapter, rt, x_par, sigma, sigma_next, cond, self.train_guidance, new.mean,
                              new.std, s.kernel, s.noise_level, t.kl, s.reduction, expand=inv)
            per_row = per_row + t.beta * kl
            metrics["kl"] = kl.detach().mean()
        return per_row.sum() * batch.weight, metrics


