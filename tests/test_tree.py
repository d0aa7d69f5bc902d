"""Tree rollouts (flowalign.tree): parity with flat sampling, exact log-probs, fused rewards, depth-wise advantages,
pruning counts. The model is the tiny random-weight SD3 pipeline (real diffusers classes, built offline)."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign import sde
from flowalign import tree as T
from flowalign.rollout import sample
from flowalign.schedules import StepPlan, make_plan

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def adapter():
    from flowalign.pipelines import tiny
    from flowalign.pipelines.sd3 import SD3Adapter

    return SD3Adapter.from_pretrained(tiny.cached("sd3"), **tiny.RESOLUTION["sd3"])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def skeleton(num_steps: int, branch_steps, branching: int, num_trees: int = 1, log_probs=None) -> T.RolloutTree:
    """A tree with the structure sample_tree builds (creation order, node-major children) and no model."""
    parent, step, tree, split = [-1] * num_trees, [0] * num_trees, list(range(num_trees)), [False] * num_trees
    front = list(range(num_trees))
    for i in range(num_steps):
        k = branching if i in branch_steps else 1
        new = []
        for n in front:
            for _ in range(k):
                new.append(len(parent))
                parent.append(n)
                step.append(i + 1)
                tree.append(tree[n])
                split.append(i in branch_steps)
        front = new
    M = len(parent)
    return T.RolloutTree(
        latents=torch.zeros(M, 1), parent=torch.tensor(parent), step=torch.tensor(step), tree=torch.tensor(tree),
        log_probs=torch.zeros(M) if log_probs is None else torch.as_tensor(log_probs, dtype=torch.float32),
        edge_sde=torch.tensor([p >= 0 for p in parent]), edge_split=torch.tensor(split), edge_scale=torch.ones(M),
        leaves=torch.tensor(front), sigmas=torch.linspace(1, 0, num_steps + 1),
        train_steps=torch.ones(num_steps, dtype=torch.bool), prompts=["p"] * num_trees,
        branch_steps=sorted(branch_steps), branching=branching)


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("kernel,level,batch_size", [("flow_sde", 0.7, None), ("dance", 0.3, 1)])
def test_tree_without_splits_is_the_flat_rollout_bit_for_bit(adapter, kernel, level, batch_size):
    plan = make_plan("window", 6, size=3, lo=1, hi=5, generator=gen(1))  # ODE steps around an SDE window too
    flat = sample(adapter, PROMPTS, group_size=1, num_steps=6, kernel=kernel, noise_level=level, plan=plan,
                  generator=gen(3), batch_size=batch_size)
    tree = T.sample_tree(adapter, PROMPTS, num_steps=6, kernel=kernel, noise_level=level, plan=plan,
                         branch_steps=[], generator=gen(3), batch_size=batch_size)
    assert tree.num_nodes == 7 * len(PROMPTS) and tree.num_leaves == len(PROMPTS)
    for i in range(7):
        nodes = torch.nonzero(tree.step == i).flatten()
        assert torch.equal(tree.latents[nodes], flat.latents[:, i])
        if i:
            assert torch.equal(tree.log_probs[nodes], flat.log_probs[:, i - 1])
    assert torch.equal(tree.images, flat.images)
    assert tree.nfe == 6 * len(PROMPTS)


def test_one_split_at_step_zero_is_a_same_noise_group(adapter):
    """DanceGRPO's shared-x_T group is a tree that splits once, at the first step (the tree evaluates the shared first
    step once instead of G times; same generator draws)."""
    G = 4
    flat = sample(adapter, PROMPTS, group_size=G, num_steps=5, kernel="dance", noise_level=0.3, same_noise=True,
                  generator=gen(7), plan=make_plan("branch", 5, branch_steps=[]))
    tree = T.sample_tree(adapter, PROMPTS, num_steps=5, kernel="dance", noise_level=0.3, branch_steps=[0],
                         branching=G, generator=gen(7))
    torch.testing.assert_close(tree.latents[tree.leaves], flat.latents[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(tree.log_probs[tree.leaves], flat.log_probs[:, -1], atol=1e-5, rtol=0)
    assert tree.nfe == len(PROMPTS) * (1 + 4 * G)  # the flat group evaluates len(PROMPTS) * G rows at each step


@pytest.mark.parametrize("split_logprob,scale", [("drawn", 3.0), ("unscaled_std", 3.0), ("drawn", 1.0)])
def test_ratio_is_one_for_every_stored_node(adapter, split_logprob, scale):
    tree = T.sample_tree(adapter, PROMPTS, num_steps=6, kernel="dance", noise_level=0.3, branch_steps=[0, 2, 3],
                         branching=2, split_noise_scale=scale, split_logprob=split_logprob, generator=gen(5),
                         guidance=2.0)
    e = T.transitions(tree, torch.zeros(tree.num_nodes))
    assert len(e) == tree.num_nodes - len(PROMPTS)  # every edge is stochastic and trainable
    for j in range(6):
        s = e.index(e.step == j)
        x, x_next = tree.latents[s.parent], tree.latents[s.child]
        with torch.no_grad():
            out = adapter.predict(x, tree.sigmas[j], tree.cond.index(s.tree), tree.guidance)
        new = T.edge_log_prob("dance", x, x_next, out, tree.sigmas[j], tree.sigmas[j + 1], 0.3, s.scale)
        ratio = torch.exp(new.log_prob - s.old_log_prob)
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-6, rtol=0)
        # which density was stored: standardised residuals under the *scoring* std have E[z^2] = 1 for "drawn"
        # and scale^2 for the reference's "unscaled_std" at split steps
        z2 = ((x_next - new.mean) / new.std).pow(2).mean(dim=(1, 2, 3))
        expect = scale**2 if (split_logprob == "unscaled_std" and j in (0, 2, 3)) else 1.0
        assert abs(float(z2.mean()) - expect) < 0.15 * expect


def test_tree_nfe_and_structure(adapter):
    tree = T.sample_tree(adapter, PROMPTS, num_steps=10, kernel="dance", noise_level=0.3,
                         branch_steps=[0, 2, 4, 6], branching=2, generator=gen(0), decode=False)
    per_tree = 1 + 2 + 2 + 4 + 4 + 8 + 8 + 16 * 3  # frontier rows per step: a split step evaluates the parents once
    assert tree.nfe == per_tree * len(PROMPTS) and tree.nfe_calls == 10
    assert tree.leaves_per_tree == 16
    ref = skeleton(10, [0, 2, 4, 6], 2, num_trees=len(PROMPTS))
    assert torch.equal(tree.parent, ref.parent) and torch.equal(tree.step, ref.step)
    assert torch.equal(tree.tree, ref.tree) and torch.equal(tree.leaves, ref.leaves)
    m = T.tree_metrics(tree)
    assert m["nfe_per_leaf"] == per_tree / 16 and m["tree_size"] == 1 + 92 and m["sde_edges_per_tree"] == 92


def test_mix_plan_keeps_split_steps_sde_and_never_trains_ode_edges(adapter):
    window = make_plan("sliding", 8, size=2, stride=1, shift_interval=1, iteration=3)  # SDE on steps 3, 4
    plan = T.mix_plan(make_plan("branch", 8, branch_steps=[0, 6]), window)
    assert plan.sde.nonzero().flatten().tolist() == [0, 3, 4, 6]
    tree = T.sample_tree(adapter, PROMPTS[:1], num_steps=8, kernel="flow_sde", noise_level=0.7, plan=plan,
                         branching=2, generator=gen(2), decode=False)
    edge_steps = tree.step[tree.edge_sde] - 1
    assert sorted(set(edge_steps.tolist())) == [0, 3, 4, 6]
    assert bool((tree.log_probs[~tree.edge_sde] == 0).all())
    e = T.transitions(tree, torch.ones(tree.num_nodes))
    assert sorted(set(e.step.tolist())) == [0, 3, 4, 6] and len(e) == 2 + 2 + 2 + 4


def test_bad_arguments_name_themselves(adapter):
    with pytest.raises(ValueError, match="split_logprob"):
        T.sample_tree(adapter, PROMPTS, num_steps=4, branch_steps=[0], split_logprob="scaled")
    with pytest.raises(ValueError, match="branch_steps"):
        T.sample_tree(adapter, PROMPTS, num_steps=4, branch_steps=[4])
    ode_at_split = StepPlan(sde=torch.tensor([False, True, True, True]), train=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="deterministic"):
        T.sample_tree(adapter, PROMPTS, num_steps=4, branch_steps=[0], plan=ode_at_split)


# ------------------------------------------------------------------------------------------------ advantages
def test_depth_wise_advantages_hand_computed():
    """3 steps, splits at 0 and 1 (k=2): root; A, B; AA, AB, BA, BB; then one chain step to the 4 leaves.

    Leaves [1, 3, 2, 6] -> depth 1: A = mean(1, 3) = 2, B = mean(2, 6) = 4 -> (-1/sqrt2, +1/sqrt2) (Bessel std
    sqrt2); depths 2 and 3 hold [1, 3, 2, 6]: mean 3, std sqrt(14/3) -> [-2, 0, -1, 3] / 2.1602.
    A second tree with equal leaves gets zero advantages and does not change the first tree's numbers."""
    tree = skeleton(3, [0, 1], 2, num_trees=2)
    # creation order: roots 0,1 | step1: 2,3 (tree0) 4,5 (tree1) | step2: 6..9 (tree0) 10..13 | step3: 14..17, 18..21
    assert tree.leaves.tolist() == list(range(14, 22)) and tree.tree[14:18].tolist() == [0] * 4
    r = T.fuse_rewards(tree, torch.tensor([1.0, 3.0, 2.0, 6.0, 5.0, 5.0, 5.0, 5.0]))
    assert r[[0, 2, 3]].tolist() == [3.0, 2.0, 4.0]
    assert r[[6, 7, 8, 9]].tolist() == [1.0, 3.0, 2.0, 6.0] == r[[14, 15, 16, 17]].tolist()
    adv = T.depth_advantages(tree, r)
    s = math.sqrt(14 / 3)
    expect = {0: 0.0, 2: -1 / math.sqrt(2), 3: 1 / math.sqrt(2),
              6: -2 / s, 7: 0.0, 8: -1 / s, 9: 3 / s, 14: -2 / s, 15: 0.0, 16: -1 / s, 17: 3 / s}
    for n, v in expect.items():
        assert float(adv[n]) == pytest.approx(v, abs=1e-6), n
    assert bool((adv[tree.tree == 1] == 0).all())  # std < 1e-6 -> 0


