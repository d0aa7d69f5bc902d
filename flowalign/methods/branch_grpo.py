"""BranchGRPO (Li et al., arXiv 2509.06040): GRPO on tree rollouts with depth-wise advantages and pruning.

The sampling, reward fusion, advantages and pruning live in ``flowalign.tree``; this file only wires them into the
trainer's ``Method`` contract (and reuses Flow-GRPO's prompt sampler, background reward scoring, policy loss and
KL term). One iteration:

1. **Sample trees.** ``prompts_per_round`` trees (one per prompt), ``group_size = branching ** len(branch_steps)``
   leaves each. The trees are cut into chunks of ``sample.batch_size // group_size`` trees (``sample.batch_size``
   is then the most rows one denoiser forward sees); chunk ``c`` draws its noise from ``(seed, iteration, c)`` and
   process ``r`` samples its contiguous chunk range, as ``flow_grpo`` does with rows.
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

Options (``train.method_options``): ``branching`` (2), ``split_noise_scale`` (1.0; reference script 4.0),
``split_logprob`` (``drawn`` | ``unscaled_std``), ``fusion`` (``mean`` | ``prob_weighted``), ``fusion_temperature``
(1.0), ``depth_pruning`` (child depths to skip, e.g. ``[9, 10]``), ``depth_pruning_slide_interval`` /
``depth_pruning_stop_depth`` (slide the depths one shallower every N iterations), ``width_pruning`` (null |
``best`` | ``best_worst``), ``width_pruning_ratio`` (0.5), ``pruning_until`` (1.0), ``mix`` (BranchGRPO-Mix: a
schedule spec such as ``{schedule: sliding, size: 4, shift_interval: 25}``; split steps stay SDE, other steps are
SDE inside that window and ODE outside), ``policy_loss`` (``ppo_clip``). The split steps come from
``sample.schedule: branch`` with ``sample.schedule_options.branch_steps``.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import Tensor

from flowalign import sde
from flowalign import tree as T
from flowalign.config import ConfigError
from flowalign.losses import POLICY_LOSSES, gaussian_kl
from flowalign.methods.base import METHODS, Batch, Collected, TrainState, generator
from flowalign.methods.flow_grpo import FlowGRPO
from flowalign.schedules import StepPlan, make_plan

from flowalign.adapter import Cond

DEFAULTS = {"branching": 2, "split_noise_scale": 1.0, "split_logprob": "drawn", "fusion": "mean",
            "fusion_temperature": 1.0, "depth_pruning": [], "depth_pruning_slide_interval": None,
            "depth_pruning_stop_depth": None, "width_pruning": None, "width_pruning_ratio": 0.5,
            "pruning_until": 1.0, "mix": None, "policy_loss": "ppo_clip"}


@dataclass
class _TreeStore:
    """This process's trees of the iteration, concatenated (node ids offset per chunk)."""

    latents: Tensor  # [M, ...]
    cond: Cond  # per local tree
    sigmas: Tensor
    edges: T.Transitions  # parent/child are store node ids, tree is the local tree index


def options(cfg) -> dict:
    """``train.method_options`` merged over ``DEFAULTS``."""
    return {**DEFAULTS, **cfg.train.method_options}


def tree_plan(cfg, iteration: int) -> StepPlan:
    """The iteration's plan: ``sample.schedule`` (branch points), with the Mix window if ``mix`` is set."""
    s = cfg.sample
    plan = make_plan(s.schedule, s.num_steps, iteration=iteration, **s.schedule_options)
    mix = options(cfg)["mix"]
    if mix:
        mix = dict(mix)
        window = make_plan(mix.pop("schedule", "sliding"), s.num_steps, iteration=iteration,
                           generator=generator(cfg.seed, "mix", iteration), **mix)
        plan = T.mix_plan(plan, window)
    return plan


