"""ImageReward v1.0 — a port onto transformers' BLIP classes (no ``image-reward`` package needed).

Architecture (THUDM/ImageReward ``ImageReward.py``): BLIP ViT-L/16 image encoder (``BlipVisionModel``, LayerNorm
eps 1e-6 as BLIP's ``vit.py``) -> BERT-base text encoder with cross-attention to the image tokens
(``BlipTextModel``, the port of BLIP's ``med.py``) -> ``[CLS]`` feature -> 5-layer MLP without activations.

score = ``(MLP(h_CLS) − 0.16717362830052426) / 1.0333394966054072``

Text: ``BertTokenizer('bert-base-uncased')`` plus ``[DEC]`` (bos) and ``[ENC]``, ``padding='max_length'``,
``max_length=35``. Image: resize shortest side 224 (bicubic), center crop, OpenAI mean/std — done in torch, so the
reward is differentiable (ImageReward's ``score_gard``/ReFL path). The released ``ImageReward.pt`` (keys ``blip.*``,
``mlp.*``) is remapped onto the transformers module names and loaded with ``strict=True`` (only BLIP's unused
``vision_proj``/``text_proj`` and the ``position_ids`` buffer are dropped). Source: reference/rewards.md §2.4.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from torch import Tensor, nn

from flowalign.rewards._image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess, unique_prompts
from flowalign.rewards.base import REWARDS, Reward
from flowalign.rewards.clip import freeze
from flowalign.rewards.hps import load_checkpoint_state_dict

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_REPO = "THUDM/ImageReward"
BLIP_VIT = {  # BLIP create_vit(): patch 16, mlp_ratio 4, qkv_bias, LayerNorm eps 1e-6
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}

_VISION_RULES = [  # original BLIP ViT name -> transformers BlipVisionModel name
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]
_VISION_INVERSE = [
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise KeyError(f"no mapping for BLIP vision key {key!r}")


class ImageRewardMLP(nn.Module):
    """``Linear(768,1024) Drop(.2) Linear(1024,128) Drop(.2) Linear(128,64) Drop(.1) Linear(64,16) Linear(16,1)``."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """BLIP vision tower + cross-attention BERT + MLP head, on transformers' BLIP modules."""

    def __init__(self, med_config: dict[str, Any], vit: str | dict[str, Any] = "large", image_size: int = 224):
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        super().__init__()
        vcfg = dict(BLIP_VIT[vit]) if isinstance(vit, str) else dict(vit)
        vcfg.setdefault("image_size", image_size)
        vcfg.setdefault("patch_size", 16)
        vcfg.setdefault("layer_norm_eps", 1e-6)
        vcfg.setdefault("hidden_act", "gelu")
        self.vision = BlipVisionModel(BlipVisionConfig(**vcfg))
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                "layer_norm_eps", "initializer_range", "pad_token_id")
        tcfg = {k: med_config[k] for k in keys if k in med_config}
        # BLIP_Pretrain sets encoder_width = vision width, whatever med_config.json says
        vocab = tcfg.get("vocab_size", 30524)
        for k, v in (("bos_token_id", 30522), ("sep_token_id", 102), ("eos_token_id", 2)):  # BlipTextConfig's
            tcfg.setdefault(k, med_config.get(k, v if v < vocab else None))
        self.text = BlipTextModel(BlipTextConfig(**tcfg, encoder_hidden_size=vcfg["hidden_size"], is_decoder=True),
                                  add_pooling_layer=False)
        self.mlp = ImageRewardMLP(tcfg.get("hidden_size", 768))
        self.image_size = vcfg["image_size"]

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts, is_decoder=False)
        cls = out.last_hidden_state[:, 0, :]
        return ((self.mlp(cls) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


def from_original_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map ``ImageReward.pt`` keys onto ``ImageRewardModel``; drops BLIP's unused projections and buffers."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith("blip.visual_encoder."):
            out["vision." + _rename(key[len("blip.visual_encoder."):], _VISION_RULES)] = value
        elif key.startswith("blip.text_encoder."):
            sub = key[len("blip.text_encoder."):]
            if sub.endswith("position_ids"):
                continue
            out["text." + sub] = value
        elif key.startswith("mlp."):
            out[key] = value
        elif key.startswith(("blip.vision_proj.", "blip.text_proj.")):
            continue
        else:
            raise KeyError(f"unexpected key {key!r} in the ImageReward checkpoint")
    return out


def to_original_state_dict(model: ImageRewardModel) -> dict[str, Tensor]:
    """Inverse of ``from_original_state_dict`` (plus BLIP's unused keys), to write ``ImageReward.pt`` files."""
    sd: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision."):
            sd["blip.visual_encoder." + _rename(key[len("vision."):], _VISION_INVERSE)] = value
        elif key.startswith("text."):
            sd["blip.text_encoder." + key[len("text."):]] = value
        else:
            sd[key] = value
    n_pos = model.text.config.max_position_embeddings
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(n_pos).expand(1, -1)
    width, vwidth = model.text.config.hidden_size, model.vision.config.hidden_size
    sd.update({"blip.vision_proj.weight": torch.zeros(256, vwidth), "blip.vision_proj.bias": torch.zeros(256),
               "blip.text_proj.weight": torch.zeros(256, width), "blip.text_proj.bias": torch.zeros(256)})
    return sd


def load_blip_tokenizer(path_or_id: str | os.PathLike):
    """``BertTokenizer`` (local folder with ``vocab.txt`` or hub id) with BLIP's ``[DEC]`` bos and ``[ENC]``."""
    from transformers import BertTokenizer

    path_or_id = str(path_or_id)
    vocab = os.path.join(path_or_id, "vocab.txt")
    if os.path.isdir(path_or_id) and not os.path.isfile(os.path.join(path_or_id, "tokenizer_config.json")):
        tok = BertTokenizer(vocab_file=vocab, do_lower_case=True)
    else:
        tok = BertTokenizer.from_pretrained(path_or_id)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def _resolve(path_or_id: str, filename: str, cache_dir: str | None) -> str:
    if os.path.isdir(path_or_id):
        f = os.path.join(path_or_id, filename)
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{filename} not found in {path_or_id}")
        return f
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path_or_id, filename, cache_dir=cache_dir)


@REWARDS.register("imagereward")
class ImageReward(Reward):
    """ImageReward v1.0: ``(MLP(BLIP(img, text)[CLS]) − μ) / σ``; differentiable (ReFL)."""

    name = "imagereward"
    differentiable = True

    def __init__(self, model: str | os.PathLike = IMAGEREWARD_REPO, *, med_config: str | os.PathLike | None = None,
                 tokenizer: str | os.PathLike | None = None, vit: str | dict[str, Any] = "large",
                 device: str | torch.device = "cpu", batch_size: int | None = 32,
                 dtype: torch.dtype = torch.float32, cache_dir: str | None = None) -> None:
        super().__init__(device=device, batch_size=batch_size)
        model = str(model)
        if model == "ImageReward-v1.0":
            model = IMAGEREWARD_REPO
        if os.path.isfile(model):  # a bare ImageReward.pt: med_config beside it or given
            ckpt, folder = model, os.path.dirname(model)
        else:
            ckpt, folder = _resolve(model, "ImageReward.pt", cache_dir), model
        med_path = str(med_config) if med_config else _resolve(folder, "med_config.json", cache_dir)
        with open(med_path) as f:
            med = json.load(f)
        if tokenizer is None:
            tokenizer = folder if os.path.isfile(os.path.join(folder, "vocab.txt")) else "bert-base-uncased"
        self.tokenizer = load_blip_tokenizer(tokenizer)
        if len(self.tokenizer) > med["vocab_size"]:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens but med_config vocab_size is "
                             f"{med['vocab_size']}")
        self.model = ImageRewardModel(med, vit)
        self.model.load_state_dict(from_original_state_dict(load_checkpoint_state_dict(ckpt)), strict=True)
        freeze(self.model)
        self.dtype = dtype
        self.to(self.device, dtype)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike = IMAGEREWARD_REPO, **kwargs: Any) -> "ImageReward":
        """Folder (or hub repo) with ``ImageReward.pt`` + ``med_config.json`` (+ optional ``vocab.txt``)."""
        return cls(path_or_id, **kwargs)

    def score(self, inputs: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        uniq, idx = unique_prompts(prompts)
        tok = self.tokenizer(uniq, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        ids, mask = tok.input_ids[idx].to(self.device), tok.attention_mask[idx].to(self.device)
        px = clip_preprocess(inputs.to(self.device, self.dtype), self.model.image_size, OPENAI_CLIP_MEAN,
                             OPENAI_CLIP_STD, "bicubic", "shortest")
        return self.model(px, ids, mask)
