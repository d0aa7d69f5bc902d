"""The adapter contract: one class per diffusers pipeline family, exposing the denoiser as a function.

An adapter wraps one *real* diffusers pipeline object (loaded with ``from_pretrained``) and never copies its
``__call__``. It exposes exactly what the step kernels and trainers need:

* ``encode(prompts, negative=None) -> Cond``: text embeddings (and unconditional ones for CFG).
* ``init_noise(batch, generator) -> Tensor``: the initial latent ``x_T`` (video latents included).
* ``sigmas(num_steps) -> Tensor``: ``num_steps + 1`` noise levels, the pipeline's own (shifted) schedule, ending
  at the terminal level. Epsilon models use ``sigma = sqrt(1 - alpha_bar)`` (see ``flowalign.sde``).
* ``predict(x, sigma, cond, guidance) -> Tensor``: velocity (flow) or epsilon (DDPM); CFG is applied here. The
  only call into the denoiser.
* ``decode(x) -> Tensor``: images float in [0, 1], ``B,C,H,W`` (video ``B,T,C,H,W``).
* ``trainable_module()``: the transformer/UNet that LoRA wraps.

Parity rule: sampling through the adapter with the ODE kernel (DDIM eta=0 for epsilon models) and the same seed
reproduces the diffusers pipeline's own output (max abs diff <= 1e-4 in fp32).
"""

from __future__ import annotations

import copy
import inspect
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from flowalign.registry import Registry

ADAPTERS: Registry[type["Adapter"]] = Registry("adapter")

try:  # diffusers that renamed from_pretrained(torch_dtype=) to dtype= (the old name warns)
    from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401

    _DTYPE_KW = "dtype"
except ImportError:  # pragma: no cover - older diffusers
    _DTYPE_KW = "torch_dtype"


