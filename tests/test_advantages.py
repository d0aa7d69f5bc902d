"""Trainer-side advantage helpers: config resolution, zero-std groups, flow_grpo's per-prompt tracker.

The estimators themselves are also checked by hand-computed examples in test_llm_advantages.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowalign.advantages import ADVANTAGES, resolve_estimator, zero_std_groups


def test_grpo_group_and_global_std_hand_computed():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0])  # groups [1, 3] and [2, 2]
    # per-group: mean 2, std sqrt(2) -> +-1/sqrt2; constant group -> 0
    a = ADVANTAGES.get("grpo")(r, 2, eps=0.0 + 1e-4)
    torch.testing.assert_close(a, torch.tensor([-1, 1, 0, 0]) / (2**0.5 + 1e-4))
    # flow_grpo global_std=True: (r - mean_prompt) / (std over the whole round + eps)
    std_b = torch.tensor([1.0, 3.0, 2.0, 2.0]).std()
    torch.testing.assert_close(ADVANTAGES.get("batch_std")(r, 2), torch.tensor([-1.0, 1, 0, 0]) / (std_b + 1e-4))


def test_resolve_estimator_table():
    assert resolve_estimator() == ("grpo", {"eps": 1e-4})
    assert resolve_estimator(std="global", eps=1e-3) == ("batch_std", {"eps": 1e-3})
    assert resolve_estimator(std="none") == ("no_std", {})
    assert resolve_estimator(baseline="median") == ("median", {"scale": "mad"})
    assert resolve_estimator(baseline="median", std="none") == ("median", {"scale": "none"})
    assert resolve_estimator(baseline="loo", std="none") == ("rloo", {})
    assert resolve_estimator(per_reward=True) == ("gdpo", {"eps": 1e-4})
    assert resolve_estimator("reinforce_pp", kwargs={"eps": 1e-6}) == ("reinforce_pp", {"eps": 1e-6})
    with pytest.raises(ValueError, match="baseline='loo' with std='group' is not supported"):
        resolve_estimator(baseline="loo")
    with pytest.raises(ValueError, match="estimator='rloo' is explicit"):
        resolve_estimator("rloo", std="global")
    with pytest.raises(ValueError, match="per_reward"):
        resolve_estimator(per_reward=True, std="global")


def test_zero_std_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0])
    assert zero_std_groups(r, 2).tolist() == [True, True, False, False, True, True]
    multi = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 3.0], [3.0, 3.0]])  # K=2 components
    assert zero_std_groups(multi, 2).tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="NaN/inf at rows \\[1\\]"):
        zero_std_groups(torch.tensor([0.0, float("nan")]), 2)


def test_nan_rewards_rejected_by_every_estimator():
    r = torch.tensor([0.0, float("nan"), 1.0, 2.0])
    for name in ("grpo", "batch_std", "no_std", "rloo", "median", "reinforce_pp"):
        with pytest.raises(ValueError, match="NaN/inf"):
            ADVANTAGES.get(name)(r, 2)


def _flow_grpo_stat_tracker(rewards: np.ndarray, prompts: list[str], global_std: bool) -> np.ndarray:
    """flow_grpo ``PerPromptStatTracker.update`` re-typed in numpy: per-prompt mean, ``np.std`` (ddof 0) of the
    prompt's rewards or, with ``global_std``, of every reward of the round; ``+ 1e-4`` on the std."""
    prompts_arr = np.array(prompts)
    adv = np.empty_like(rewards)
    for p in np.unique(prompts_arr):
        r_p = rewards[prompts_arr == p]
        std = np.std(rewards) + 1e-4 if global_std else np.std(r_p) + 1e-4
        adv[prompts_arr == p] = (r_p - np.mean(r_p)) / std
    return adv


@pytest.mark.parametrize("std", ["group", "global"])
def test_flow_grpo_advantages_match_its_stat_tracker(std):
    G, n = 16, 6
    rewards = np.random.default_rng(0).normal(size=n * G).astype(np.float64)
    prompts = [f"prompt {i}" for i in range(n) for _ in range(G)]
    want = _flow_grpo_stat_tracker(rewards, prompts, global_std=std == "global")
    name, kw = resolve_estimator(std=std, ddof=0)  # the image trainer's default train.advantage.ddof
    got = ADVANTAGES.get(name)(torch.tensor(rewards, dtype=torch.float32), G, **kw)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
    # TRL's Bessel convention is the other option, and differs by sqrt(G/(G-1)) (x1.033 at G=16)
    name, kw = resolve_estimator(std=std, ddof=1)
    trl = ADVANTAGES.get(name)(torch.tensor(rewards, dtype=torch.float32), G, **kw).numpy()
    assert np.abs(trl - want).max() > 1e-3


def test_ddof_reaches_every_std_estimator_and_defaults():
    from flowalign.config import load_config

    assert resolve_estimator(ddof=0) == ("grpo", {"eps": 1e-4, "ddof": 0})
    assert resolve_estimator(per_reward=True, ddof=0) == ("gdpo", {"eps": 1e-4, "ddof": 0})
    assert resolve_estimator("per_prompt", ddof=1) == ("per_prompt", {"ddof": 1})
    assert resolve_estimator(std="none", ddof=0) == ("no_std", {})  # no std, no ddof
    assert resolve_estimator("grpo", kwargs={"ddof": 1}, ddof=0) == ("grpo", {"ddof": 1})  # explicit kwargs win
    assert load_config("recipes/sd35_pickscore.yaml", validate=False).train.advantage.ddof == 0  # flow_grpo
    assert load_config("recipes/dance_flux.yaml", validate=False).train.advantage.ddof == 1  # DanceGRPO torch.std
    with pytest.raises(ValueError, match="ddof must be 0"):
        ADVANTAGES.get("grpo")(torch.zeros(4), 2, ddof=2)
    r = torch.tensor([0.0, 1.0, 0.0, 3.0])
    for name in ("grpo", "batch_std", "reinforce_pp"):  # ddof changes the scale by the Bessel factor only
        a0, a1 = ADVANTAGES.get(name)(r, 2, ddof=0), ADVANTAGES.get(name)(r, 2, ddof=1)
        assert not torch.allclose(a0, a1)
    g0 = ADVANTAGES.get("gdpo")(torch.stack([r, r.flip(0)], 1), 2, ddof=0)
    g1 = ADVANTAGES.get("gdpo")(torch.stack([r, r.flip(0)], 1), 2, ddof=1)
    assert not torch.allclose(g0, g1)
