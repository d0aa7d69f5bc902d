"""Video rewards (``B,T,C,H,W`` float in [0,1]).

* ``per_frame``: any image reward applied to every ``frame_stride``-th frame, reduced over time by ``mean`` or
  ``min`` (the worst frame). Differentiable when the image reward is.
* ``temporal_consistency``: mean similarity of consecutive frames — pixel version
  ``1 − mean_t mean|f_t − f_{t−1}|`` (in [0,1]), or, with an ``embedder`` that has ``image_features`` (e.g. a
  ``CLIPScore``), the mean cosine of consecutive frame embeddings (VBench-style subject consistency).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowalign.rewards.base import REWARDS, Reward, get_reward


@REWARDS.register("per_frame")
class PerFrame(Reward):
    """``reduce_t r(frame_t, prompt)`` over frames ``t = 0, s, 2s, …`` with ``reduce ∈ {mean, min}``."""

    name = "per_frame"
    modality = "video"

    def __init__(self, reward: str | Reward, reduction: str = "mean", frame_stride: int = 1, *,
                 device: str | torch.device = "cpu", **reward_kwargs: Any) -> None:
        super().__init__(device=device, batch_size=None)  # the image reward micro-batches the frames
        if reduction not in ("mean", "min"):
            raise ValueError(f"reduction must be 'mean' or 'min', got {reduction!r}")
        self.reward = get_reward(reward, **reward_kwargs)
        if self.reward.modality != "image":
            raise ValueError(f"per_frame wraps image rewards, got {self.reward.name!r} ({self.reward.modality})")
        self.reduction, self.frame_stride = reduction, int(frame_stride)
        self.name = f"per_frame[{self.reward.name}]"  # type: ignore[misc]
        self.differentiable = self.reward.differentiable  # type: ignore[misc]

    def score(self, inputs: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        frames = inputs[:, :: self.frame_stride]
        b, t = frames.shape[:2]
        flat = frames.reshape(b * t, *frames.shape[2:])
        s = self.reward(flat, [p for p in prompts for _ in range(t)], [m for m in metadata for _ in range(t)])
        s = s.reshape(b, t)
        return s.mean(1) if self.reduction == "mean" else s.min(1).values

    def to(self, device=None, dtype=None) -> "PerFrame":
        self.reward.to(device, dtype)
        return super().to(device, dtype)


@REWARDS.register("temporal_consistency")
class TemporalConsistency(Reward):
    """Mean consecutive-frame similarity: ``1 − mean|f_t − f_{t−1}|`` or mean ``cos(E(f_t), E(f_{t−1}))``."""

    name = "temporal_consistency"
    modality = "video"
    differentiable = True

    def __init__(self, embedder: str | Reward | None = None, *, device: str | torch.device = "cpu",
                 batch_size: int | None = 16, **embedder_kwargs: Any) -> None:
        super().__init__(device=device, batch_size=batch_size)
        self.embedder = get_reward(embedder, **embedder_kwargs) if embedder is not None else None
        if self.embedder is not None:
            if not hasattr(self.embedder, "image_features"):
                raise ValueError(f"embedder {self.embedder.name!r} has no image_features(images) method")
            self.differentiable = self.embedder.differentiable  # type: ignore[misc]

    def score(self, inputs: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        b, t = inputs.shape[:2]
        if t < 2:
            return torch.ones(b, dtype=inputs.dtype, device=inputs.device)
        if self.embedder is None:
            return 1 - (inputs[:, 1:] - inputs[:, :-1]).abs().mean(dim=(2, 3, 4)).mean(1)
        emb = self.embedder.image_features(inputs.reshape(b * t, *inputs.shape[2:])).reshape(b, t, -1)
        emb = torch.nn.functional.normalize(emb, dim=-1)
        return (emb[:, 1:] * emb[:, :-1]).sum(-1).mean(1)
