"""Image hand-off and torch (differentiable) preprocessing shared by the built-in scorers.

Hand-off convention of every alignment repo (flow_grpo, DDPO, DanceGRPO): the pipeline returns float ``B,C,H,W`` in
[0, 1]; non-differentiable rewards convert with ``(x*255).round().clamp(0,255).to(uint8)`` and transpose to ``HWC``.
Differentiable rewards do the CLIP-style resize/crop/normalise on the float tensor with torchvision ops, so
gradients reach the pixels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST, 3: InterpolationMode.BICUBIC, 2: InterpolationMode.BILINEAR,
    0: InterpolationMode.NEAREST,
}


def to_uint8_hwc(images: Tensor) -> np.ndarray:
    """``B,C,H,W`` float [0,1] -> ``B,H,W,C`` uint8 numpy via ``(x*255).round().clamp(0,255)``."""
    x = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: Tensor) -> list[Image.Image]:
    """``B,C,H,W`` float [0,1] -> list of RGB (or L for 1 channel) PIL images."""
    arr = to_uint8_hwc(images)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def as_rgb(images: Tensor) -> Tensor:
    """Repeat a grey channel to RGB; reject other channel counts with a clear error."""
    c = images.shape[1]
    if c == 3:
        return images
    if c == 1:
        return images.expand(-1, 3, -1, -1)
    raise ValueError(f"expected 1 or 3 image channels, got {c}")


def clip_preprocess(images: Tensor, size: int | Sequence[int], mean: Sequence[float] = OPENAI_CLIP_MEAN,
                    std: Sequence[float] = OPENAI_CLIP_STD, interpolation: str | int = "bicubic",
                    resize_mode: str = "shortest") -> Tensor:
    """CLIP eval transform on a float tensor (differentiable).

    ``shortest``: resize the shortest side to ``size`` then center-crop (open_clip / CLIPProcessor);
    ``longest``: resize the longest side and zero-pad to square (HPSv2 ``ResizeMaxSize``, see ``resize_max_pad``);
    ``squash``: resize both sides. Then ``(x - mean) / std``. Antialiased resize as PIL does.
    """
    x = as_rgb(images)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    interp = _INTERP[interpolation]
    if resize_mode == "longest":
        x = resize_max_pad(x, max(h, w), interpolation=interp)
    elif resize_mode == "squash":
        if x.shape[-2:] != (h, w):
            x = TF.resize(x, [h, w], interpolation=interp, antialias=True)
    elif resize_mode == "shortest":
        if min(x.shape[-2:]) != min(h, w):
            x = TF.resize(x, min(h, w), interpolation=interp, antialias=True)
        if x.shape[-2:] != (h, w):
            x = TF.center_crop(x, [h, w])
    else:
        raise ValueError(f"resize_mode must be 'shortest', 'longest' or 'squash', got {resize_mode!r}")
    return TF.normalize(x, list(mean), list(std))


def resize_max_pad(images: Tensor, size: int, interpolation: InterpolationMode = InterpolationMode.BICUBIC,
                   fill: float = 0.0) -> Tensor:
    """HPSv2 ``ResizeMaxSize``: scale so the longest side is ``size`` (bicubic), then pad to ``size x size`` with
    ``fill`` (left/top get half of the padding). Unlike the original we also pad when no resize was needed, so
    a 224 x 100 input becomes square instead of reaching the ViT with the wrong shape."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    x = images if (nh, nw) == (h, w) else TF.resize(images, [nh, nw], interpolation=interpolation, antialias=True)
    ph, pw = size - nh, size - nw
    if ph or pw:
        x = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)
    return x


def unique_prompts(prompts: Sequence[str]) -> tuple[list[str], Tensor]:
    """Deduplicate prompts (a GRPO group shares one): returns the unique list and the index of each prompt."""
    uniq: dict[str, int] = {}
    idx = [uniq.setdefault(p, len(uniq)) for p in prompts]
    return list(uniq), torch.tensor(idx, dtype=torch.long)


class TextFeatureCache:
    """Bounded LRU cache of per-prompt text embeddings (the text tower is frozen; prompts repeat across a GRPO
    group and across epochs). Keyed by prompt, dtype and device, so ``Reward.to`` invalidates nothing wrongly."""

    def __init__(self, encode, max_size: int = 4096) -> None:
        import threading
        from collections import OrderedDict

        self.encode, self.max_size = encode, max_size
        self._store: "OrderedDict[tuple, Tensor]" = OrderedDict()
        self._lock = threading.Lock()  # trainers call rewards from thread pools

    def __call__(self, prompts: Sequence[str], dtype: torch.dtype, device: torch.device) -> Tensor:
        uniq, idx = unique_prompts(prompts)
        with self._lock:
            missing = [p for p in uniq if (p, dtype, device) not in self._store]
            if missing:
                with torch.no_grad():
                    feats = self.encode(missing)
                for p, f in zip(missing, feats):
                    self._store[(p, dtype, device)] = f
            found = []
            for p in uniq:
                self._store.move_to_end((p, dtype, device))
                found.append(self._store[(p, dtype, device)])
            while len(self._store) > self.max_size:
                self._store.popitem(last=False)
        return torch.stack(found)[idx.to(device)]
