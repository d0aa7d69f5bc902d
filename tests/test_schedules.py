"""Schedules (flowalign.schedules): which steps are stochastic and which are trained.

all / fraction (flow_grpo ``timestep_fraction``), window (Flow-GRPO-Fast: drawn from the run's generator, one
window per round shared by the whole group), sliding (MixGRPO: advances with the iteration and rolls back), branch
(tree rollouts), subsample (DanceGRPO); bad arguments raise early ValueErrors naming the argument.
"""

from __future__ import annotations

import pytest
import torch

from flowalign.rollout import sample
from flowalign.schedules import SCHEDULES, StepPlan, make_plan
from tests.toy import TinyFlowAdapter


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def idx(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def test_registry_lists_every_schedule():
    assert set(SCHEDULES.names()) >= {"all", "fraction", "window", "sliding", "branch", "subsample"}


def test_all_trains_the_leading_99_percent_with_every_step_stochastic():
    p = make_plan("all", 10)  # flow_grpo: int(10 * 0.99) = 9, the last (near-deterministic) step is left out
    assert p.num_steps == 10 and p.sde.all()
    assert p.trained_indices() == list(range(9))
    assert make_plan("all", 10, fraction=1.0).trained_indices() == list(range(10))
    assert make_plan("all", 1).trained_indices() == [0]  # at least one step


@pytest.mark.parametrize("n, frac, k", [(10, 0.4, 4), (10, 0.99, 9), (7, 0.5, 3), (3, 0.1, 1)])
def test_fraction_trains_the_leading_steps(n, frac, k):
    p = make_plan("fraction", n, fraction=frac)
    assert p.trained_indices() == list(range(k)) and p.sde.all()
    q = make_plan("fraction", n, fraction=frac, ode_outside=True)  # shapes prototype: ODE after the window
    assert idx(q.sde) == list(range(k)) and torch.equal(q.sde, q.train)


def test_window_is_drawn_from_the_generator_and_reproducible():
    plans = [make_plan("window", 10, size=3, lo=0, hi=5, generator=gen(s)) for s in range(40)]
    for p in plans:
        steps = idx(p.train)
        assert len(steps) == 3 and steps == list(range(steps[0], steps[0] + 3)), steps
        assert 0 <= steps[0] <= 2 and torch.equal(p.sde, p.train)  # ODE outside the window
    starts = {idx(p.train)[0] for p in plans}
    assert starts == {0, 1, 2}  # every admissible start is drawn
    again = make_plan("window", 10, size=3, lo=0, hi=5, generator=gen(7))
    assert torch.equal(again.train, plans[7].train)
    # consecutive rounds from one generator move the window
    g = gen(0)
    assert len({idx(make_plan("window", 10, size=2, generator=g).train)[0] for _ in range(20)}) > 3


def test_window_is_shared_by_every_member_of_a_group():
    """One plan per round: all G samples of every prompt use the same SDE steps (unlike flow_grpo's per-GPU
    ``random.randint``, which splits a group across windows)."""
    adapter = TinyFlowAdapter.build(seed=0)
    plan = make_plan("window", 6, size=2, lo=1, hi=5, generator=gen(3))
    traj = sample(adapter, ["a red circle", "two squares"], group_size=3, num_steps=6, plan=plan,
                  generator=gen(0), decode=False)
    on = (traj.log_probs != 0)
    assert torch.equal(on, plan.train.expand(len(traj), -1))  # log-probs exactly on the window, for every row
    # ODE steps outside the window: the state is the deterministic Euler step for every row
    for i in idx(~plan.sde):
        x = traj.latents[:, i]
        v = adapter.predict(x, traj.sigmas[i], traj.cond)
        torch.testing.assert_close(traj.latents[:, i + 1], x + v * (traj.sigmas[i + 1] - traj.sigmas[i]),
                                   rtol=0, atol=1e-6)


def test_sliding_window_advances_every_interval_and_rolls_back():
    n, size = 10, 4
    starts = [idx(make_plan("sliding", n, size=size, stride=1, shift_interval=2, iteration=it).train)[0]
              for it in range(16)]
    # max_start = min(n - 2, n - size) = 6 -> positions 0..6, two iterations each, then back to 0
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 0, 0]
    p = make_plan("sliding", n, size=size, iteration=0)
    assert p.trained_indices() == [0, 1, 2, 3] and torch.equal(p.sde, p.train)
    strided = [idx(make_plan("sliding", n, size=2, stride=3, shift_interval=1, iteration=it).train)[0]
               for it in range(5)]
    assert strided == [0, 3, 6, 0, 3]  # max_start = 8: starts 0, 3, 6 then roll back
    capped = [idx(make_plan("sliding", n, size=2, shift_interval=1, max_start=2, iteration=it).train)[0]
              for it in range(4)]
    assert capped == [0, 1, 2, 0]


