"""PPO-clip and KL terms against hand-computed values (flowalign/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign.losses import POLICY_LOSSES, gaussian_kl, ppo_clip


def test_on_policy_ratio_one_gives_minus_advantage():
    lp = torch.tensor([-1.3, 0.2, 5.0])
    adv = torch.tensor([1.5, -0.5, 2.0])
    loss, m = ppo_clip(lp, lp.clone(), adv, clip_range=1e-4)
    assert torch.equal(loss, -adv)
    assert m["ratio_min"] == 1.0 and m["ratio_max"] == 1.0 and m["clipfrac"] == 0.0 and m["approx_kl"] == 0.0


def test_clipping_hand_computed():
    eps = 0.1
    # ratios 1.5 (A>0: clipped at 1.1), 0.5 (A>0: unclipped, pessimistic), 1.5 (A<0: unclipped), 0.5 (A<0: clip 0.9)
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5])
    adv = torch.tensor([2.0, 2.0, -1.0, -1.0])
    lp = torch.log(ratio).requires_grad_(True)
    loss, m = ppo_clip(lp, torch.zeros(4), adv, clip_range=eps)
    torch.testing.assert_close(loss, torch.tensor([-2.2, -1.0, 1.5, 0.9]))
    loss.sum().backward()
    # the clipped branches carry no gradient; the others d(-A r)/dlogp = -A r
    torch.testing.assert_close(lp.grad, torch.tensor([0.0, -1.0, 1.5, 0.0]))
    assert m["clipfrac"] == 1.0 and m["clipfrac_gt_one"] == 0.5 and m["clipfrac_lt_one"] == 0.5
    torch.testing.assert_close(m["approx_kl"], 0.5 * (torch.log(ratio) ** 2).mean())


def test_asymmetric_clip():
    ratio = torch.tensor([1.25, 0.85])
    adv = torch.tensor([1.0, -1.0])
    loss, m = ppo_clip(torch.log(ratio), torch.zeros(2), adv, clip_range=0.5, clip_range_lt=0.1, clip_range_gt=0.2)
    torch.testing.assert_close(loss, torch.tensor([-1.2, 0.9]))
    assert m["clipfrac_gt_one"] == 0.5 and m["clipfrac_lt_one"] == 0.5
    assert POLICY_LOSSES.get("ppo_clip") is ppo_clip
    with pytest.raises(ValueError, match="clip ranges must be > 0"):
        ppo_clip(torch.zeros(1), torch.zeros(1), torch.zeros(1), clip_range=0.0)


def test_gaussian_kl_forms():
    g = torch.Generator().manual_seed(0)
    mu, mu_ref = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.3, 0.5, 0.0]).view(3, 1, 1, 1)
    dt = -0.1
    exact = gaussian_kl(mu, mu_ref, std, dt, form="exact")
    hand = ((mu - mu_ref) ** 2).mean((1, 2, 3)) / (2 * std.flatten() ** 2)
    torch.testing.assert_close(exact[:2], hand[:2])
    assert exact[2] == 0  # deterministic (ODE) rows carry no KL
    torch.testing.assert_close(gaussian_kl(mu, mu_ref, std, dt, form="flow_grpo"), exact * 0.1)
    # reduction="sum" is the true KL of the diagonal Gaussians
    p = torch.distributions.Normal(mu[:2], std[:2].expand_as(mu[:2]))
    q = torch.distributions.Normal(mu_ref[:2], std[:2].expand_as(mu[:2]))
    true = torch.distributions.kl_divergence(p, q).sum((1, 2, 3))
    torch.testing.assert_close(gaussian_kl(mu, mu_ref, std, dt, form="exact", reduction="sum")[:2], true)
    with pytest.raises(ValueError, match="kl='x' is not allowed"):
        gaussian_kl(mu, mu_ref, std, dt, form="x")


def test_flow_grpo_kl_equals_train_sd3_formula():
    """flow_grpo: kl = mean((mu - mu_ref)^2) / (2 g_t^2) with std = g_t sqrt|dt|."""
    mu, mu_ref = torch.ones(1, 4), torch.zeros(1, 4)
    g_t, dt = 0.7, -0.2
    std = torch.tensor(g_t * math.sqrt(-dt)).view(1, 1)
    out = gaussian_kl(mu, mu_ref, std, dt, form="flow_grpo")
    torch.testing.assert_close(out, torch.tensor([1.0 / (2 * g_t**2)]))
