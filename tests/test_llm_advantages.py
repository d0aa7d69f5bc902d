"""Advantage estimators against hand-computed examples (flowalign/advantages.py), and LLM loss pieces."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign.advantages import ADVANTAGES, median_pivots, whiten
from flowalign.llm.losses import aggregate, kl_estimate, token_returns_with_kl

R = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4: mixed, all-equal
S = math.sqrt(1 / 3)  # Bessel std of [1, 0, 0, 1]


def test_grpo_hand_computed():
    a = ADVANTAGES.get("grpo")(R, 4)
    z = 0.5 / (S + 1e-4)
    assert torch.allclose(a, torch.tensor([z, -z, -z, z, 0, 0, 0, 0]), atol=1e-6)


def test_no_std_and_batch_std():
    assert torch.equal(ADVANTAGES.get("no_std")(R, 4), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    sb = R.std().item()  # Bessel std over all 8 rewards
    a = ADVANTAGES.get("batch_std")(R, 4)
    assert torch.allclose(a, torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]) / (sb + 1e-4), atol=1e-6)


def test_rloo_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    a = ADVANTAGES.get("rloo")(r, 4)
    assert torch.allclose(a, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert torch.equal(ADVANTAGES.get("rloo")(R[4:], 4), torch.zeros(4))  # all-equal group


def test_singleton_groups_follow_verl():
    r = torch.tensor([0.3, -1.0, 2.0])
    for name in ("grpo", "no_std", "rloo"):
        assert torch.allclose(ADVANTAGES.get(name)(r, 1), r / (1 + (1e-4 if name == "grpo" else 0))), name


def test_reinforce_pp_whitens_globally():
    a = ADVANTAGES.get("reinforce_pp")(R, 4)
    base = torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0])
    expect = (base - base.mean()) / math.sqrt(base.var().item() + 1e-8)
    assert torch.allclose(a, expect, atol=1e-6)
    w = torch.tensor([1.0, 2, 3, 4, 1, 1, 1, 1])  # token-weighted statistics (verl masked_whiten)
    aw = ADVANTAGES.get("reinforce_pp")(R, 4, weights=w)
    m = (base * w).sum() / w.sum()
    v = ((base - m) ** 2 * w).sum() / w.sum() * w.sum() / (w.sum() - 1)
    assert torch.allclose(aw, (base - m) / torch.sqrt(v + 1e-8), atol=1e-6)


def test_median_mc_grpo():
    r = torch.tensor([0.0, 1.0, 1.0, 3.0, 0.5])  # G + 1 = 5; median 1.0, |r - med| = [1, 0, 0, 2, .5] -> MAD .5
    a = ADVANTAGES.get("median")(r, 5)
    assert torch.allclose(a, torch.tensor([-1.0, 0, 0, 2.0, -0.5]) / (0.5 + 1e-3))
    assert ADVANTAGES.get("median")(r, 5, scale="none").tolist() == [-1.0, 0, 0, 2.0, -0.5]
    piv = median_pivots(torch.cat([r, torch.tensor([5.0, 4, 3, 2, 1])]), 5)
    assert piv.tolist()[1] == 7 and r[piv[0]] == 1.0  # pivot rows carry the median value
    binary = torch.tensor([1.0, 0.0, 0.0])  # binary rewards: MAD = 0 -> |A| = 1 / eps (reference behaviour)
    assert torch.allclose(ADVANTAGES.get("median")(binary, 3), torch.tensor([1000.0, 0, 0]))


def test_gdpo_decoupled():
    r = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # G = 2, K = 2
    z1 = torch.tensor([1, -1, 1, -1.0]) * (0.5 / (math.sqrt(0.5) + 1e-4))
    z2 = torch.tensor([0, 0, 0, 0.0])  # group 1 reward 2 all-equal; group 2 all-equal too
    s = z1 * 1.0 + z2 * 0.5
    expect = (s - s.mean()) / (s.std() + 1e-4)
    assert torch.allclose(ADVANTAGES.get("gdpo")(r, 2, weights=[1.0, 0.5]), expect, atol=1e-6)
    # GRPO on the weighted sum cannot tell [1, 0] from [0, 1] when weights are equal; GDPO keeps them apart
    r2 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert torch.allclose(ADVANTAGES.get("gdpo")(r2, 2)[:2], ADVANTAGES.get("gdpo")(r2, 2)[2:])
    with pytest.raises(ValueError, match="one entry per reward"):
        ADVANTAGES.get("gdpo")(r, 2, weights=[1.0])


@pytest.mark.parametrize("name", ["grpo", "no_std", "batch_std", "rloo", "reinforce_pp", "median"])
def test_nan_rewards_rejected(name):
    r = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    with pytest.raises(ValueError, match="NaN/inf at rows \\[1\\]"):
        ADVANTAGES.get(name)(r, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_gdpo_nan_rewards_rejected(bad):
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, bad], [1.0, 1.0]])  # row 2's second reward failed
    with pytest.raises(ValueError, match="NaN/inf at rows \\[2\\]"):
        ADVANTAGES.get("gdpo")(r, 2, weights=[1.0, 0.5])
    with pytest.raises(ValueError, match="NaN/inf at rows \\[2\\]; map failed scores to a number"):
        ADVANTAGES.get("gdpo")(r, 2)


def test_median_mc_grpo_all_equal_group():
    # two groups of G + 1 = 5: all-equal [2, 2, 2, 2, 2] and the mixed group of test_median_mc_grpo.
    # All-equal: median 2, r - med = 0 everywhere, MAD = 0 -> A = 0 / (0 + 1e-3) = 0 (not 1/eps), any pivot.
    r = torch.tensor([2.0, 2, 2, 2, 2, 0.0, 1.0, 1.0, 3.0, 0.5])
    mixed = [-1.0 / (0.5 + 1e-3), 0.0, 0.0, 2.0 / (0.5 + 1e-3), -0.5 / (0.5 + 1e-3)]
    a = ADVANTAGES.get("median")(r, 5)
    assert torch.allclose(a, torch.tensor([0.0] * 5 + mixed), atol=1e-6)
    assert ADVANTAGES.get("median")(r, 5, scale="none").tolist() == [0.0] * 5 + [-1.0, 0.0, 0.0, 2.0, -0.5]
    piv = median_pivots(r, 5)
    assert 0 <= int(piv[0]) < 5 and r[piv[0]] == 2.0 and int(piv[1]) in (6, 7)  # a median row of each group
    keep = torch.tensor([i for i in range(10) if i not in piv.tolist()])
    assert len(keep) == 8 and (a[keep[:4]] == 0).all()  # the trained G = 4 of the all-equal group: no signal
    assert torch.equal(ADVANTAGES.get("median")(torch.ones(3), 3), torch.zeros(3))  # binary all-equal group


def test_bad_group_size_rejected():
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        ADVANTAGES.get("grpo")(R, 3)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        ADVANTAGES.get("grpoo")


def test_aggregation_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm=8).item() == pytest.approx(10 / 16)
    with pytest.raises(ValueError, match="loss_agg_mode='tokenmean' is not allowed"):
        aggregate(loss, mask, "tokenmean")


def test_kl_estimators_and_reinforce_pp_returns():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(math.exp(-1) + 1 - 1)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    a = token_returns_with_kl(torch.tensor([1.0, 0.0]), kl, mask, beta=1.0)
    assert torch.allclose(a, torch.tensor([[0.4, 0.5, 0.7], [-1.0, -0.5, 0.0]]))
    w = whiten(a[mask.bool()])
    assert abs(w.mean().item()) < 1e-6
