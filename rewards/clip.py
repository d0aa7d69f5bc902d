"""CLIP score on open_clip models (differentiable).

score = ``scale · cos(E_img(x), E_txt(p))``, optionally ``max(·, 0)``; defaults give the raw cosine used by
Pref-GRPO's ``clip_reward.py`` (open_clip ViT-H-14). Hessel et al.'s CLIPScore is ``scale=2.5, clamp=True``;
torchmetrics' is ``scale=100, clamp=True``. Preprocessing is open_clip's eval transform (resize shortest side,
bicubic, center crop, normalise with the checkpoint's mean/std) done in torch so gradients reach the pixels.
Source: reference/rewards.md §2.1; ``open_clip.create_model`` with a local folder (``local-dir:``),
``hf-hub:`` id or built-in name + pretrained tag.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import Tensor

from flowalign.rewards._image import TextFeatureCache, clip_preprocess
from flowalign.rewards.base import REWARDS, Reward


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no parameter gradients: reward models are fixed, only pixels get gradients."""
    module.eval()
    module.requires_grad_(False)
    return module


def open_clip_name(model: str | os.PathLike) -> str:
    """A local folder with ``open_clip_config.json`` becomes ``local-dir:<folder>``; a ``.json`` file is
    registered with ``open_clip.add_model_config`` and its stem returned; anything else is passed through."""
    import open_clip

    model = str(model)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "open_clip_config.json")):
            raise FileNotFoundError(f"{model} has no open_clip_config.json; save the model with open_clip's "
                                    "hub layout (open_clip_config.json + open_clip_model.safetensors)")
        return "local-dir:" + os.path.abspath(model)
    if model.endswith(".json") and os.path.isfile(model):
        open_clip.add_model_config(model)
        return os.path.splitext(os.path.basename(model))[0]
    return model


def load_open_clip(model: str | os.PathLike, pretrained: str | None = None, cache_dir: str | None = None):
    """``(model, tokenizer, preprocess_cfg)`` from an open_clip name/tag, ``hf-hub:`` id, local folder or JSON."""
    import open_clip

    name = open_clip_name(model)
    net = open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir)
    tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
    cfg = dict(getattr(net.visual, "preprocess_cfg", {}) or {})
    cfg.setdefault("size", net.visual.image_size)
    return freeze(net), tokenizer, cfg


@REWARDS.register("clip_score")
class CLIPScore(Reward):
    """open_clip CLIP score ``scale · cos(img, text)`` (clamped at 0 when ``clamp``); differentiable."""

    name = "clip_score"
    differentiable = True

    def __init__(self, model: str | os.PathLike = "ViT-H-14", pretrained: str | None = "laion2b_s32b_b79k", *,
                 scale: float = 1.0, clamp: bool = False, device: str | torch.device = "cpu",
                 batch_size: int | None = 32, dtype: torch.dtype = torch.float32,
                 cache_dir: str | None = None) -> None:
        super().__init__(device=device, batch_size=batch_size)
        if os.path.isdir(str(model)) or str(model).startswith("hf-hub:"):
            pretrained = None
        self.model, self.tokenizer, self.preprocess_cfg = load_open_clip(model, pretrained, cache_dir)
        self.scale, self.clamp, self.dtype = float(scale), bool(clamp), dtype
        self.text_cache = TextFeatureCache(self.text_features)
        self.to(self.device, dtype)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **kwargs: Any) -> "CLIPScore":
        """Load from a local open_clip folder, an ``hf-hub:org/repo`` id, or a built-in name (+ ``pretrained``)."""
        return cls(path_or_id, **kwargs)

    def preprocess(self, images: Tensor) -> Tensor:
        c = self.preprocess_cfg
        return clip_preprocess(images.to(self.device, self.dtype), c["size"], c.get("mean", (0.48145466, 0.4578275,
                               0.40821073)), c.get("std", (0.26862954, 0.26130258, 0.27577711)),
                               c.get("interpolation", "bicubic"), c.get("resize_mode", "shortest"))

    def image_features(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings ``[B, D]``."""
        return self.model.encode_image(self.preprocess(images), normalize=True)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings ``[B, D]``."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True)

    def score(self, inputs: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        txt = self.text_cache(prompts, self.dtype, self.device)
        img = self.image_features(inputs)
        s = self.scale * (img * txt.to(img.dtype)).sum(-1)
        return s.clamp_min(0) if self.clamp else s