def test_branch_marks_every_step_and_keeps_sorted_unique_branch_points():
    p = make_plan("branch", 10, branch_steps=[6, 0, 3, 3])
    assert p.branch_steps == [0, 3, 6] and p.sde.all() and p.train.all()
    assert make_plan("branch", 10).branch_steps == [0, 3, 6, 9]


def test_subsample_draws_a_reproducible_random_subset():
    p = make_plan("subsample", 10, fraction=0.6, generator=gen(0))
    assert p.sde.all() and len(p.trained_indices()) == 5 and 9 not in p.trained_indices()  # int(9 * 0.6)
    assert torch.equal(p.train, make_plan("subsample", 10, fraction=0.6, generator=gen(0)).train)


def test_train_is_a_subset_of_sde_for_every_schedule():
    for name in ["all", "fraction", "window", "sliding", "branch", "subsample"]:
        p = make_plan(name, 10, generator=gen(1), iteration=5)
        assert isinstance(p, StepPlan) and p.num_steps == 10
        assert not (p.train & ~p.sde).any(), name


@pytest.mark.parametrize("name, kwargs, match", [
    ("nope", {}, r"unknown schedule 'nope'.*Registered: .*window"),
    ("all", {"num_steps": 0}, r"num_steps must be a positive integer, got 0"),
    ("window", {"num_steps": 0}, r"num_steps must be a positive integer"),
    ("all", {"fraction": 0.0}, r"fraction must be in \(0, 1\], got 0.0"),
    ("fraction", {"fraction": 1.5}, r"fraction must be in \(0, 1\]"),
    ("window", {"size": 0}, r"size=0 must fit .*1 <= size <= hi - lo <= num_steps"),
    ("window", {"size": 4, "lo": 3, "hi": 6}, r"size=4 must fit in range \[lo=3, hi=6\)"),
    ("window", {"hi": 11}, r"hi=11\) within num_steps=10"),
    ("window", {"lo": -1}, r"lo=-1"),
    ("sliding", {"size": 11}, r"size=11 must be in \[1, num_steps=10\]"),
    ("sliding", {"stride": 0}, r"stride \(0\) and shift_interval \(25\) must be >= 1"),
    ("sliding", {"shift_interval": 0}, r"shift_interval \(0\) must be >= 1"),
    ("branch", {"branch_steps": [0, 10]}, r"branch_steps \[0, 10\] must lie in \[0, num_steps=10\)"),
    ("subsample", {"fraction": -1}, r"fraction must be in \(0, 1\]"),
])
def test_bad_arguments_raise_value_errors_naming_them(name, kwargs, match):
    kwargs = {"num_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_plan(name, **kwargs)


def test_rollout_rejects_a_plan_of_another_length():
    adapter = TinyFlowAdapter.build(seed=0)
    with pytest.raises(ValueError, match=r"plan has 5 steps but num_steps=4"):
        sample(adapter, ["a"], num_steps=4, plan=make_plan("all", 5), decode=False)
