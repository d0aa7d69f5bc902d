"""LAION aesthetic predictor v2 (differentiable).

score = ``MLP(normalize(E_img(x)))`` where ``E_img`` is CLIP ViT-L/14's projected image embedding (768-d,
transformers ``CLIPModel.get_image_features`` as DDPO/Flow-GRPO do) and the MLP is
``Linear(768,1024) Drop Linear(1024,128) Drop Linear(128,64) Drop Linear(64,16) Linear(16,1)`` with no activations
(``sac+logos+ava1-l14-linearMSE.pth``, keys ``layers.{0,2,4,6,7}``). Scale ≈1–10.
Source: christophschuhmann/improved-aesthetic-predictor, ddpo-pytorch ``aesthetic_scorer.py``;
reference/rewards.md §2.5.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from flowalign.rewards.base import REWARDS, Reward
from flowalign.rewards.clip import freeze
from flowalign.rewards.hps import load_checkpoint_state_dict
from flowalign.rewards.pickscore import features, hf_clip_preprocess, hf_image_transform, load_hf_clip

AESTHETIC_HEAD = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head (module names match the released ``.pth``)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embed: Tensor) -> Tensor:
        return self.layers(embed)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "AestheticMLP":
        """Load the head from a ``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` file, or a folder
        holding ``sac+logos+ava1-l14-linearMSE.pth``."""
        path = str(path)
        if os.path.isdir(path):
            path = os.path.join(path, AESTHETIC_HEAD)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"aesthetic head {path!r} not found; it ships as {AESTHETIC_HEAD} in "
                "christophschuhmann/improved-aesthetic-predictor (3.7 MB)")
        sd = load_checkpoint_state_dict(path)
        head = cls(sd["layers.0.weight"].shape[1])
        head.load_state_dict(sd, strict=True)
        return head


@REWARDS.register("aesthetic")
class AestheticScore(Reward):
    """LAION aesthetic v2: MLP on the L2-normalised CLIP ViT-L/14 image embedding; differentiable."""

    name = "aesthetic"
    differentiable = True

    def __init__(self, clip_model: str | os.PathLike = "openai/clip-vit-large-patch14",
                 head: str | os.PathLike = AESTHETIC_HEAD, processor: str | os.PathLike | None = None, *,
                 device: str | torch.device = "cpu", batch_size: int | None = 32,
                 dtype: torch.dtype = torch.float32, **hub_kwargs: Any) -> None:
        super().__init__(device=device, batch_size=batch_size)
        self.clip, self.processor = load_hf_clip(clip_model, processor, **hub_kwargs)
        self.transform = hf_image_transform(self.processor.image_processor)
        self.head = freeze(AestheticMLP.from_file(head))
        dim = self.clip.config.projection_dim
        if self.head.input_size != dim:
            raise ValueError(f"aesthetic head expects {self.head.input_size}-d embeddings but the CLIP model "
                             f"projects to {dim}")
        self.dtype = dtype
        self.to(self.device, dtype)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, head: str | os.PathLike | None = None,
                        **kwargs: Any) -> "AestheticScore":
        """CLIP model + processor from ``path``; the head from ``head`` or ``path/<head file>``."""
        return cls(path, head or os.path.join(str(path), AESTHETIC_HEAD), **kwargs)

    def score(self, inputs: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        px = hf_clip_preprocess(inputs.to(self.device, self.dtype), self.transform)
        emb = torch.nn.functional.normalize(features(self.clip.get_image_features(pixel_values=px)), dim=-1)
        return self.head(emb).squeeze(-1)
