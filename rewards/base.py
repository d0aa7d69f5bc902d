"""The reward protocol: ``Reward.__call__(images, prompts, metadata) -> Tensor[B]``.

* Image rewards take ``images`` float in [0, 1], ``B,C,H,W`` (video ``B,T,C,H,W``).
* Text rewards (``modality = "text"``) take ``completions`` (list of str) and optional ``answers``.
* ``name``, ``differentiable``, ``device`` and ``batch_size`` are attributes. ``__call__`` validates the input,
  micro-batches it by ``batch_size`` and calls ``score`` on each chunk, so any batch size works within the
  memory cap of one chunk.
* ``differentiable=False`` rewards refuse inputs that require grad (a clear error instead of a silent zero grad).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from flowalign.registry import Registry

REWARDS: Registry[type["Reward"]] = Registry("reward", entry_point_group="flowalign.rewards")


def check_images(images: Tensor, name: str = "images") -> Tensor:
    """Validate a float image batch in [0, 1], ``B,C,H,W`` or ``B,T,C,H,W``."""
    if not torch.is_tensor(images):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim not in (4, 5):
        raise ValueError(f"{name} must be B,C,H,W or B,T,C,H,W, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be float in [0, 1], got dtype {images.dtype}; divide uint8 images by 255")
    if images.numel():
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if not (lo >= -1e-4 and hi <= 1 + 1e-4):
            raise ValueError(
                f"{name} must be in [0, 1], got range [{lo:.3f}, {hi:.3f}]; if they are in [-1, 1] pass (x + 1) / 2"
            )
    return images


class Reward:
    """Base class: subclasses implement ``score`` on one micro-batch."""

    name: ClassVar[str] = "reward"
    modality: ClassVar[str] = "image"  # "image" | "video" | "text"
    differentiable: ClassVar[bool] = False

    def __init__(self, device: str | torch.device = "cpu", batch_size: int | None = 32) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size

    def score(self, inputs, prompts: list[str], metadata: list[dict]) -> Tensor:
        raise NotImplementedError

    def __call__(self, images=None, prompts: Sequence[str] | None = None, metadata: Sequence[dict] | None = None,
                 *, completions: Sequence[str] | None = None, answers: Sequence[Any] | None = None) -> Tensor:
        if self.modality == "text":
            inputs = list(completions if completions is not None else images)
            n = len(inputs)
            if answers is not None:
                metadata = [dict(m or {}, answer=a) for m, a in zip(metadata or [{}] * n, answers)]
        else:
            inputs = check_images(images)
            n = inputs.shape[0]
            if inputs.requires_grad and not self.differentiable:
                raise ValueError(
                    f"reward {self.name!r} is not differentiable but got images with requires_grad=True; "
                    "detach them or use a differentiable reward (CLIP, PickScore, HPS, aesthetic)"
                )
        prompts = list(prompts) if prompts is not None else [""] * n
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(f"got {n} inputs but {len(prompts)} prompts and {len(metadata)} metadata entries")
        bs = self.batch_size or n or 1
        outs = [
            self.score(inputs[i : i + bs], prompts[i : i + bs], metadata[i : i + bs]).float().reshape(-1)
            for i in range(0, n, bs)
        ]
        out = torch.cat(outs) if outs else torch.zeros(0)
        if out.shape != (n,):
            raise RuntimeError(f"reward {self.name!r} returned shape {tuple(out.shape)}, expected ({n},)")
        return out
