"""The reward protocol: ``Reward.__call__(images, prompts, metadata) -> Tensor[B]``.

* Image rewards take ``images`` float in [0, 1], ``B,C,H,W`` (video ``B,T,C,H,W``).
* Text rewards (``modality = "text"``) take ``completions`` (list of str) and optional ``answers``.
* ``name``, ``differentiable``, ``device`` and ``batch_size`` are attributes. ``__call__`` validates the input,
  micro-batches it by ``batch_size`` and calls ``score`` on each chunk, so any batch size works within the
  memory cap of one chunk.
* ``differentiable=False`` rewards refuse inputs that require grad (a clear error instead of a silent zero grad).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from flowalign.registry import Registry

REWARDS: Registry[type["Reward"]] = Registry("reward", entry_point_group="flowalign.rewards")


def check_images(images: Tensor, name: str = "images") -> Tensor:
    """Validate a float image batch in [0, 1], ``B,C,H,W`` or ``B,T,C,H,W``."""
    if not torch.is_tensor(images):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim not in (4, 5):
        raise ValueError(f"{name} must be B,C,H,W or B,T,C,H,W, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be float in [0, 1], got dtype {images.dtype}; divide uint8 images by 255")
    if images.numel():
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if not (lo >= -1e-4 and hi <= 1 + 1e-4):
            raise ValueError(
                f"{name} must be in [0, 1], got range [{lo:.3f}, {hi:.3f}]; if they are in [-1, 1] pass (x + 1) / 2"
            )
    return images


def _as_float(scores: Tensor) -> Tensor:
    """float32 scores, except float64 ones are kept (finite-difference gradient checks run in float64)."""
    scores = torch.as_tensor(scores)
    return scores if scores.dtype == torch.float64 else scores.float()


class Reward:
    """Base class: subclasses implement ``score`` on one micro-batch."""

    name: ClassVar[str] = "reward"
    modality: ClassVar[str] = "image"  # "image" | "video" | "text"
    differentiable: ClassVar[bool] = False
    accepts_video: ClassVar[bool] = False  # image rewards that also score B,T,C,H,W themselves

    def __init__(self, device: str | torch.device = "cpu", batch_size: int | None = 32) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size

    def score(self, inputs, prompts: list[str], metadata: list[dict]) -> Tensor:
        raise NotImplementedError

    def __call__(self, images=None, prompts: Sequence[str] | None = None, metadata: Sequence[dict] | None = None,
                 *, completions: Sequence[str] | None = None, answers: Sequence[Any] | None = None) -> Tensor:
        if self.modality == "text":
            inputs = list(completions if completions is not None else images)
            n = len(inputs)
            if answers is not None:
                metadata = [dict(m or {}, answer=a) for m, a in zip(metadata or [{}] * n, answers)]
        else:
            inputs = check_images(images)
            n = inputs.shape[0]
            if self.modality == "video" and inputs.ndim != 5:
                raise ValueError(f"reward {self.name!r} scores videos B,T,C,H,W, got shape {tuple(inputs.shape)}")
            if self.modality == "image" and inputs.ndim == 5 and not self.accepts_video:
                raise ValueError(
                    f"reward {self.name!r} scores images B,C,H,W but got a video {tuple(inputs.shape)}; wrap it: "
                    f"PerFrame({self.name!r}, reduction='mean')"
                )
            if inputs.requires_grad and not self.differentiable:
                raise ValueError(
                    f"reward {self.name!r} is not differentiable but got images with requires_grad=True; "
                    "detach them or use a differentiable reward (CLIP, PickScore, HPS, aesthetic)"
                )
        prompts = list(prompts) if prompts is not None else [""] * n
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(f"got {n} inputs but {len(prompts)} prompts and {len(metadata)} metadata entries")
        bs = self.batch_size or n or 1
        outs = [
            _as_float(self.score(inputs[i : i + bs], prompts[i : i + bs], metadata[i : i + bs])).reshape(-1)
            for i in range(0, n, bs)
        ]
        out = torch.cat(outs) if outs else torch.zeros(0)
        if out.shape != (n,):
            raise RuntimeError(f"reward {self.name!r} returned shape {tuple(out.shape)}, expected ({n},)")
        return out

    # ------------------------------------------------------------------ conveniences
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Reward":
        """Move every ``torch.nn.Module`` attribute (the scorer's networks) to ``device``/``dtype``.

        ``dtype=torch.float64`` is what the finite-difference gradient checks use.
        """
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                value.to(device=device, dtype=dtype)
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, modality={self.modality!r}, "
                f"differentiable={self.differentiable}, device={str(self.device)!r}, batch_size={self.batch_size})")


def get_reward(spec: "str | Reward | type[Reward]", **kwargs: Any) -> Reward:
    """Build a reward from a registered name, ``"package.module:Attr"``, ``"remote:http://host:port"``,
    a ``Reward`` subclass or an instance (returned as is).

    ``kwargs`` go to the constructor (e.g. ``get_reward("pickscore", model="/ckpt/PickScore_v1")``).
    Unknown names raise a ``ValueError`` listing the registered ones. ``"module:attr"`` may also name a plain
    function ``f(images, prompts, metadata) -> Tensor[B]``; it is wrapped in a non-differentiable ``Reward``.
    """
    if isinstance(spec, Reward):
        if kwargs:
            raise ValueError(f"got keyword arguments {sorted(kwargs)} for an already built reward {spec!r}")
        return spec
    if isinstance(spec, str) and spec.startswith("remote:"):
        from flowalign.rewards.remote import RemoteReward

        return RemoteReward(spec[len("remote:"):], **kwargs)
    obj = REWARDS.get(spec) if isinstance(spec, str) else spec
    if isinstance(obj, Reward):
        return obj
    if isinstance(obj, type) and issubclass(obj, Reward):
        return obj(**kwargs)
    if callable(obj):  # a factory returning a Reward, or a plain scoring function
        if isinstance(obj, type):
            raise ValueError(f"{spec!r} is a class but not a flowalign Reward subclass")
        try:
            import inspect

            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            params = {}
        if "images" in params or "completions" in params:
            return FunctionReward(obj, name=str(spec), **kwargs)
        out = obj(**kwargs)
        if not isinstance(out, Reward):
            raise ValueError(f"{spec!r} returned {type(out).__name__}, expected a flowalign Reward")
        return out
    raise ValueError(f"{spec!r} is neither a Reward, a Reward subclass nor a callable")


class FunctionReward(Reward):
    """Wrap a plain function ``fn(images, prompts, metadata) -> Tensor[B] | list[float]`` as a ``Reward``."""

    def __init__(self, fn: Any, name: str = "function", modality: str = "image", differentiable: bool = False,
                 device: str | torch.device = "cpu", batch_size: int | None = None) -> None:
        super().__init__(device=device, batch_size=batch_size)
        self.fn = fn
        self.name = name  # type: ignore[misc]
        self.modality = modality  # type: ignore[misc]
        self.differentiable = differentiable  # type: ignore[misc]

    def score(self, inputs, prompts: list[str], metadata: list[dict]) -> Tensor:
        out = self.fn(inputs, prompts, metadata)
        if isinstance(out, tuple):  # flow_grpo-style (scores, info)
            out = out[0]
        return torch.as_tensor(out)


@REWARDS.register("compose")
class Compose(Reward):
    """Weighted sum of rewards, keeping every component for logging.

    ``total = Σ_i w_i · r_i`` with raw (unnormalised) component scores, as Flow-GRPO's ``multi_score`` does
    (``flow_grpo/rewards.py``; there the sum is named ``avg``).

    >>> r = Compose({"pickscore": 1.0, "ocr": 0.5})
    >>> total = r(images, prompts)                                  # Tensor[B]
    >>> total, parts = r(images, prompts, return_components=True)  # parts: {"pickscore": Tensor[B], "ocr": ...}

    Keys are registry specs (name, ``module:attr``, ``remote:URL``) or built ``Reward`` objects; a value is a
    weight or a dict ``{"weight": w, **constructor_kwargs}``. The composition is differentiable when every
    component is; all components must share one modality.
    """

    name = "compose"

    def __init__(self, rewards: "dict[Any, float | dict] | Sequence[tuple[Any, float]]",
                 device: str | torch.device = "cpu", batch_size: int | None = None) -> None:
        super().__init__(device=device, batch_size=batch_size)
        items = list(rewards.items()) if isinstance(rewards, dict) else list(rewards)
        if not items:
            raise ValueError("Compose needs at least one reward")
        self.components: dict[str, Reward] = {}
        self.weights: dict[str, float] = {}
        for spec, cfg in items:
            kwargs = dict(cfg) if isinstance(cfg, dict) else {"weight": cfg}
            weight = float(kwargs.pop("weight", 1.0))
            reward = get_reward(spec, **kwargs)
            key = spec if isinstance(spec, str) else reward.name
            base, i = key, 1
            while key in self.components:
                i += 1
                key = f"{base}_{i}"
            self.components[key] = reward
            self.weights[key] = weight
        modalities = {r.modality for r in self.components.values()}
        if len(modalities) > 1:
            raise ValueError(f"Compose mixes modalities {sorted(modalities)}; compose rewards of one modality")
        self.modality = modalities.pop()  # type: ignore[misc]
        self.differentiable = all(r.differentiable for r in self.components.values())  # type: ignore[misc]

    def __call__(self, images=None, prompts: Sequence[str] | None = None, metadata: Sequence[dict] | None = None,
                 *, completions: Sequence[str] | None = None, answers: Sequence[Any] | None = None,
                 return_components: bool = False) -> "Tensor | tuple[Tensor, dict[str, Tensor]]":
        parts = {k: r(images, prompts, metadata, completions=completions, answers=answers)
                 for k, r in self.components.items()}
        total = sum(self.weights[k] * v.to(next(iter(parts.values())).device) for k, v in parts.items())
        return (total, parts) if return_components else total

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Compose":
        for r in self.components.values():
            r.to(device, dtype)
        return super().to(device, dtype)
