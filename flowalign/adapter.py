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

Contract methods with defaults (override where the default does not fit): ``encode_images(images, generator)``
(images -> latents, the inverse of ``decode``, for DPO-style methods; the default serves pixel-space models only),
``flow_shift()`` / ``ddpm_levels()`` (the training noise draw of DPO-style methods: the scheduler's shift, or the
``sqrt(1 - alpha_bar_t)`` table) and ``pipeline_call_kwargs(guidance)`` (the wrapped pipeline's ``__call__``
arguments that sample what the adapter samples, for ``flowalign doctor``).

Shared rules (one place for every caller): ``deterministic_kernel`` (Euler ODE for flow models, DDIM eta=0 for
epsilon models), ``check_size`` (the size multiples a family needs), ``DTYPES`` (``model.dtype`` names) and
``get_adapter``/``load_adapter`` (the one way to find an adapter: registered names, built-ins registered on first
use, or ``"package.module:Class"``).

Parity rule: sampling through the adapter with the ODE kernel (DDIM eta=0 for epsilon models) and the same seed
reproduces the diffusers pipeline's own output (max abs diff <= 1e-4 in fp32).
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from flowalign.registry import Registry

if TYPE_CHECKING:  # annotations only: the core does not import the config at run time
    from flowalign.config import Config

ADAPTERS: Registry[type["Adapter"]] = Registry("adapter")

