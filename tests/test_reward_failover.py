"""A remote reward over two replicas (``remote:http://a,http://b``): round-robin, fail-over when one is killed
mid-run; every row scored exactly once (server-side row counts), scores in order and equal to local scoring."""

from __future__ import annotations

import torch

from flowalign.rewards import get_reward
from flowalign.rewards.base import FunctionReward
from flowalign.rewards.server import start_server


def _counting(counter: list[int]) -> FunctionReward:
    def score(images, prompts, metadata):  # mean intensity: a deterministic reward, rows counted per server
        counter.append(len(images))
        return images.float().mean(dim=(1, 2, 3))

    return FunctionReward(score, name="mean_pixel")


def test_two_replicas_round_robin_and_failover_lose_nothing():
    rows_a, rows_b = [], []
    x = torch.rand(24, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = [f"p{i}" for i in range(24)]
    local = x.mean(dim=(1, 2, 3))
    with start_server(_counting(rows_a), lifetime=60, batch_window_ms=0) as a, \
            start_server(_counting(rows_b), lifetime=60, batch_window_ms=0) as b:
        r = get_reward(f"remote:{a.url},{b.url}", batch_size=4, retries=3, backoff=0.01, modality="image")
        assert r.urls == [a.url, b.url]
        first = r(x[:8], prompts[:8])  # two requests: one per replica (round-robin)
        assert r.served == {a.url: 1, b.url: 1} and sum(rows_a) == sum(rows_b) == 4
        a.stop()  # replica a dies mid-run
        rest = r(x[8:], prompts[8:])  # four requests; the one sent to a fails over to b
        got = torch.cat([first, rest])
    torch.testing.assert_close(got, local, atol=0, rtol=0)  # in order, nothing lost
    assert sum(rows_a) + sum(rows_b) == 24  # each row scored exactly once, no duplicates
    assert r.served[b.url] == 5 and r.failures[a.url] >= 1
