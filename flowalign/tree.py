"""Tree rollouts (BranchGRPO, arXiv 2509.06040): shared prefixes, splits, reward fusion, depth-wise advantages.

``sample_tree`` grows one tree per prompt from one initial noise. At every step the whole frontier (all nodes of
that step, over all trees) is denoised in one batched forward (micro-batched by ``batch_size``); at a *split step*
every frontier node gets ``branching`` children with independent noise, elsewhere one child. ``branching ** len(
branch_steps)`` leaves per tree share their prefixes, so a tree needs far fewer denoiser rows than as many flat
chains (the reference code evaluates nodes one at a time, batch 1; we batch the frontier).

Noise draws use the caller's generator in the flat sampler's order: ``init_noise(P)`` then, at each stochastic
step, one ``randn`` for all children of the step (node-major: node 0's children, then node 1's, ...). With no
splits the tree is therefore bit for bit ``flowalign.rollout.sample(prompts, group_size=1)``.

**Split noise and its density.** ``split_noise_scale = s`` draws split children from ``N(mean, (s std)^2)``.
``split_logprob="drawn"`` (default) stores that density, so the stored log-prob is the one of the distribution the
child was actually drawn from and PPO's ratio is a real importance ratio. ``"unscaled_std"`` reproduces the
reference code (BranchGRPO ``flux_step_with_split``: draw with ``s std``, score under ``N(mean, std^2)``); its
on-policy ratio is still 1 (training rescores with the same formula) but the "log-prob" is not that of the sampling
distribution. Each node records the std multiplier its edge is scored with (``edge_scale``), so
``edge_log_prob`` recomputes exactly what was stored.

**Advantages** (BranchGRPO ``compute_node_rewards_from_leaves`` / ``compute_hierarchical_advantages_by_depth``):
leaves carry rewards; ``fuse_rewards`` gives every inner node the mean of its leaf descendants (or, with
``mode="prob_weighted"``, ``sum_c softmax_c(T * logp_c) R_c`` over its children, bottom-up);
``depth_advantages`` normalises node rewards across the nodes of one depth *within one tree*:
``A = (R - mean_d) / (std_d + 1e-8)`` with the Bessel std, and 0 when a depth has one node or ``std_d < 1e-6``.
Depth = transitions from the root, so every step is a depth (as in the reference code).

**Training transitions.** Every edge ``parent -> child`` is one transition ``(x, x_next, sigma, sigma_next,
old log-prob, advantage of the child, kernel and std scale used)``. ``depth_prune`` drops edges whose child depth is
listed (BranchGRPO ``--depth_pruning``); ``width_prune`` keeps, in each tree, only the highest-advantage (or the
highest- and lowest-) branches created by the last split for the edges after it (``--width_pruning_mode 1/2``,
made per tree and per branch -- see ``width_prune``). ODE edges (BranchGRPO-Mix) are never trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from flowalign import sde
from flowalign.registry import check_choice
from flowalign.schedules import StepPlan, make_plan

from flowalign.adapter import Adapter, Cond, deterministic_kernel

SPLIT_LOGPROBS = ("drawn", "unscaled_std")
FUSIONS = ("mean", "prob_weighted")
WIDTH_MODES = ("best", "best_worst")


@dataclass
class RolloutTree:
    """All nodes of the trees of one ``sample_tree`` call, in creation order (roots first, then step by step).

    Node ``n``'s state is ``latents[n]`` at noise level ``sigmas[step[n]]``; ``log_probs[n]`` is the log-density of
    the edge ``parent[n] -> n`` under the density the child was drawn from (see module docstring), 0 for roots and
    ODE edges. ``leaves`` lists leaf node ids tree-major (tree 0's leaves in branch order, then tree 1's, ...), so
    ``leaf_rewards.view(num_trees, leaves_per_tree)`` groups them by prompt.
    """

    latents: Tensor  # [M, *latent]
    parent: Tensor  # long [M], -1 for roots
    step: Tensor  # long [M], index into sigmas of the node's state
    tree: Tensor  # long [M], which prompt's tree
    log_probs: Tensor  # float32 [M]
    edge_sde: Tensor  # bool [M]: the edge into the node was stochastic
    edge_split: Tensor  # bool [M]: the edge into the node was drawn at a split step
    edge_scale: Tensor  # float32 [M]: std multiplier the edge's log-prob is scored with
    leaves: Tensor  # long [L]
    sigmas: Tensor  # [N+1]
    train_steps: Tensor  # bool [N]: steps whose (stochastic) edges may be trained
    prompts: list[str]
    branch_steps: list[int]
    branching: int
    cond: Cond | None = None  # per tree [P, ...]
    images: Tensor | None = None  # per leaf [L, C, H, W] (video [L, T, C, H, W])
    kernel: str = "flow_sde"
    noise_level: float = 0.7
    guidance: float = 1.0
    reduction: str = "mean"
    density: str = "gaussian"
    split_noise_scale: float = 1.0
    split_logprob: str = "drawn"
    nfe: int = 0  # denoiser rows evaluated while sampling (a CFG forward counts once)
    nfe_calls: int = 0  # denoiser calls (batched forwards)
    extras: dict = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return int(self.parent.numel())

    @property
    def num_trees(self) -> int:
        return len(self.prompts)

    @property
    def num_leaves(self) -> int:
        return int(self.leaves.numel())

    @property
    def leaves_per_tree(self) -> int:
        return self.num_leaves // self.num_trees

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.numel()) - 1

    @property
    def depth(self) -> Tensor:
        """Transitions from the root (``step - root step``; equals ``step`` for trees rooted at step 0)."""
        root_step = self.step[self.parent < 0]
        return self.step - root_step[self.tree]

    @property
    def is_leaf(self) -> Tensor:
        mask = torch.zeros(self.num_nodes, dtype=torch.bool)
        mask[self.leaves] = True
        return mask

    def children(self, node: int) -> list[int]:
        return torch.nonzero(self.parent == node).flatten().tolist()

    def path(self, leaf: int) -> list[int]:
        """Node ids from the root to ``leaf``."""
        out = [int(leaf)]
        while int(self.parent[out[-1]]) >= 0:
            out.append(int(self.parent[out[-1]]))
        return out[::-1]

    def kernel_of(self, node: int, prediction_type: str = "flow") -> tuple[str, float]:
        """The (kernel, noise_level) of the edge into ``node``."""
        if bool(self.edge_sde[node]):
            return self.kernel, self.noise_level
        return deterministic_kernel(prediction_type)


def _chunks(n: int, batch_size: int | None) -> list[slice]:
    bs = batch_size or n
    return [slice(i, min(i + bs, n)) for i in range(0, n, bs)]


def check_branching(num_steps: int, branch_steps: Sequence[int], branching: int) -> list[int]:
    """Sorted unique split steps, validated against ``num_steps``; ``branching`` must be an int >= 1."""
    if not isinstance(branching, int) or isinstance(branching, bool) or branching < 1:
        raise ValueError(f"branching must be an integer >= 1 (children per node at a split), got {branching!r}")
    steps = sorted({int(s) for s in branch_steps})
    if any(s < 0 or s >= num_steps for s in steps):
        raise ValueError(f"branch_steps {steps} must lie in [0, num_steps={num_steps})")
    return steps


def mix_plan(branch_plan: StepPlan, window: StepPlan | None = None) -> StepPlan:
    """BranchGRPO-Mix: split steps stay SDE; other steps are SDE only inside ``window`` (ODE elsewhere).

    The reference (``--mix_ode_sde_tree``) uses a window ``[(i // stride) stride, + size)`` of the *denoising*
    index, which with its stride of 30 > 20 steps is the fixed first ``size`` steps; pass
    ``make_plan("window"|"sliding"|"fraction", ...)`` to choose (``sliding`` advances with the iteration as MixGRPO).
    Every SDE step is trained. ``window=None`` returns ``branch_plan`` unchanged.
    """
    if window is None:
        return branch_plan
    if window.num_steps != branch_plan.num_steps:
        raise ValueError(f"window plan has {window.num_steps} steps, branch plan {branch_plan.num_steps}")
    sde_mask = window.sde.clone()
    sde_mask[list(branch_plan.branch_steps)] = True
    return StepPlan(sde=sde_mask, train=sde_mask.clone(), branch_steps=list(branch_plan.branch_steps))


@torch.no_grad()
def sample_tree(adapter: Adapter, prompts: Sequence[str], num_steps: int = 10, kernel: str = "flow_sde",
                noise_level: float = 0.7, branch_steps: Sequence[int] | None = None, branching: int = 2,
                split_noise_scale: float = 1.0, split_logprob: str = "drawn", plan: StepPlan | None = None,
                guidance: float = 1.0, generator: torch.Generator | None = None, batch_size: int | None = None,
                negative_prompt: str = "", reduction: str = "mean", density: str = "gaussian", decode: bool = True,
                cond: Cond | None = None) -> RolloutTree:
    """Grow one tree per prompt (module docstring) and record every edge's log-prob.

    ``plan`` says which steps are stochastic (default: all, every step trainable, as the ``branch`` schedule);
    ``branch_steps`` defaults to ``plan.branch_steps``. A split step must be stochastic. ``batch_size`` caps the
    rows of one denoiser forward (``None``: the whole frontier at once). ``cond`` may carry pre-computed per-prompt
    conditioning (one row per prompt).
    """
    prompts = Adapter.check_prompts(prompts)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    sde.validate(kernel, noise_level, reduction, density)
    check_choice("split_logprob", split_logprob, SPLIT_LOGPROBS)
    if not (isinstance(split_noise_scale, (int, float)) and split_noise_scale > 0):
        raise ValueError(f"split_noise_scale must be a number > 0, got {split_noise_scale!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    if branch_steps is None:
        branch_steps = plan.branch_steps if plan is not None else []
    steps = check_branching(num_steps, branch_steps, branching)
    splits = set(steps) if branching > 1 else set()  # branching 1: a flat chain per prompt
    plan = plan or make_plan("branch", num_steps, branch_steps=sorted(splits))
    if plan.num_steps != num_steps:
        raise ValueError(f"plan has {plan.num_steps} steps but num_steps={num_steps}")
    stochastic = sde.is_stochastic(kernel, noise_level)
    bad = [s for s in sorted(splits) if not (stochastic and bool(plan.sde[s]))]
    if bad:
        raise ValueError(f"split steps {bad} are deterministic (kernel={kernel!r}, noise_level={noise_level}, "
                         f"plan.sde): their children would be identical; make them SDE steps")

    P = len(prompts)
    prompt_cond = cond if cond is not None else adapter.encode(prompts, negative=[negative_prompt] * P
                                                               if guidance != 1.0 else None)
    if prompt_cond.batch_size != P:
        raise ValueError(f"cond has batch {prompt_cond.batch_size} but there are {P} prompts")
    sigmas = adapter.sigmas(num_steps).float().cpu()
    det = deterministic_kernel(adapter.prediction_type)

    x = adapter.init_noise(P, generator)
    front = torch.arange(P)  # node ids of the frontier
    front_tree = torch.arange(P)
    latents, parent, step, tree_ = [x], [torch.full((P,), -1)], [torch.zeros(P, dtype=torch.long)], [front_tree]
    lps, e_sde, e_split, e_scale = ([torch.zeros(P)], [torch.zeros(P, dtype=torch.bool)],
                                    [torch.zeros(P, dtype=torch.bool)], [torch.ones(P)])
    n_nodes, nfe, calls = P, 0, 0
    for i in range(num_steps):
        is_sde = bool(plan.sde[i]) and stochastic
        split = i in splits
        k = branching if split else 1
        kern, lvl = (kernel, noise_level) if is_sde else det
        F = len(front)
        noise = (torch.randn((F * k, *x.shape[1:]), generator=generator, device=x.device, dtype=torch.float32)
                 if is_sde else None)
        cond_f = prompt_cond.index(front_tree)
        nxt = torch.empty((F * k, *x.shape[1:]), dtype=x.dtype, device=x.device)
        lp = torch.zeros(F * k, dtype=torch.float32, device=x.device)
        scale = split_noise_scale if split else 1.0
        for sl in _chunks(F, batch_size):
            out = adapter.predict(x[sl], sigmas[i], cond_f.index(sl), guidance)
            nfe, calls = nfe + (sl.stop - sl.start), calls + 1
            if not split:  # exactly the flat sampler's step
                st = sde.step(kern, x[sl], out, sigmas[i], sigmas[i + 1], lvl,
                              noise=noise[sl] if noise is not None else torch.zeros_like(x[sl], dtype=torch.float32),
                              reduction=reduction, density=density)
                nxt[sl], lp[sl] = st.x_next, st.log_prob if is_sde else 0.0
                continue
            mean, std = sde.mean_std(kern, x[sl], out, sigmas[i], sigmas[i + 1], lvl)
            mean, std = mean.repeat_interleave(k, 0), std.repeat_interleave(k, 0)
            rows = slice(sl.start * k, sl.stop * k)
            x_next = (mean + (scale * std) * noise[rows]).to(x.dtype)
            score_std = scale * std if split_logprob == "drawn" else std
            nxt[rows] = x_next
            lp[rows] = sde.gaussian_log_prob(x_next, mean, score_std, reduction, density)
        ids = torch.arange(n_nodes, n_nodes + F * k)
        n_nodes += F * k
        latents.append(nxt)
        parent.append(front.repeat_interleave(k))
        step.append(torch.full((F * k,), i + 1, dtype=torch.long))
        front_tree = front_tree.repeat_interleave(k)
        tree_.append(front_tree)
        lps.append(lp.cpu())
        e_sde.append(torch.full((F * k,), is_sde))
        e_split.append(torch.full((F * k,), split))
        e_scale.append(torch.full((F * k,), scale if split and split_logprob == "drawn" else 1.0))
        x, front = nxt, ids

    images = None
    if decode:
        images = torch.cat([adapter.decode(x[sl]) for sl in _chunks(len(front), batch_size)])
    return RolloutTree(
        latents=torch.cat(latents), parent=torch.cat(parent), step=torch.cat(step), tree=torch.cat(tree_),
        log_probs=torch.cat(lps).float(), edge_sde=torch.cat(e_sde), edge_split=torch.cat(e_split),
        edge_scale=torch.cat(e_scale).float(), leaves=front, sigmas=sigmas,
        train_steps=plan.train & plan.sde, prompts=prompts, branch_steps=sorted(splits), branching=branching,
        cond=prompt_cond, images=images, kernel=kernel, noise_level=float(noise_level), guidance=float(guidance),
        reduction=reduction, density=density, split_noise_scale=float(split_noise_scale),
        split_logprob=split_logprob, nfe=nfe, nfe_calls=calls,
    )


# --------------------------------------------------------------------------------------------- rewards/advantages
def fuse_rewards(tree: RolloutTree, leaf_rewards: Tensor, mode: str = "mean", temperature: float = 1.0) -> Tensor:
    """Node rewards ``[M]`` from leaf rewards ``[L]`` (in ``tree.leaves`` order), bottom-up.

    ``mean``: each node gets the mean reward of its leaf descendants (BranchGRPO default).
    ``prob_weighted``: ``R(n) = sum_c softmax_c(temperature * logp(n -> c)) R(c)`` over the children of ``n`` (a
    single child passes its reward up), BranchGRPO ``--tree_prob_weighted`` (temperature 1 there).
    """
    check_choice("mode", mode, FUSIONS)
    r = torch.as_tensor(leaf_rewards, dtype=torch.float32).flatten().cpu()
    if r.numel() != tree.num_leaves:
        raise ValueError(f"leaf_rewards has {r.numel()} entries but the tree has {tree.num_leaves} leaves")
    if not torch.isfinite(r).all():
        raise ValueError("leaf_rewards contain NaN/inf; map failed scores to a number before fusing")
    M = tree.num_nodes
    total, count = torch.zeros(M, dtype=torch.float64), torch.zeros(M, dtype=torch.float64)
    total[tree.leaves], count[tree.leaves] = r.double(), 1.0
    if mode == "mean":
        # children are created after their parents, so one reverse sweep accumulates whole subtrees
        for n in range(M - 1, -1, -1):
            p = int(tree.parent[n])
            if p >= 0:
                total[p] += total[n]
                count[p] += count[n]
        return (total / count).float()
    node_r = torch.zeros(M, dtype=torch.float64)
    node_r[tree.leaves] = r.double()
    done = tree.is_leaf.clone()
    for p in sorted(set(tree.parent[tree.parent >= 0].tolist()), reverse=True):  # parents after their children
        kids = torch.nonzero(tree.parent == p).flatten()
        if not bool(done[kids].all()):  # pragma: no cover - creation order guarantees this
            raise RuntimeError("tree nodes are not in creation order")
        w = torch.softmax(temperature * tree.log_probs[kids].double(), 0)
        node_r[p] = (w * node_r[kids]).sum()
        done[p] = True
    return node_r.float()


def depth_advantages(tree: RolloutTree, node_rewards: Tensor, eps: float = 1e-8, min_std: float = 1e-6) -> Tensor:
    """``A = (R - mean) / (std + eps)`` over the nodes of one depth of one tree (Bessel std); 0 for a depth with
    one node or ``std < min_std`` (BranchGRPO ``compute_hierarchical_advantages_by_depth``)."""
    r = torch.as_tensor(node_rewards, dtype=torch.float32).flatten().cpu()
    if r.numel() != tree.num_nodes:
        raise ValueError(f"node_rewards has {r.numel()} entries but the tree has {tree.num_nodes} nodes")
    adv = torch.zeros_like(r)
    depth = tree.depth
    key = tree.tree * (int(depth.max()) + 1) + depth
    for k in torch.unique(key):
        idx = torch.nonzero(key == k).flatten()
        if len(idx) <= 1:
            continue
        g = r[idx]
        std = g.std()
        if std < min_std:
            continue
        adv[idx] = (g - g.mean()) / (std + eps)
    return adv


# --------------------------------------------------------------------------------------------- pruning
def sliding_depths(depths: Sequence[int], iteration: int = 0, interval: int | None = None,
                   stop_depth: int | None = None) -> list[int]:
    """Depth-pruning window that slides one depth shallower every ``interval`` iterations, never above
    ``stop_depth`` (BranchGRPO ``--depth_pruning_slide``); ``interval=None`` keeps ``depths`` fixed."""
    base = sorted(int(d) for d in depths)
    if not base or interval is None:
        return base
    if interval < 1:
        raise ValueError(f"depth pruning slide interval must be >= 1, got {interval}")
    stop = 0 if stop_depth is None else int(stop_depth)
    shift = min(iteration // interval, max(0, base[0] - stop))
    return [d - shift for d in base]


def depth_prune(tree: RolloutTree, depths: Sequence[int]) -> Tensor:
    """Keep-mask over edges (indexed by child node): False where the child's depth is in ``depths``."""
    keep = torch.ones(tree.num_nodes, dtype=torch.bool)
    if len(depths):
        keep &= ~torch.isin(tree.depth, torch.as_tensor(list(depths), dtype=torch.long))
    return keep


def width_prune(tree: RolloutTree, advantages: Tensor, mode: str = "best", ratio: float = 0.5) -> Tensor:
    """Keep-mask over edges (by child node) after the last split: per tree, only edges below the kept branches.

    The branches are the nodes created by the last split (each heads one chain down to a leaf). ``best`` keeps the
    ``max(1, int(n ratio))`` branches with the highest advantage; ``best_worst`` keeps ``max(2, int(n ratio))``,
    half the highest and half the lowest. The split edges themselves and everything above stay (as in the
    reference). Deviation: the reference ranks individual edges, per branch (mode 1, where every edge of a chain has
    the same advantage, so it keeps the first steps of each chain) or over the whole per-GPU batch (mode 2); we rank
    branches within each tree, so the kept count is the same for every tree and independent of the process count.
    """
    check_choice("mode", mode, WIDTH_MODES)
    if not 0 < ratio <= 1:
        raise ValueError(f"width pruning ratio must be in (0, 1], got {ratio}")
    keep = torch.ones(tree.num_nodes, dtype=torch.bool)
    if not tree.branch_steps:
        return keep
    adv = torch.as_tensor(advantages, dtype=torch.float32).flatten().cpu()
    last = max(tree.branch_steps)
    heads = torch.nonzero(tree.edge_split & (tree.step == last + 1)).flatten()
    # the branch each node below the last split belongs to: walk each chain down from its head
    branch_of = torch.full((tree.num_nodes,), -1, dtype=torch.long)
    branch_of[heads] = heads
    for n in range(tree.num_nodes):
        p = int(tree.parent[n])
        if p >= 0 and int(branch_of[p]) >= 0 and int(tree.step[n]) > last + 1:
            branch_of[n] = branch_of[p]
    for t in range(tree.num_trees):
        h = heads[tree.tree[heads] == t]
        n = len(h)
        order = h[torch.argsort(adv[h], descending=True, stable=True)]
        if mode == "best":
            kept = order[: max(1, int(n * ratio))]
        else:
            m = min(n, max(2, int(n * ratio)))
            kept = torch.cat([order[: m // 2], order[n - (m - m // 2):]])
        below = (tree.tree == t) & (branch_of >= 0) & (tree.step > last + 1)
        keep[below & ~torch.isin(branch_of, kept)] = False
    return keep


# --------------------------------------------------------------------------------------------- transitions
@dataclass
class Transitions:
    """Trainable edges of a tree: child node ids and what a method needs to rescore them.

    ``x = tree.latents[parent]``, ``x_next = tree.latents[child]``, ``sigma = tree.sigmas[step]``,
    ``sigma_next = tree.sigmas[step + 1]``; the edge's kernel is ``(tree.kernel, tree.noise_level)`` with std
    multiplied by ``scale`` (``edge_log_prob``).
    """

    child: Tensor  # long [E]
    parent: Tensor  # long [E]
    step: Tensor  # long [E]: transition index (sigma = sigmas[step])
    old_log_prob: Tensor  # float32 [E]
    advantage: Tensor  # float32 [E]: the child's advantage
    scale: Tensor  # float32 [E]
    tree: Tensor  # long [E]: which prompt (row of tree.cond)

    def __len__(self) -> int:
        return int(self.child.numel())

    def index(self, idx) -> "Transitions":
        return Transitions(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def transitions(tree: RolloutTree, advantages: Tensor, keep: Tensor | None = None) -> Transitions:
    """Edges to train: stochastic, on a trainable step, and in ``keep`` (a mask over child nodes; default all)."""
    adv = torch.as_tensor(advantages, dtype=torch.float32).flatten().cpu()
    if adv.numel() != tree.num_nodes:
        raise ValueError(f"advantages has {adv.numel()} entries but the tree has {tree.num_nodes} nodes")
    mask = (tree.parent >= 0) & tree.edge_sde & tree.train_steps[(tree.step - 1).clamp_min(0)]
    if keep is not None:
        mask &= keep
    child = torch.nonzero(mask).flatten()
    return Transitions(child=child, parent=tree.parent[child], step=tree.step[child] - 1,
                       old_log_prob=tree.log_probs[child], advantage=adv[child], scale=tree.edge_scale[child],
                       tree=tree.tree[child])


def edge_log_prob(kind: str, x: Tensor, x_next: Tensor, model_out: Tensor, sigma, sigma_next, noise_level: float,
                  scale: Tensor | float = 1.0, reduction: str = "mean", density: str = "gaussian") -> sde.StepOut:
    """``flowalign.sde.log_prob_of`` with the kernel's std multiplied by ``scale`` (``[B]`` or scalar).

    Unit scale is exactly ``log_prob_of``; a split edge drawn from ``N(mean, (s std)^2)`` is rescored with ``s``.
    """
    scale_t = torch.as_tensor(scale, dtype=torch.float32)
    if bool((scale_t == 1).all()):
        return sde.log_prob_of(kind, x, x_next, model_out, sigma, sigma_next, noise_level, reduction, density)
    sde.validate(kind, noise_level, reduction, density)
    mean, std = sde.mean_std(kind, x, model_out, sigma, sigma_next, noise_level)
    s = scale_t.to(std.device)
    std = std * (s.view(-1, *([1] * (std.ndim - 1))) if s.ndim else s)
    return sde.StepOut(x_next, mean, std, sde.gaussian_log_prob(x_next, mean, std, reduction, density))


def tree_metrics(tree: RolloutTree, trained: int | None = None) -> dict[str, float]:
    """NFE per leaf (denoiser rows while sampling / leaves), tree size (nodes per tree incl. root), edges, and --
    given the number of ``trained`` edges -- the pruned fraction of the trainable stochastic edges."""
    sde_edges = int(((tree.parent >= 0) & tree.edge_sde & tree.train_steps[(tree.step - 1).clamp_min(0)]).sum())
    out = {"nfe_per_leaf": tree.nfe / tree.num_leaves, "tree_size": tree.num_nodes / tree.num_trees,
           "edges_per_tree": (tree.num_nodes - tree.num_trees) / tree.num_trees,
           "sde_edges_per_tree": sde_edges / tree.num_trees, "leaves_per_tree": float(tree.leaves_per_tree)}
    if trained is not None:
        out["trained_edges_per_tree"] = trained / tree.num_trees
        out["train_nfe_per_leaf"] = trained / tree.num_leaves
        out["pruned_frac"] = 1.0 - trained / sde_edges if sde_edges else 0.0
    return out
