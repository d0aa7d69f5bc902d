"""Model variants for evaluation: a base adapter spec plus optional trained weights (LoRA or full).

``--model`` is ``ADAPTER:PATH`` (``sd3:/models/sd3.5m``, ``shapes:pipelines/weights/shapes``) or a diffusers
folder whose ``model_index.json`` names a pipeline class some registered adapter wraps. ``--lora`` is one of

* a peft folder (``adapter_config.json`` + ``adapter_model.safetensors``, what ``save_pretrained`` writes);
* a flowalign checkpoint (``checkpoint-N/`` with ``weights.safetensors``, optional ``ema.safetensors`` and
  ``state.json``, as ``flowalign/checkpoint.py`` writes for ``flowalign/trainer.py``): the LoRA settings are the
  trainer's ``state.json["lora"]`` (peft ``LoraConfig`` kwargs), the weights its trainable parameters by name;
* a bare ``.safetensors`` file of trainable weights: rank and targets are read off the ``lora_A`` tensors, alpha
  is the adapter's default ratio (``lora_alpha * r / lora_rank``, the trainer's default).

Without LoRA tensors the file holds fully fine-tuned weights, loaded into the module by name. The EMA weights are
used when present (the trainer's ``eval.use_ema`` default; flow_grpo saves EMA weights) unless ``use_ema=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from flowalign.adapter import ADAPTERS, Adapter, adapter_for_pipeline, get_adapter, resolve_dtype

_PREFIXES = ("base_model.model.", "transformer.", "unet.", "module.")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.(?P<name>[^.]+))?\.weight$")


def load_adapter(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 **kwargs) -> Adapter:
    """The base adapter of ``"ADAPTER:PATH"`` or of a diffusers folder (matched on ``model_index.json``): the class
    comes from the core's registry (``get_adapter`` / ``adapter_for_pipeline``), loaded with its ``from_pretrained``.

    ``kwargs`` (``--model-arg``) go to the adapter's constructor when it takes them (``height``, ``width``,
    ``num_frames`` of the Wan adapter), the rest to ``from_pretrained`` (the trainer's ``model.kwargs``)."""
    name, sep, path = spec.partition(":")
    if sep and name.isidentifier() and not Path(spec).exists():
        cls = get_adapter(name)  # unknown names raise with the registered ones and the closest match
    else:
        path, cls = spec, None
        index = Path(spec) / "model_index.json"
        if index.is_file():
            cls = adapter_for_pipeline(json.loads(index.read_text()).get("_class_name", ""))
        if cls is None:
            raise ValueError(f"--model {spec!r}: cannot tell which adapter loads it; write 'ADAPTER:PATH' with "
                             f"ADAPTER one of {', '.join(ADAPTERS.names()) or '(none registered)'}")
    return cls.from_pretrained(path, torch_dtype=resolve_dtype(dtype), device=device, **kwargs)


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _read_weights(path: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state dict, lora config overrides)`` of a peft folder, a flowalign checkpoint or a .safetensors file."""
    from safetensors.torch import load_file

    if path.is_file() and path.suffix == ".safetensors":
        return _strip(load_file(str(path))), {}
    if (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file():
        return _strip(load_file(str(path / "adapter_model.safetensors"))), {"peft_dir": str(path)}
    weights = path / ("ema.safetensors" if use_ema and (path / "ema.safetensors").is_file() else "weights.safetensors")
    if not weights.is_file():
        raise ValueError(f"--lora {str(path)!r} is neither a peft folder (adapter_config.json + adapter_model."
                         "safetensors), a flowalign checkpoint (weights.safetensors) nor a .safetensors file")
    extra = {}
    state_file = path / "state.json"
    if state_file.is_file():  # the trainer records its peft LoraConfig kwargs under "lora" (None: full fine-tune)
        lora = json.loads(state_file.read_text()).get("lora")
        if isinstance(lora, dict):
            extra["lora"] = lora
    return _strip(load_file(str(weights))), extra


def apply_lora(adapter: Adapter, ckpt: str | os.PathLike, use_ema: bool = True) -> Adapter:
    """Load trained weights (see module docstring) into ``adapter.trainable_module()`` in place; return the adapter.

    Every tensor must land somewhere: a key that matches no LoRA layer / parameter is an error, not a silently
    ignored weight."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    state, extra = _read_weights(Path(ckpt), use_ema)
    module = adapter.trainable_module()
    lora, other = {}, {}
    for k, v in state.items():
        m = _LORA_KEY.match(k)
        if m:
            lora[f"{m['module']}.{m['kind']}.weight"] = v
        else:
            other[k] = v
    if lora:
        if "peft_dir" in extra:
            config = LoraConfig.from_pretrained(extra["peft_dir"])
        elif "lora" in extra:
            keep = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")
            config = LoraConfig(**{k: v for k, v in extra["lora"].items() if k in keep})
        else:  # a bare file: rank and targets from the tensors, alpha as the trainer's default (same ratio)
            targets = sorted({k.rsplit(".", 2)[0] for k in lora if ".lora_A." in k})
            rank = int(next(v for k, v in lora.items() if ".lora_A." in k).shape[0])
            config = LoraConfig(r=rank, lora_alpha=float(adapter.lora_alpha * rank / adapter.lora_rank),
                                target_modules=targets)
        config.inference_mode = True
        inject_adapter_in_model(config, module, adapter_name="default")
        result = set_peft_model_state_dict(module, lora, adapter_name="default")
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if unexpected or missing:
            raise ValueError(f"--lora {str(ckpt)!r} does not fit {type(module).__name__}: {len(unexpected)} LoRA "
                             f"weights match no layer (e.g. {unexpected[:2]}), {len(missing)} LoRA layers get no "
                             f"weight (e.g. {missing[:2]})")
    if other:  # fully fine-tuned (or extra trained) parameters
        result = module.load_state_dict(other, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"--lora {str(ckpt)!r}: {len(result.unexpected_keys)} weights match no parameter of "
                             f"{type(module).__name__}, e.g. {result.unexpected_keys[:3]}")
    module.eval()
    return adapter


def _files_digest(path: Path, patterns: Sequence[str]) -> str:
    """Content hash of matching files (size + mtime for files above 64 MiB, to keep it cheap)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for pat in patterns for p in path.rglob(pat))
    for f in files:
        st = f.stat()
        h.update(f.name.encode() if f == path else str(f.relative_to(path)).encode())
        h.update(f.read_bytes() if st.st_size < (64 << 20) else f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


@dataclass
class Variant:
    """One model to evaluate: a base spec (``load_adapter``) and optional trained weights (``apply_lora``)."""

    name: str
    model: str
    lora: str | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    use_ema: bool = True
    model_kwargs: dict = field(default_factory=dict)

    def load(self) -> Adapter:
        adapter = load_adapter(self.model, self.device, self.dtype, **self.model_kwargs)
        return apply_lora(adapter, self.lora, self.use_ema) if self.lora else adapter

    def fingerprint(self) -> str:
        """Hash of what determines the weights: the spec, the local model's and the checkpoint's files."""
        parts = {"model": self.model, "dtype": str(self.dtype), "ema": self.use_ema, "kwargs": self.model_kwargs}
        name, sep, rest = self.model.partition(":")
        local = Path(rest if sep and name in ADAPTERS else self.model)
        if local.exists():
            parts["model_files"] = _files_digest(local, ("*.safetensors", "*.bin", "*.json"))
        if self.lora:
            parts["lora"] = _files_digest(Path(self.lora), ("*.safetensors", "*.json"))
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def variants_from_args(model: str, loras: Sequence[str] = (), names: Sequence[str] | None = None,
                       device: str = "cpu", dtype: torch.dtype = torch.float32, use_ema: bool = True,
                       model_kwargs: dict | None = None) -> list[Variant]:
    """``base`` plus one variant per checkpoint, named by its folder (``names`` overrides, base first)."""
    auto = ["base"]
    for lora in loras:
        p = Path(lora).resolve()
        if not p.exists():
            raise ValueError(f"--lora {lora!r} does not exist")
        stem = p.stem if p.name not in ("ema.safetensors", "weights.safetensors") else p.parent.name
        if stem in auto:
            stem = f"{p.parent.name}/{stem}"
        while stem in auto:
            stem += "'"
        auto.append(stem)
    names = list(names) if names else auto
    if len(names) != len(auto) or len(set(names)) != len(names):
        raise ValueError(f"--names needs {len(auto)} distinct names (base + one per --lora), got {names}")
    kw = dict(device=device, dtype=dtype, use_ema=use_ema, model_kwargs=dict(model_kwargs or {}))
    return [Variant(names[0], model, None, **kw)] + [Variant(n, model, str(lora), **kw)
                                                     for n, lora in zip(names[1:], loras)]


def adapter_fingerprint(adapter: Adapter) -> str:
    """Hash of the trainable module's weights (only the requires-grad ones when any: LoRA during training)."""
    module = adapter.trainable_module()
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad] or list(module.named_parameters())
    h = hashlib.sha256(type(adapter).__name__.encode())
    for n, p in params:
        h.update(n.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
