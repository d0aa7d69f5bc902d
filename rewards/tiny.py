"""Offline builders of tiny random-weight reward models, saved in the same layouts as the released weights.

Tests, demos and benchmarks build these in a temporary folder and then load them through the public loaders
(``CLIPScore.from_pretrained``, ``PickScore.from_pretrained``, ``HPSv2.from_pretrained``,
``AestheticScore.from_pretrained``, ``ImageReward.from_pretrained``), so the code path is the one users take with
downloaded weights. Real architectures (open_clip ``CLIP``, transformers ``CLIPModel``, BLIP), tiny sizes.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import torch

TINY_OPEN_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def _spread_linear_head(head: torch.nn.Module, gain: float = 2.0) -> None:
    """Re-draw the Linear layers of an activation-free MLP head with ``std = gain/sqrt(fan_in)`` so random scores
    vary across images instead of collapsing to a constant (the real heads are trained, these are not)."""
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, gain / m.in_features ** 0.5)
                m.bias.zero_()


def save_tiny_open_clip(path: str | os.PathLike, cfg: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """An open_clip folder in the hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors``)."""
    import open_clip
    from safetensors.torch import save_file

    cfg = cfg or TINY_OPEN_CLIP_CFG
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_file = path / "tiny-open-clip.json"
    config_file.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(config_file))
    _seed(seed)
    model = open_clip.create_model("tiny-open-clip", pretrained=None)
    config_file.unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    size = cfg["vision_cfg"]["image_size"]
    (path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg,
        "preprocess_cfg": {"size": size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                           "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
    }, indent=2))
    return path


def save_tiny_hps(path: str | os.PathLike, cfg: dict[str, Any] | None = None, seed: int = 1) -> tuple[Path, Path]:
    """``(checkpoint, model_config_json)``: an ``HPS_v2.1_compressed.pt`` (``{'state_dict': ...}``) for a tiny
    open_clip architecture written as ``tiny-hps.json`` (what ``ViT-H-14`` is for the real checkpoint)."""
    import open_clip

    cfg = cfg or TINY_OPEN_CLIP_CFG
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_file = path / "tiny-hps.json"
    config_file.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(config_file))
    _seed(seed)
    model = open_clip.create_model("tiny-hps", pretrained=None)
    ckpt = path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return ckpt, config_file


def write_clip_tokenizer_files(path: str | os.PathLike) -> None:
    """``vocab.json`` + ``merges.txt`` of the OpenAI CLIP BPE, derived from open_clip's packaged BPE file exactly
    as ``open_clip.tokenizer.SimpleTokenizer`` builds its vocabulary."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    path = Path(path)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def save_tiny_hf_clip(path: str | os.PathLike, projection_dim: int = 16, image_size: int = 16, seed: int = 2,
                      logit_scale: float | None = None) -> Path:
    """A transformers ``CLIPModel`` + ``CLIPProcessor`` folder (``save_pretrained`` layout, like PickScore_v1)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = CLIPConfig(
        text_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "intermediate_size": 64, "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "intermediate_size": 64, "image_size": image_size, "patch_size": 8},
        projection_dim=projection_dim,
    )
    _seed(seed)
    model = CLIPModel(cfg)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(float(torch.log(torch.tensor(logit_scale))))
    model.save_pretrained(path)
    write_clip_tokenizer_files(path)
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    from flowalign.rewards._image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    img = CLIPImageProcessor(size={"shortest_edge": image_size},
                             crop_size={"height": image_size, "width": image_size}, resample=3,
                             image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    CLIPProcessor(image_processor=img, tokenizer=tok).save_pretrained(path)
    return path


def save_tiny_aesthetic(path: str | os.PathLike, projection_dim: int = 16, seed: int = 3) -> Path:
    """A tiny CLIP folder plus ``sac+logos+ava1-l14-linearMSE.pth`` (a state dict saved with ``torch.save``)."""
    from flowalign.rewards.aesthetic import AESTHETIC_HEAD, AestheticMLP

    path = save_tiny_hf_clip(path, projection_dim=projection_dim, seed=seed)
    _seed(seed)
    head = AestheticMLP(projection_dim)
    _spread_linear_head(head, gain=1.3)
    with torch.no_grad():  # centre the head on the real predictor's typical range (~5)
        head.layers[7].bias.add_(5.0)
    torch.save(head.state_dict(), path / AESTHETIC_HEAD)
    return path


TINY_BLIP_VISION: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                    "intermediate_size": 64, "image_size": 16, "patch_size": 8,
                                    "initializer_range": 0.02}  # BlipVisionConfig's default 1e-10 zeroes the tower


def save_tiny_imagereward(path: str | os.PathLike, seed: int = 4) -> tuple[Path, dict[str, Any]]:
    """``(folder, vision_config)``: ``ImageReward.pt`` with the original BLIP key names (``blip.visual_encoder.*``,
    ``blip.text_encoder.*``, ``mlp.layers.*``), a tiny ``med_config.json`` and a BERT ``vocab.txt``.
    The real checkpoint's vision tower is hard-coded ViT-L/16; pass the returned ``vision_config`` as ``vit``."""
    from flowalign.rewards.imagereward import ImageRewardModel, to_original_state_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(4)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += list("abcdefghijklmnopqrstuvwxyz0123456789.,!?\"'") + [
        "a", "red", "blue", "green", "circle", "square", "cat", "dog", "photo", "of", "the", "on", "left", "right",
        "two", "three", "and", "in", "##s", "##ing", "##ed"]
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    (path / "vocab.txt").write_text("\n".join(seen) + "\n")
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert",
           "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
           "vocab_size": len(seen) + 2, "encoder_width": TINY_BLIP_VISION["hidden_size"],
           "add_cross_attention": True}
    (path / "med_config.json").write_text(json.dumps(med, indent=2))
    _seed(seed)
    model = ImageRewardModel(med, TINY_BLIP_VISION)
    _spread_linear_head(model.mlp, gain=1.0)
    torch.save(to_original_state_dict(model), path / "ImageReward.pt")
    return path, dict(TINY_BLIP_VISION)
