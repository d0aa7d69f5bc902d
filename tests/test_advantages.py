"""Trainer-side advantage helpers: config resolution, zero-std groups, flow_grpo's per-prompt tracker.

The estimators themselves are also checked by hand-computed examples in test_llm_advantages.py.
"""

from __future__ import annotations

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
