"""PickScore (differentiable) and the transformers-CLIP helpers shared with the aesthetic predictor.

score = ``logit_scale.exp() · cos(E_img(x), E_txt(p)) / divisor`` with a transformers ``CLIPModel``
(``yuvalkirstain/PickScore_v1``, ViT-H/14) and the ``CLIPProcessor`` of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
``divisor=1`` is the PickScore README's score (≈18–24); Flow-GRPO uses ``divisor=26``. The image transform is
the processor's (resize shortest side, bicubic, center crop, OpenAI mean/std) rebuilt as torch ops so gradients
reach the pixels. Source: yuvalkirstain/PickScore README, flow_grpo ``pickscore_scorer.py``;
reference/rewards.md §2.2.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import Tensor

from flowalign.rewards._image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TextFeatureCache, clip_preprocess
from flowalign.rewards.base import REWARDS, Reward
from flowalign.rewards.clip import freeze


def features(out: Any) -> Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose ``pooler_output`` is the
    projected embedding (transformers 5)."""
    return out if torch.is_tensor(out) else out.pooler_output


def hf_image_transform(image_processor: Any) -> dict[str, Any]:
    """Read resize/crop/mean/std/resample of a ``CLIPImageProcessor`` into ``clip_preprocess`` kwargs."""

    def _get(obj, key, default=None):
        return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)

    size = getattr(image_processor, "size", None) or {"shortest_edge": 224}
    crop = getattr(image_processor, "crop_size", None) or size
    shortest = _get(size, "shortest_edge") or _get(size, "height") or 224
    crop_hw = (_get(crop, "height") or _get(crop, "shortest_edge") or shortest,
               _get(crop, "width") or _get(crop, "shortest_edge") or shortest)
    resample = getattr(image_processor, "resample", 3)
    resample = int(getattr(resample, "value", resample)) if resample is not None else 3
    do_crop = getattr(image_processor, "do_center_crop", True)
    return {
        "size": crop_hw if do_crop else (shortest, shortest),
        "resize_to": shortest,
        "mean": tuple(getattr(image_processor, "image_mean", None) or OPENAI_CLIP_MEAN),
        "std": tuple(getattr(image_processor, "image_std", None) or OPENAI_CLIP_STD),
        "interpolation": {2: "bilinear", 3: "bicubic", 0: "nearest"}.get(resample, "bicubic"),
    }


def hf_clip_preprocess(images: Tensor, t: dict[str, Any]) -> Tensor:
    """The processor's transform on a float tensor in [0,1] (no 1/255 rescale needed)."""
    if t["size"][0] != t["size"][1] or t["resize_to"] != t["size"][0]:
        import torchvision.transforms.v2.functional as TF

        from flowalign.rewards._image import _INTERP, as_rgb

        x = TF.resize(as_rgb(images), t["resize_to"], interpolation=_INTERP[t["interpolation"]], antialias=True)
        x = TF.center_crop(x, list(t["size"]))
        return TF.normalize(x, list(t["mean"]), list(t["std"]))
    return clip_preprocess(images, t["size"], t["mean"], t["std"], t["interpolation"], "shortest")


def load_hf_clip(model: str | os.PathLike, processor: str | os.PathLike | None, **hub_kwargs: Any):
    """``(CLIPModel, CLIPProcessor)`` via ``AutoModel``/``AutoProcessor.from_pretrained`` (local folder or hub id)."""
    from transformers import AutoModel, AutoProcessor

    net = AutoModel.from_pretrained(str(model), **hub_kwargs)
    proc = AutoProcessor.from_pretrained(str(processor or model), **hub_kwargs)
    return freeze(net), proc


@REWARDS.register("pickscore")
class PickScore(Reward):
    """PickScore ``logit_scale.exp() · cos(img, text) / divisor``; differentiable."""

    name = "pickscore"
    differentiable = True

    def __init__(self, model: str | os.PathLike = "yuvalkirstain/PickScore_v1",
                 processor: str | os.PathLike | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", *,
                 divisor: float = 1.0, use_logit_scale: bool = True, device: str | torch.device = "cpu",
                 batch_size: int | None = 32, dtype: torch.dtype = torch.float32, **hub_kwargs: Any) -> None:
        super().__init__(device=device, batch_size=batch_size)
        self.model, self.processor = load_hf_clip(model, processor, **hub_kwargs)
        self.transform = hf_image_transform(self.processor.image_processor)
        self.divisor, self.use_logit_scale, self.dtype = float(divisor), bool(use_logit_scale), dtype
        self.text_cache = TextFeatureCache(self.text_features)
        self.to(self.device, dtype)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, processor: str | os.PathLike | None = None,
                        **kwargs: Any) -> "PickScore":
        """Model and processor from one local folder / hub id (``processor`` may point elsewhere)."""
        return cls(path_or_id, processor or path_or_id, **kwargs)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        tok = self.processor.tokenizer(list(prompts), padding=True, truncation=True, max_length=77,
                                       return_tensors="pt").to(self.device)
        return torch.nn.functional.normalize(features(self.model.get_text_features(**tok)), dim=-1)

    def image_features(self, images: Tensor) -> Tensor:
        px = hf_clip_preprocess(images.to(self.device, self.dtype), self.transform)
        return torch.nn.functional.normalize(features(self.model.get_image_features(pixel_values=px)), dim=-1)

    def score(self, inputs: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        txt = self.text_cache(prompts, self.dtype, self.device)
        img = self.image_features(inputs)
        s = (img * txt.to(img.dtype)).sum(-1)
        if self.use_logit_scale:
            s = self.model.logit_scale.exp().to(s.dtype) * s
        return s / self.divisor