@dataclass
class Cond:
    """Text conditioning for ``Adapter.predict``.

    ``kwargs`` holds the denoiser's conditioning keyword tensors (batch-first), e.g. ``encoder_hidden_states``
    and ``pooled_projections``; ``uncond`` the same for the negative prompt when CFG is possible.
    """

    kwargs: dict[str, Tensor]
    uncond: dict[str, Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return next(iter(self.kwargs.values())).shape[0]

    def _map(self, fn) -> "Cond":
        def m(d):
            return None if d is None else {k: fn(v) if torch.is_tensor(v) else v for k, v in d.items()}

        return Cond(m(self.kwargs), m(self.uncond), dict(self.extra))

    def index(self, idx) -> "Cond":
        """Rows ``idx`` (slice, list or LongTensor) of every tensor."""
        return self._map(lambda t: t[idx])

    def repeat_interleave(self, n: int) -> "Cond":
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def to(self, device=None, dtype=None) -> "Cond":
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        first = conds[0]
        kw = {k: torch.cat([c.kwargs[k] for c in conds]) for k in first.kwargs}
        un = None
        if first.uncond is not None:
            un = {k: torch.cat([c.uncond[k] for c in conds]) for k in first.uncond}
        return Cond(kw, un, dict(first.extra))


class Adapter(ABC):
    """Base class of all pipeline adapters (see module docstring)."""

    #: "flow" (velocity prediction) or "epsilon" (noise prediction)
    prediction_type: ClassVar[str] = "flow"
    #: default step kernel for this family
    default_kernel: ClassVar[str] = "flow_sde"
    #: peft LoRA target modules and rank/alpha defaults (flow_grpo: SD3/Wan r32/a64, FLUX r64/a128)
    lora_target_modules: ClassVar[list[str]] = []
    lora_rank: ClassVar[int] = 32
    lora_alpha: ClassVar[int] = 64
    #: the diffusers pipeline class this adapter wraps
    pipeline_class: ClassVar[type | None] = None

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, torch_dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **kwargs) -> "Adapter":
        """Load the wrapped diffusers pipeline exactly as users do and wrap it.

        Keyword arguments named in the adapter's ``__init__`` (e.g. ``height``, ``max_sequence_length``) configure
        the adapter; the rest go to the pipeline's ``from_pretrained``.
        """
        if cls.pipeline_class is None:
            raise NotImplementedError(f"{cls.__name__} has no pipeline_class")
        own = set(inspect.signature(cls.__init__).parameters) - {"self", "pipe"}
        adapter_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
        pipe = cls.pipeline_class.from_pretrained(path_or_repo_id, **{_DTYPE_KW: torch_dtype}, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device), **adapter_kw)

    # -- properties -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.trainable_module().device

    @property
    def dtype(self) -> torch.dtype:
        return self.trainable_module().dtype

    # -- the contract -----------------------------------------------------------------------------
    @abstractmethod
    def encode(self, prompts: Sequence[str], negative: Sequence[str] | str | None = None) -> Cond: ...

    @abstractmethod
    def init_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor: ...

    @abstractmethod
    def sigmas(self, num_steps: int) -> Tensor: ...

    @abstractmethod
    def predict(self, x: Tensor, sigma: Tensor | float, cond: Cond, guidance: float = 1.0) -> Tensor: ...

    @abstractmethod
    def decode(self, x: Tensor) -> Tensor: ...

    @abstractmethod
    def trainable_module(self) -> nn.Module: ...

    # -- shared helpers ---------------------------------------------------------------------------
    @staticmethod
    def cfg_combine(out_uncond: Tensor, out_cond: Tensor, guidance: float) -> Tensor:
        """Classifier-free guidance: ``u + w (c - u)`` (Ho & Salimans 2022)."""
        return out_uncond + guidance * (out_cond - out_uncond)

    @staticmethod
    def cfg_batch(cond: Cond, tensors: Sequence[Tensor], negative_first: bool = True,
                  what: str = "guidance > 1") -> tuple[list[Tensor], dict[str, Tensor]]:
        """Inputs of one batched CFG forward: every tensor of ``tensors`` (latents, timesteps, ...) twice, and the
        conditioning kwargs stacked with the unconditional ones, ``[uncond; cond]`` (SD3, SD1.5, SDXL: the pipelines'
        order) or ``[cond; uncond]`` with ``negative_first=False`` (Wan, FLUX true CFG, Qwen-Image, HunyuanVideo)."""
        if cond.uncond is None:
            raise ValueError(f"{what} needs unconditional (negative) embeddings: encode(prompts, negative='')")
        kwargs = {k: torch.cat([cond.uncond[k], v] if negative_first else [v, cond.uncond[k]])
                  for k, v in cond.kwargs.items()}
        return [torch.cat([t, t]) for t in tensors], kwargs

    def memo_sigmas(self, num_steps: int, make: Callable[[int], Tensor]) -> Tensor:
        """``make(num_steps)`` computed once per step count (a copy returned each call); checks ``num_steps``."""
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        cache: dict[int, Tensor] = self.__dict__.setdefault("_sigma_cache", {})
        if num_steps not in cache:
            cache[num_steps] = make(num_steps)
        return cache[num_steps].clone()

    def scheduler_sigmas(self, num_steps: int, **kwargs: Any) -> Tensor:
        """The sigmas (with the terminal 0) that diffusers' ``retrieve_timesteps(scheduler, num_steps, **kwargs)``
        sets, on a copy of the pipeline's scheduler so that the pipeline's own state is left alone."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

        scheduler = copy.deepcopy(self.pipe.scheduler)
        retrieve_timesteps(scheduler, num_steps, "cpu", **kwargs)
        return scheduler.sigmas.detach().clone()

    def resolution_shift(self, image_seq_len: int, max_shift: float = 1.15) -> float:
        """The resolution-dependent shift ``mu`` (FLUX/SD3.5 ``calculate_shift``: linear in the latent token count
        between ``base_image_seq_len`` and ``max_image_seq_len``) from the scheduler's config."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        return calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                               cfg.get("base_shift", 0.5), cfg.get("max_shift", max_shift))

    @staticmethod
    def expand_sigma(sigma: Tensor | float, batch: int, device=None) -> Tensor:
        """A scalar or ``[batch]`` sigma as an fp32 ``[batch]`` tensor (ValueError for any other shape)."""
        s = torch.as_tensor(sigma, dtype=torch.float32, device=device)
        if s.ndim == 0:
            return s.expand(batch)
        if s.shape != (batch,):
            raise ValueError(f"sigma must be a scalar or have shape [batch]=[{batch}], got {tuple(s.shape)}")
        return s

    #: size of the prompt-encoding LRU (the trainer re-encodes the same prompts often)
    encode_cache_size: ClassVar[int] = 64

    def cached_encode(self, prompts: Sequence[str], negative: Sequence[str] | str | None,
                      fn: Callable[[tuple[str, ...], tuple[str, ...] | None], Cond]) -> Cond:
        """``fn(prompts, negative)`` memoised in a small LRU keyed by the prompt tuples (text encoders are frozen;
        call ``clear_encode_cache()`` after changing them)."""
        prompts = tuple(self.check_prompts(prompts))
        if negative is not None:
            negative = (negative,) * len(prompts) if isinstance(negative, str) else tuple(negative)
            if len(negative) != len(prompts) or not all(isinstance(n, str) for n in negative):
                raise ValueError(f"negative must be a string or a list of {len(prompts)} strings (one per prompt), "
                                 f"got {len(negative)} items")
        cache: OrderedDict = self.__dict__.setdefault("_encode_cache", OrderedDict())
        key = (prompts, negative)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        cond = cache[key] = fn(prompts, negative)
        while len(cache) > self.encode_cache_size:
            cache.popitem(last=False)
        return cond

    def clear_encode_cache(self) -> None:
        """Forget cached prompt encodings (after training or swapping a text encoder)."""
        self.__dict__.pop("_encode_cache", None)

    @staticmethod
    def check_prompts(prompts) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        return prompts