def test_prob_weighted_fusion_hand_computed():
    """Parent with children of edge log-probs (0, ln 3): softmax weights (1/4, 3/4)."""
    lp = torch.zeros(7)
    lp[2] = math.log(3.0)  # node 2 is the root's second child; its subtree is the chain 2 -> 4 -> 6
    tree = skeleton(3, [0], 2, log_probs=lp)
    assert tree.parent.tolist() == [-1, 0, 0, 1, 2, 3, 4] and tree.leaves.tolist() == [5, 6]
    r = T.fuse_rewards(tree, torch.tensor([1.0, 3.0]), mode="prob_weighted")
    assert float(r[0]) == pytest.approx(0.25 * 1 + 0.75 * 3)
    assert float(T.fuse_rewards(tree, torch.tensor([1.0, 3.0]))[0]) == pytest.approx(2.0)
    r2 = T.fuse_rewards(tree, torch.tensor([1.0, 3.0]), mode="prob_weighted", temperature=0.0)
    assert float(r2[0]) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------ pruning
def test_depth_and_width_pruning_counts():
    tree = skeleton(10, [0, 2, 4, 6], 2, num_trees=2)  # 92 edges per tree; heads of the last split at step 7
    adv = torch.randn(tree.num_nodes, generator=gen(0))
    all_edges = T.transitions(tree, adv)
    assert len(all_edges) == 2 * 92
    deep = T.transitions(tree, adv, T.depth_prune(tree, [9, 10]))
    assert len(deep) == 2 * (92 - 32) and not bool(torch.isin(deep.step, torch.tensor([8, 9])).any())

    heads = torch.nonzero(tree.step == 7).flatten()
    for mode, kept_heads in (("best", 8), ("best_worst", 8)):
        keep = T.width_prune(tree, adv, mode, 0.5)
        e = T.transitions(tree, adv, keep)
        assert len(e) == 2 * (92 - 8 * 3)  # 8 of 16 chains lose their 3 edges below the head, per tree
        for t in range(2):
            h = heads[tree.tree[heads] == t]
            survivors = [int(n) for n in h if bool(keep[torch.nonzero(tree.parent == n).flatten()].all())]
            assert len(survivors) == kept_heads
            ranked = h[torch.argsort(adv[h], descending=True)].tolist()
            want = ranked[:8] if mode == "best" else ranked[:4] + ranked[-4:]
            assert sorted(survivors) == sorted(want)
    m = T.tree_metrics(tree, trained=len(deep))
    assert m["pruned_frac"] == pytest.approx(32 / 92)


