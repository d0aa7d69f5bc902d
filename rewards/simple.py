"""Model-free image rewards: JPEG (in)compressibility (DDPO), brightness and colour targets (for tests/demos).

Video input (``B,T,C,H,W``) is scored per frame and averaged over time.
"""

from __future__ import annotations

import io
import math
import numbers
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor

from flowalign.rewards._image import to_uint8_hwc
from flowalign.rewards.base import REWARDS, Reward

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
JPEG_MAX_SIDE = 65500  # libjpeg's JPEG_MAX_DIMENSION: a longer side cannot be encoded


def _per_frame(fn, x: Tensor) -> Tensor:
    if x.ndim == 5:
        b, t = x.shape[:2]
        return fn(x.reshape(b * t, *x.shape[2:])).reshape(b, t).mean(1)
    return fn(x)


def jpeg_kilobytes(images: Tensor, quality: int = 95) -> Tensor:
    """Size in kB (``bytes/1000``) of each image saved as JPEG at ``quality`` (DDPO ``rewards.py``).

    ``images``: ``B,C,H,W`` float in [0, 1] with ``C in {1, 3}``; sides up to 65,500 px (the JPEG format's limit)."""
    h, w = images.shape[-2:]
    if max(h, w) > JPEG_MAX_SIDE:
        raise ValueError(f"images of {h}x{w} cannot be JPEG-encoded: a JPEG side is at most {JPEG_MAX_SIDE} px")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"JPEG encodes 1 (grey) or 3 (RGB) channels, got shape {tuple(images.shape)} (B,C,H,W)")
    sizes = []
    for a in to_uint8_hwc(images):
        buf = io.BytesIO()
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes)


@REWARDS.register("jpeg_compressibility")
class JpegCompressibility(Reward):
    """``−kB / divisor`` of the JPEG (q=95) file: DDPO uses ``divisor=1``, Flow-GRPO ``divisor=500``."""

    name = "jpeg_compressibility"
    accepts_video = True
    sign = -1.0

    def __init__(self, quality: int = 95, divisor: float = 1.0, device: str | torch.device = "cpu",
                 batch_size: int | None = 64) -> None:
        super().__init__(device=device, batch_size=batch_size)
        if isinstance(quality, bool) or not isinstance(quality, numbers.Integral) or not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be an integer in [1, 100] (Pillow's scale; DDPO uses 95), "
                             f"got {quality!r}")
        divisor = float(divisor)
        if not math.isfinite(divisor) or divisor <= 0:
            raise ValueError(f"divisor must be a finite number > 0, got {divisor}")
        self.quality, self.divisor = int(quality), divisor

    def score(self, inputs: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        return self.sign * _per_frame(lambda x: jpeg_kilobytes(x, self.quality), inputs) / self.divisor


@REWARDS.register("jpeg_incompressibility")
class JpegIncompressibility(JpegCompressibility):
    """``+kB / divisor`` of the JPEG (q=95) file (DDPO)."""

    name = "jpeg_incompressibility"
    sign = 1.0


@REWARDS.register("brightness")
class Brightness(Reward):
    """Mean BT.601 luma ``Y = .299R + .587G + .114B`` in [0,1]; with ``target``: ``−|mean Y − target|``.
    Differentiable."""

    name = "brightness"
    differentiable = True
    accepts_video = True

    def __init__(self, target: float | None = None, device: str | torch.device = "cpu",
                 batch_size: int | None = None) -> None:
        super().__init__(device=device, batch_size=batch_size)
        if target is not None and not (isinstance(target, numbers.Real) and 0 <= target <= 1):
            raise ValueError(f"brightness target must be a number in [0, 1] (mean luma) or None, got {target!r}")
        self.target = target

    def _luma(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            y = x[:, 0]
        else:
            y = sum(w * x[:, c] for c, w in enumerate(LUMA))
        m = y.mean(dim=(-2, -1))
        return m if self.target is None else -(m - self.target).abs()

    def score(self, inputs: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        return _per_frame(self._luma, inputs)


@REWARDS.register("color_target")
class ColorTarget(Reward):
    """``1 − mean_pixels ‖x − c‖₂ / √3`` for a target RGB colour ``c`` in [0,1]³ (1 = every pixel is ``c``).
    Differentiable (squared-distance inside a smoothed norm, ``√(d² + 1e-12)``)."""

    name = "color_target"
    differentiable = True
    accepts_video = True

    def __init__(self, color: Sequence[float] = (1.0, 0.0, 0.0), device: str | torch.device = "cpu",
                 batch_size: int | None = None) -> None:
        super().__init__(device=device, batch_size=batch_size)
        if len(color) != 3 or not all(isinstance(c, numbers.Real) and 0 <= c <= 1 for c in color):
            raise ValueError(f"color must be an RGB triple in [0, 1], got {color!r}")
        self.color = tuple(float(c) for c in color)

    def _score(self, x: Tensor) -> Tensor:
        if x.shape[1] != 3:
            raise ValueError(f"color_target needs RGB images, got {x.shape[1]} channels")
        c = torch.tensor(self.color, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        dist = ((x - c).pow(2).sum(1) + 1e-12).sqrt()
        return 1 - dist.mean(dim=(-2, -1)) / 3 ** 0.5

    def score(self, inputs: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        return _per_frame(self._score, inputs)


@REWARDS.register("redness")
class Redness(Reward):
    """``mean(R − (G + B)/2)`` ∈ [−1, 1]: how red the image is. Differentiable."""

    name = "redness"
    differentiable = True
    accepts_video = True

    def score(self, inputs: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        def f(x: Tensor) -> Tensor:
            if x.shape[1] != 3:
                raise ValueError(f"redness needs RGB images, got {x.shape[1]} channels")
            return (x[:, 0] - (x[:, 1] + x[:, 2]) / 2).mean(dim=(-2, -1))

        return _per_frame(f, inputs)