@METHODS.register("branch_grpo")
class BranchGRPO(FlowGRPO):
    """BranchGRPO; see the module docstring. BranchGRPO-Mix is ``method_options.mix``."""

    name = "branch_grpo"

    def __init__(self, cfg, adapter, reward_fn, runtime=None) -> None:
        super().__init__(cfg, adapter, reward_fn, runtime)
        self.opt = options(cfg)
        self._tree_store: _TreeStore | None = None

    # ------------------------------------------------------------------------------------------ checks
    @classmethod
    def check_config(cls, cfg) -> None:
        s, t = cfg.sample, cfg.train
        unknown = set(t.method_options) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"train.method_options: unknown key(s) {sorted(unknown)} for branch_grpo; "
                              f"allowed: {', '.join(sorted(DEFAULTS))}")
        o = options(cfg)
        p = "train.method_options"
        a = t.advantage
        if a.estimator or a.per_reward or (a.std, a.baseline) != ("group", "mean"):
            raise ConfigError("branch_grpo computes depth-wise tree advantages (flowalign.tree); leave "
                              "train.advantage.estimator/std/baseline/per_reward at their defaults "
                              "(only train.advantage.drop_zero_std applies)")
        if not sde.is_stochastic(s.kernel, s.noise_level):
            raise ConfigError(f"branch_grpo needs a stochastic kernel: sample.kernel={s.kernel!r} with "
                              f"sample.noise_level={s.noise_level} cannot split")
        for key, allowed in (("split_logprob", T.SPLIT_LOGPROBS), ("fusion", T.FUSIONS)):
            if o[key] not in allowed:
                raise ConfigError(f"{p}.{key}={o[key]!r} is not allowed. Allowed: {', '.join(allowed)}")
        if o["width_pruning"] is not None and o["width_pruning"] not in T.WIDTH_MODES:
            raise ConfigError(f"{p}.width_pruning={o['width_pruning']!r} is not allowed. Allowed: null, "
                              f"{', '.join(T.WIDTH_MODES)}")
        if not 0 < float(o["width_pruning_ratio"]) <= 1:
            raise ConfigError(f"{p}.width_pruning_ratio must be in (0, 1], got {o['width_pruning_ratio']}")
        if not float(o["split_noise_scale"]) > 0:
            raise ConfigError(f"{p}.split_noise_scale must be > 0, got {o['split_noise_scale']}")
        if not 0 <= float(o["pruning_until"]) <= 1:
            raise ConfigError(f"{p}.pruning_until must be in [0, 1], got {o['pruning_until']}")
        try:
            POLICY_LOSSES.get(o["policy_loss"])
        except ValueError as e:
            raise ConfigError(f"{p}.policy_loss: {e}") from None
        try:
            plan = tree_plan(cfg, 0)
            steps = T.check_branching(s.num_steps, plan.branch_steps, o["branching"])
            T.sliding_depths(o["depth_pruning"], 0, o["depth_pruning_slide_interval"],
                             o["depth_pruning_stop_depth"])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"branch_grpo: {e} (sample.schedule={s.schedule!r}, sample.schedule_options="
                              f"{s.schedule_options}, {p}={t.method_options})") from None
        if not steps:
            raise ConfigError("branch_grpo needs split steps: sample.schedule: branch with "
                              "sample.schedule_options.branch_steps, e.g. [0, 3, 6, 9]")
        leaves = o["branching"] ** len(steps)
        if s.group_size != leaves:
            raise ConfigError(f"sample.group_size={s.group_size} must equal the leaves per tree, "
                              f"{p}.branching ** len(branch_steps) = {o['branching']} ** {len(steps)} = {leaves}")
        if s.batch_size % s.group_size:
            raise ConfigError(f"sample.batch_size={s.batch_size} must be a multiple of sample.group_size="
                              f"{s.group_size}: a sampling chunk holds whole trees")

    def num_chunks(self) -> int:
        s = self.cfg.sample
        return s.prompts_per_round // (s.batch_size // s.group_size)

    def check_world(self, world_size: int) -> None:
        if self.num_chunks() % world_size:
            raise ValueError(f"{self.num_chunks()} tree chunks per round (sample.prompts_per_round / (sample."
                             f"batch_size / sample.group_size)) cannot be split evenly over {world_size} processes")

    # ------------------------------------------------------------------------------------------ collect
    @torch.no_grad()
    def collect(self, state: TrainState) -> Collected:
        cfg, s, rt, o = self.cfg, self.cfg.sample, self.runtime, self.opt
        it, G = state.iteration, s.group_size
        t_start = time.perf_counter()
        prompt_ids = self.sampler.next(s.prompts_per_round)
        plan = tree_plan(cfg, it)
        per_chunk = s.batch_size // G
        self.check_world(rt.world_size)
        n_mine = self.num_chunks() // rt.world_size
        my_chunks = range(rt.rank * n_mine, (rt.rank + 1) * n_mine)
        tree0 = my_chunks.start * per_chunk  # global index of this process's first tree
        my_pids = prompt_ids[tree0: tree0 + n_mine * per_chunk].tolist()
        neg = [s.negative_prompt] * per_chunk if self.need_uncond else None

        trees, futures, t_sample = [], [], 0.0
        for n, c in enumerate(my_chunks):
            rows = slice(n * per_chunk, (n + 1) * per_chunk)
            pids = my_pids[rows]
            t0 = time.perf_counter()
            with rt.autocast():
                # encoded per chunk: a chunk's rows (and so its floats) do not depend on the process count
                cond = self.adapter.encode([self.prompts[p] for p in pids], negative=neg)
                tr = T.sample_tree(self.adapter, [self.prompts[p] for p in pids], num_steps=s.num_steps,
                                   kernel=s.kernel, noise_level=s.noise_level, branching=o["branching"],
                                   split_noise_scale=float(o["split_noise_scale"]),
                                   split_logprob=o["split_logprob"], plan=plan, guidance=s.guidance,
                                   generator=generator(cfg.seed, "sample", it, c, device=rt.device),
                                   batch_size=s.batch_size, negative_prompt=s.negative_prompt,
                                   reduction=s.reduction, density=s.density, cond=cond)
            t_sample += time.perf_counter() - t0
            images = tr.images.float().clamp(0, 1)
            leaf_pids = [p for p in pids for _ in range(G)]
            args = (images, [self.prompts[p] for p in leaf_pids], [dict(self.metadata[p]) for p in leaf_pids])
            if self.executor is not None:
                futures.append(self.executor.submit(self._score, *args))
            else:
                done: Future = Future()
                done.set_result(self._score(*args))
                futures.append(done)
            tr.images = images if not trees else None
            trees.append(tr)

        t0 = time.perf_counter()
        results = [f.result() for f in futures]
        t_wait = time.perf_counter() - t0
        names = list(results[0][1])
        local_total = torch.cat([r[0] for r in results])
        local_parts = torch.stack([torch.cat([r[1][k] for r in results]) for k in names], 1)
        total = rt.gather(local_total.to(rt.device)).cpu()  # [P * G], tree-major in global prompt order
        parts = rt.gather(local_parts.to(rt.device)).cpu()
        by_tree = total.view(-1, G)
        zero = (by_tree.amax(1) - by_tree.amin(1)) <= 0
        drop = zero if cfg.train.advantage.drop_zero_std else torch.zeros_like(zero)

        # per-tree advantages and pruning (every tree of a process lives on that process)
        pruning = it < float(o["pruning_until"]) * cfg.max_iterations
        depths = T.sliding_depths(o["depth_pruning"], it, o["depth_pruning_slide_interval"],
                                  o["depth_pruning_stop_depth"]) if pruning else []
        edges, offset, adv_all, sde_edges, nfe = [], 0, [], 0, 0
        for n, tr in enumerate(trees):
            r = local_total[n * per_chunk * G: (n + 1) * per_chunk * G]
            node_r = T.fuse_rewards(tr, r, o["fusion"], float(o["fusion_temperature"]))
            adv = T.depth_advantages(tr, node_r)
            keep = T.depth_prune(tr, depths)
            if pruning and o["width_pruning"]:
                keep &= T.width_prune(tr, adv, o["width_pruning"], float(o["width_pruning_ratio"]))
            live = ~drop[tree0 + n * per_chunk + tr.tree]  # zero-std trees are not trained (dropped as units)
            sde_edges += len(T.transitions(tr, adv, live))
            e = T.transitions(tr, adv, keep)
            e.parent, e.child, e.tree = e.parent + offset, e.child + offset, e.tree + n * per_chunk
            edges.append(e)
            offset += tr.num_nodes
            adv_all.append(adv[tr.parent >= 0])
            nfe += tr.nfe
        cat = T.Transitions(*(torch.cat([getattr(e, f) for e in edges]) for f in T.Transitions.__dataclass_fields__))
        self._tree_store = _TreeStore(latents=torch.cat([tr.latents for tr in trees]),
                                      cond=Cond.cat([tr.cond for tr in trees]),
                                      sigmas=trees[0].sigmas, edges=cat)
        batches, num_updates, units, trained = self._tree_batches(it, tree0, n_mine * per_chunk, drop)

        # metrics: global sums over processes
        vec = torch.tensor([float(nfe), float(trained), float(units), float(sde_edges),
                            float(offset)], dtype=torch.float64, device=rt.device)
        g = rt.gather(vec.view(1, -1)).view(-1, 5).sum(0).cpu()
        leaves = float(total.numel())
        adv = rt.gather(torch.cat(adv_all).to(rt.device)).cpu()  # every tree has the same number of edges
        metrics = {"reward_mean": float(total.mean()), "reward_std": float(total.std()) if len(total) > 1 else 0.0,
                   "adv_abs_mean": float(adv.abs().mean()), "zero_std_frac": float(zero.float().mean()),
                   "group_reward_std_mean": float(by_tree.std(1).mean()) if G > 1 else 0.0,
                   "nfe_per_leaf": float(g[0]) / leaves, "tree_size": float(g[4]) / len(by_tree),
                   "trained_edges_per_tree": float(g[1]) / len(by_tree),
                   "train_nfe_per_leaf": float(g[2]) / leaves,
                   "pruned_frac": 1.0 - float(g[1]) / max(float(g[3]), 1.0),
                   "sde_steps": int(plan.sde.sum()), "kept_frac": float((~drop).float().mean())}
        for j, k in enumerate(names):
            metrics[f"reward_{k}_mean"] = float(parts[:, j].mean())
        timings = {"sample": t_sample, "reward": sum(r[2] for r in results), "reward_wait": t_wait,
                   "collect": time.perf_counter() - t_start}
        return Collected(batches=batches, num_updates=num_updates, metrics=metrics, timings=timings,
                         num_samples=int(local_total.numel()), images=trees[0].images)

    def _tree_batches(self, it: int, tree0: int, n_trees: int, drop: Tensor) -> tuple[list[Batch], int, int, int]:
        """Units (a parent + its kept children) shuffled with a shared seed over all processes' trees, split into
        updates; returns this process's micro-batches, the update count and this process's unit and edge counts.

        Unit ``j`` of tree ``t`` has the same step and edge count in every tree (pruning keeps structural counts),
        so ``(t, j)`` names the same work on every process; the per-update edge totals are still summed over
        processes rather than assumed.
        """
        t, rt = self.cfg.train, self.runtime
        e = self._tree_store.edges
        span = int(e.parent.max()) + 1 if len(e) else 1
        order = torch.argsort(e.tree * span + e.parent, stable=True)  # tree-major, then creation (step) order
        e = self._tree_store.edges = e.index(order)
        units_of_tree = []
        for lt in range(n_trees):
            rows = torch.nonzero(e.tree == lt).flatten()
            parents, inverse = torch.unique_consecutive(e.parent[rows], return_inverse=True)
            units_of_tree.append([rows[inverse == u] for u in range(len(parents))])
        counts = {len(u) for u in units_of_tree}
        if len(counts) > 1:  # pragma: no cover - pruning keeps counts structural
            raise RuntimeError(f"trees have different numbers of training units: {sorted(counts)}")
        upt = counts.pop()
        kept = (~drop).nonzero().flatten()  # zero-std trees (known on every process from the gathered rewards)
        total_units = len(kept) * upt
        if total_units == 0:
            return [], 0, 0, 0
        U = min(t.updates_per_iteration, total_units)
        ids = (kept.view(-1, 1) * upt + torch.arange(upt).view(1, -1)).flatten()  # global unit ids
        mbs = self.cfg.train_batch_size
        batches, mine_total, mine_edges = [], 0, 0
        for ep in range(t.num_inner_epochs):
            perm = ids[torch.randperm(len(ids), generator=generator(self.cfg.seed, "shuffle", it, ep))] \
                if t.shuffle else ids
            parts = torch.tensor_split(perm, U)
            local_edges = torch.zeros(U, dtype=torch.float64)
            mine_parts = []
            for u, part in enumerate(parts):
                gt, j = part // upt, part % upt
                mine = (gt >= tree0) & (gt < tree0 + n_trees)
                units = [units_of_tree[int(a) - tree0][int(b)] for a, b in zip(gt[mine], j[mine])]
                local_edges[u] = sum(len(x) for x in units)
                mine_parts.append(units)
                if ep == 0:
                    mine_total += len(units)
                    mine_edges += int(local_edges[u])
            glob = rt.gather(local_edges.to(rt.device).view(1, -1)).view(-1, U).sum(0).cpu()
            for u, units in enumerate(mine_parts):
                by_step: dict[int, list[Tensor]] = {}
                for x in units:
                    by_step.setdefault(int(e.step[x[0]]), []).append(x)
                for j in sorted(by_step):
                    cur, n = [], 0
                    for x in by_step[j] + [None]:
                        if x is None or (cur and n + len(x) > mbs):
                            batches.append(Batch({"edges": torch.cat(cur), "step": j,
                                                  "weight": 1.0 / float(glob[u])}, update=ep * U + u))
                            cur, n = [], 0
                        if x is not None:
                            cur.append(x)
                            n += len(x)
        return batches, t.num_inner_epochs * U, mine_total, mine_edges

    # ------------------------------------------------------------------------------------------ loss
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        st, t, s, rt = self._tree_store, self.cfg.train, self.cfg.sample, self.runtime
        e = st.edges.index(batch.data["edges"])
        j = batch.data["step"]
        parents, inv = torch.unique(e.parent, return_inverse=True)  # siblings share the parent's forward
        tree_of = torch.zeros(int(parents.max()) + 1, dtype=torch.long)
        tree_of[e.parent] = e.tree
        x_par = st.latents[parents]
        cond = st.cond.index(tree_of[parents])
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
            with torch.no_grad(), rt.reference(), rt.autocast():
                out_ref = self.adapter.predict(x_par, sigma, cond, self.train_guidance)
            mean_ref, _ = sde.mean_std(s.kernel, x_par, out_ref, sigma, sigma_next, s.noise_level)
            kl = gaussian_kl(new.mean, mean_ref[inv], new.std, sigma_next - sigma, form=t.kl, reduction=s.reduction)
            per_row = per_row + t.beta * kl
            metrics["kl"] = kl.detach().mean()
        return per_row.sum() * batch.data["weight"], metrics