def test_sliding_depth_window():
    assert T.sliding_depths([15, 16, 17, 18], iteration=65, interval=30, stop_depth=9) == [13, 14, 15, 16]
    assert T.sliding_depths([15, 16, 17, 18], iteration=10_000, interval=30, stop_depth=9) == [9, 10, 11, 12]
    assert T.sliding_depths([18, 15], iteration=100) == [15, 18]


def test_edge_log_prob_scale_is_the_scaled_gaussian():
    x, v = torch.randn(3, 4, 2, 2, generator=gen(1)), torch.randn(3, 4, 2, 2, generator=gen(2))
    x_next = torch.randn(3, 4, 2, 2, generator=gen(3))
    base = sde.log_prob_of("dance", x, x_next, v, 0.6, 0.4, 0.3)
    scaled = T.edge_log_prob("dance", x, x_next, v, 0.6, 0.4, 0.3, torch.tensor([1.0, 2.0, 4.0]))
    assert torch.equal(scaled.log_prob[0], base.log_prob[0])
    for i, s in ((1, 2.0), (2, 4.0)):
        std = base.std[i] * s
        want = (-(x_next[i] - base.mean[i]) ** 2 / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).mean()
        assert float(scaled.log_prob[i]) == pytest.approx(float(want), abs=1e-6)
