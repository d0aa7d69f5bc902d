"""Trainable-weight plumbing of the trainer: peft LoRA settings and injection, the reference policy, weight I/O.

The reference policy for KL terms is the same network with the LoRA adapters disabled (flow_grpo
``disable_adapter()``, ``lora_disabled``); for full fine-tuning a frozen copy of the initial weights is swapped in
(``weights_swapped``; ``weights_copied`` under FSDP). Trainable weights are saved and loaded by parameter name, as
whole tensors (``load_trainable``), so LoRA files and full fine-tuning checkpoints share one layout.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from flowalign.distributed import shard_like

if TYPE_CHECKING:
    from flowalign.adapter import Adapter
    from flowalign.config import Config


def lora_settings(cfg: Config, adapter: Adapter) -> dict[str, Any]:
    """Rank/alpha/targets: the config's, else the adapter family's defaults (flow_grpo: SD3/Wan r32/a64 attention,
    FLUX r64/a128 attention + FF). Overriding only the rank keeps the adapter's alpha/rank ratio."""
    lo = cfg.model.lora
    rank = lo.rank or adapter.lora_rank
    alpha = lo.alpha if lo.alpha is not None else adapter.lora_alpha * rank / adapter.lora_rank
    targets = lo.target_modules or list(adapter.lora_target_modules)
    if not targets:
        raise ValueError(f"adapter {type(adapter).__name__} declares no lora_target_modules; "
                         "set model.lora.target_modules")
    init: Any = {"default": True, "true": True, "false": False}.get(str(lo.init).lower(), lo.init)
    return {"r": int(rank), "lora_alpha": float(alpha), "target_modules": targets, "init_lora_weights": init,
            "lora_dropout": lo.dropout}


def apply_lora(module: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """Freeze ``module`` and inject peft LoRA layers in place (the adapter keeps calling the same module)."""
    from peft import LoraConfig, inject_adapter_in_model

    module.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(**settings), module, adapter_name="default")
    for n, p in module.named_parameters():
        p.requires_grad_("lora_" in n)
    return module


def tuner_layers(module: nn.Module) -> list:
    """The peft tuner (LoRA) layers inside ``module``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def lora_disabled(module: nn.Module, layers: list | None = None) -> Iterator[None]:
    """The base model: every peft tuner layer of ``module`` bypassed (flow_grpo ``disable_adapter()``)."""
    layers = tuner_layers(module) if layers is None else layers
    flags = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, was_disabled in zip(layers, flags):
            m.enable_adapters(not was_disabled)


@contextlib.contextmanager
def weights_swapped(params: list[nn.Parameter], frozen: list[torch.Tensor]) -> Iterator[None]:
    """Point ``params`` at ``frozen`` tensors (full fine-tuning reference) and back; no copies."""
    live = [p.data for p in params]
    for p, f in zip(params, frozen):
        p.data = f
    try:
        yield
    finally:
        for p, d in zip(params, live):
            p.data = d


@contextlib.contextmanager
@torch.no_grad()
def weights_copied(params: list[nn.Parameter], frozen: list[torch.Tensor]) -> Iterator[None]:
    """``weights_swapped`` for FSDP: sharded parameters must be written in place (FSDP all-gathers from their own
    storage, a ``.data`` swap would go unseen); restored bit-exactly."""
    live = [p.detach().clone() for p in params]
    for p, f in zip(params, frozen):
        p.copy_(f)
    try:
        yield
    finally:
        for p, d in zip(params, live):
            p.copy_(d)


def load_trainable(path: str, names: list[str], params: list[torch.Tensor]) -> None:
    """Copy the tensors named ``names`` from a safetensors file (or a checkpoint folder's ``weights.safetensors``)
    into ``params`` in place, laid out like them (FSDP shards); every name must be present."""
    from safetensors.torch import load_file

    p = Path(path)
    file = p / "weights.safetensors" if p.is_dir() else p
    state = load_file(str(file))
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{file} lacks {len(missing)} trainable parameters, e.g. {missing[:3]}")
    with torch.no_grad():
        for n, prm in zip(names, params):
            prm.copy_(shard_like(state[n], prm))
