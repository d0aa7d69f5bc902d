"""HPSv2 / HPSv2.1 human preference score (differentiable).

score = ``cos(E_img(x), E_txt(p))`` (no logit scale) of an open_clip ViT-H-14 whose full state dict is the HPS
checkpoint ``{'state_dict': ...}`` (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` on ``xswu/HPSv2``).
Preprocessing (HPSv2 ``preprocess_val``): resize the longest side to 224 (bicubic) and zero-pad to square,
then OpenAI mean/std. Source: tgxs002/HPSv2 ``img_score.py``; reference/rewards.md §2.3. The checkpoint is read
with ``torch.load(weights_only=True)`` (or safetensors) and loaded with ``strict=True`` into plain open_clip.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import Tensor

from flowalign.rewards._image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TextFeatureCache, clip_preprocess
from flowalign.rewards.base import REWARDS, Reward
from flowalign.rewards.clip import freeze, open_clip_name

HPS_VERSIONS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_REPO = "xswu/HPSv2"


def load_checkpoint_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a ``.pt``/``.pth``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors`` state dict;
    unwraps ``{'state_dict': ...}`` and a DDP ``module.`` prefix."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def resolve_hps_checkpoint(checkpoint: str | os.PathLike, cache_dir: str | None = None) -> str:
    """``v2.0``/``v2.1`` -> the hub file (``hf_hub_download``); a folder -> the HPS file inside; a file as is."""
    checkpoint = str(checkpoint)
    if checkpoint in HPS_VERSIONS:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(HPS_REPO, HPS_VERSIONS[checkpoint], cache_dir=cache_dir)
    if os.path.isdir(checkpoint):
        for name in (*reversed(HPS_VERSIONS.values()), "model.safetensors"):
            if os.path.isfile(os.path.join(checkpoint, name)):
                return os.path.join(checkpoint, name)
        raise FileNotFoundError(f"no {' or '.join(HPS_VERSIONS.values())} in {checkpoint}")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"HPS checkpoint {checkpoint!r} is neither a file, a folder nor one of "
                                f"{sorted(HPS_VERSIONS)}")
    return checkpoint


@REWARDS.register("hpsv2")
class HPSv2(Reward):
    """HPSv2/v2.1: ``cos(img, text)`` of the HPS-finetuned open_clip ViT-H-14; differentiable."""

    name = "hpsv2"
    differentiable = True

    def __init__(self, checkpoint: str | os.PathLike = "v2.1", model: str | os.PathLike = "ViT-H-14", *,
                 device: str | torch.device = "cpu", batch_size: int | None = 32,
                 dtype: torch.dtype = torch.float32, cache_dir: str | None = None) -> None:
        import open_clip

        super().__init__(device=device, batch_size=batch_size)
        name = open_clip_name(model)
        self.model = open_clip.create_model(name, pretrained=None)
        sd = load_checkpoint_state_dict(resolve_hps_checkpoint(checkpoint, cache_dir))
        self.model.load_state_dict(sd, strict=True)
        freeze(self.model)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.image_size = self.model.visual.image_size
        self.dtype = dtype
        self.text_cache = TextFeatureCache(self.text_features)
        self.to(self.device, dtype)

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike, **kwargs: Any) -> "HPSv2":
        """Load an HPS checkpoint file/folder (or ``"v2.0"``/``"v2.1"`` from the hub) onto ``model``."""
        return cls(checkpoint, **kwargs)

    def preprocess(self, images: Tensor) -> Tensor:
        return clip_preprocess(images.to(self.device, self.dtype), self.image_size, OPENAI_CLIP_MEAN,
                               OPENAI_CLIP_STD, "bicubic", "longest")

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(list(prompts)).to(self.device), normalize=True)

    def score(self, inputs: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        txt = self.text_cache(prompts, self.dtype, self.device)
        img = self.model.encode_image(self.preprocess(inputs), normalize=True)
        return (img * txt.to(img.dtype)).sum(-1)