#: ``model.dtype`` names (config, trainer, doctor, eval) -> torch dtypes
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: the package whose import registers every built-in adapter (imported by ``get_adapter`` on first use only, so the
#: core stays free of diffusers pipeline classes; the adapters import the core, never the reverse)
BUILTIN_PACKAGE = "flowalign.pipelines"


@functools.cache
def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: diffusers renamed ``torch_dtype=`` to ``dtype=`` (the old name warns).
    Looked up on first load, not at import, so importing the core does not import diffusers."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:  # pragma: no cover - older diffusers
        return "torch_dtype"
    return "dtype"


def resolve_dtype(dtype: "torch.dtype | str") -> torch.dtype:
    """A torch dtype, or one of the ``DTYPES`` names (``"bfloat16"``, ...); ValueError names the allowed ones."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------------------------- shared rules
def deterministic_kernel(prediction_type: str) -> tuple[str, float]:
    """``(kernel, noise_level)`` of a family's deterministic sampler: the Euler ``ode`` for flow (velocity) models,
    ``ddim`` with eta 0 for epsilon models (``flowalign.sde``); the kernel every non-SDE step, parity check and
    eval sample uses."""
    if prediction_type == "flow":
        return "ode", 0.0
    if prediction_type == "epsilon":
        return "ddim", 0.0
    raise ValueError(f"prediction_type must be 'flow' or 'epsilon', got {prediction_type!r}")


def check_size(height: int, width: int, multiple: int, why: str, num_frames: int | None = None,
               temporal: int = 1) -> tuple[int, int]:
    """``(height, width)`` as ints after checking that both are positive multiples of ``multiple`` (``why`` names
    the factors, e.g. ``"vae_scale_factor * patch_size"``) and, for video, that ``num_frames - 1`` is a multiple of
    the VAE's ``temporal`` factor. ValueError otherwise (a wrong size fails inside the denoiser much later)."""
    h, w = int(height), int(width)
    if h < 1 or w < 1 or h % multiple or w % multiple:
        raise ValueError(f"height={h} and width={w} must be positive multiples of {multiple} ({why})")
    if num_frames is not None and (num_frames < 1 or (num_frames - 1) % temporal):
        raise ValueError(f"num_frames={num_frames}: num_frames - 1 must be a multiple of {temporal} "
                         f"(the VAE's temporal factor)")
    return h, w


# ----------------------------------------------------------------------------------------------- finding adapters
def get_adapter(name: str) -> type["Adapter"]:
    """The adapter class registered as ``name``, or a ``"package.module:Class"`` string.

    The built-ins register when ``flowalign.pipelines`` is imported; that happens here, on the first lookup of a
    name not registered yet, so importing the core never loads a diffusers pipeline class. Unknown names raise
    the registry's ValueError (the registered names and the closest match)."""
    if isinstance(name, str) and ":" not in name and name not in ADAPTERS:
        importlib.import_module(BUILTIN_PACKAGE)
    return ADAPTERS.get(name)


def load_adapter(name: str, path: str, **kwargs: Any) -> "Adapter":
    """``get_adapter(name).from_pretrained(path, **kwargs)``: adapter options (``height``, ``max_sequence_length``,
    ...) and pipeline ``from_pretrained`` options (``torch_dtype`` -- a dtype or a ``DTYPES`` name --, ``device``,
    ``variant``, ...) in one call. The trainer, eval, the doctor and the labeller load through here (config
    validation looks the name up with ``get_adapter``)."""
    if "torch_dtype" in kwargs:
        kwargs["torch_dtype"] = resolve_dtype(kwargs["torch_dtype"])
    return get_adapter(name).from_pretrained(path, **kwargs)


def adapter_from_config(cfg: "Config", device: "torch.device | str" = "cpu") -> "Adapter":
    """The adapter a config's ``model`` section names: ``load_adapter(model.adapter, model.path, torch_dtype=
    model.dtype, device=device, **model.kwargs)`` (the trainer's ``build_adapter``, the doctor, the labeller)."""
    m = cfg.model
    return load_adapter(m.adapter, m.path, torch_dtype=m.dtype, device=device, **m.kwargs)


def adapter_for_pipeline(class_name: str) -> type["Adapter"] | None:
    """The registered adapter whose ``pipeline_class`` is named ``class_name`` (a diffusers folder's
    ``model_index.json`` ``_class_name``), after registering the built-ins; None when no adapter wraps it."""
    importlib.import_module(BUILTIN_PACKAGE)
    for n in ADAPTERS.names():
        pc = ADAPTERS.get(n).pipeline_class
        if pc is not None and pc.__name__ == class_name:
            return ADAPTERS.get(n)
    return None


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
        pipe = cls.pipeline_class.from_pretrained(path_or_repo_id, **{_dtype_kwarg(): torch_dtype}, **kwargs)
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

    # -- contract methods with defaults -------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] (``B,C,H,W``; video ``B,T,C,H,W``) -> latents ``x0`` shaped as ``init_noise(B)``, the
        inverse of ``decode`` (DPO-style methods noise real images). VAE families sample the posterior with
        ``generator`` and override this.

        Default: a pixel-space model (``decode(x) = x / 2 + 1/2`` on [-1, 1], checked on a probe) gets
        ``2 img - 1``; any other adapter raises NotImplementedError naming it."""
        probe = torch.linspace(-1, 1, 7, device=self.device).view(1, 1, 1, 7)
        try:
            pixel = torch.allclose(self.decode(probe.to(self.dtype)).float(), probe / 2 + 0.5, atol=1e-3)
        except Exception:  # noqa: BLE001 - a latent-space decoder rejects the probe: not pixel space
            pixel = False
        if not pixel:
            raise NotImplementedError(
                f"{type(self).__name__} does not implement encode_images(images, generator) (images in [0, 1] -> "
                f"latents, the inverse of decode), which DPO-style methods need; the default only serves "
                f"pixel-space models")
        return (images.to(self.device) * 2 - 1).to(self.dtype)

    def flow_shift(self) -> float:
        """Flow models: the time shift ``s`` of the scheduler (SD3.5 3.0), for training draws
        ``sigma = s u / (1 + (s - 1) u)`` (DPO-style methods). Default: the wrapped scheduler's ``config.shift``,
        1.0 when there is none (dynamic-shift schedulers such as FLUX's report 1.0: pass the shift explicitly)."""
        config = getattr(getattr(self.pipe, "scheduler", None), "config", None) or {}
        return float(config.get("shift", None) or 1.0)

    def ddpm_levels(self) -> Tensor:
        """Epsilon models: ``sqrt(1 - alpha_bar_t)`` for every training timestep ``t`` (float32 ``[T]``), the
        values the sigma slot takes (``flowalign.sde``), for training draws of DPO-style methods. Default: from the
        wrapped scheduler's ``alphas_cumprod`` (computed in float64); NotImplementedError naming the adapter when
        it has none."""
        alphas = getattr(getattr(self.pipe, "scheduler", None), "alphas_cumprod", None)
        if alphas is None:
            raise NotImplementedError(f"{type(self).__name__} has no scheduler with alphas_cumprod: define "
                                      f"ddpm_levels() (sqrt(1 - alpha_bar_t) per training timestep)")
        return torch.sqrt(1.0 - torch.as_tensor(alphas).double()).float()

    def pipeline_call_kwargs(self, guidance: float) -> dict[str, Any]:
        """Keyword arguments that make ``self.pipe(prompt, num_inference_steps, generator, ...)`` sample what the
        adapter samples (``flowalign doctor``'s parity check).

        Default: the adapter's own ``height``/``width``/``num_frames``/``max_sequence_length``/``true_cfg_scale``
        attributes that the pipeline's ``__call__`` accepts, ``guidance_scale = guidance``, and the empty negative
        prompt with true CFG. Families whose ``__call__`` needs more (SDXL micro-conditioning, Z-Image's
        ``guidance_scale = g - 1``, ...) override it."""
        if self.pipe is None:
            raise NotImplementedError(f"{type(self).__name__} wraps no diffusers pipeline: nothing to compare with")
        params = inspect.signature(self.pipe.__call__).parameters
        own = vars(self)
        kw: dict[str, Any] = {k: own[k] for k in ("height", "width", "num_frames", "max_sequence_length",
                                                   "true_cfg_scale") if k in params and k in own}
        if "guidance_scale" in params:
            kw["guidance_scale"] = guidance
        if kw.get("true_cfg_scale", 1.0) > 1.0 and "negative_prompt" in params:
            kw["negative_prompt"] = ""
        return kw

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
    def vae_posterior(vae: nn.Module, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``vae.encode(2 img - 1).latent_dist.sample(generator)`` in the VAE's dtype (raw latents, before the
        family's scaling): the shared first half of every VAE family's ``encode_images``. Video ``B,T,C,H,W`` is
        handed to the VAE as ``B,C,T,H,W``."""
        x = images.to(vae.device) * 2 - 1
        if x.ndim == 5:
            x = x.permute(0, 2, 1, 3, 4)
        return vae.encode(x.to(vae.dtype)).latent_dist.sample(generator)

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
