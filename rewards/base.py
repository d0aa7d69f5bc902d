"""The reward protocol: ``Reward.__call__(images, prompts, metadata) -> Tensor[B]``.

* Image rewards take ``images`` float in [0, 1], ``B,C,H,W`` (video ``B,T,C,H,W``).
* Text rewards (``modality = "text"``) take ``completions`` (list of str) and optional ``answers``.
* ``name``, ``differentiable``, ``device`` and ``batch_size`` are attributes. ``__call__`` validates the input,
  micro-batches it by ``batch_size`` and calls ``score`` on each chunk, so any batch size works within the
  memory cap of one chunk.
* ``differentiable=False`` rewards refuse inputs that require grad (a clear error instead of a silent zero grad).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from flowalign.registry import Registry

REWARDS: Registry[type["Reward"]] = Registry("reward", entry_point_group="flowalign.rewards")


IMAGE_LAYOUT = ("images float in [0, 1], B,C,H,W with C in {1, 3} (video B,T,C,H,W); "
                "a uint8 image is divided by 255 and a channels-last B,H,W,C one is permuted with .permute(0, 3, 1, 2)")


class NonFiniteRewardError(RuntimeError):
    """A reward returned NaN or inf: the reward's bug (or its model's), named, never passed on to training."""


def check_images(images: Tensor, name: str = "images") -> Tensor:
    """Validate a float image batch in [0, 1], ``B,C,H,W`` or ``B,T,C,H,W`` with ``C in {1, 3}`` and ``H, W > 0``.

    The one input check of every image/video reward (``Reward.__call__``); each message names the expected layout.
    """
    if not torch.is_tensor(images):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}; expected {IMAGE_LAYOUT}")
    shape = tuple(images.shape)
    if images.ndim not in (4, 5):
        raise ValueError(f"{name} must be B,C,H,W or B,T,C,H,W, got shape {shape}; expected {IMAGE_LAYOUT}")
    if shape[-3] not in (1, 3):
        last = shape[-1] in (1, 3, 4)
        layout = "B,H,W,C" if images.ndim == 4 else "B,T,H,W,C"
        hint = (f"this looks like channels-last {layout} (last dim {shape[-1]}); permute it to "
                f"{'B,C,H,W' if images.ndim == 4 else 'B,T,C,H,W'}"
                if last else f"dim -3 holds {shape[-3]} channels")
        raise ValueError(f"{name} must have 1 or 3 channels in dim -3 (B,C,H,W), got shape {shape}: {hint}; "
                         f"expected {IMAGE_LAYOUT}")
    if 0 in shape[1:]:
        raise ValueError(f"{name} must have non-empty frames, channels, height and width, got shape {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be float in [0, 1], got dtype {images.dtype}; divide uint8 images by 255")
    if images.numel():
        x = images.detach()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contain NaN or inf ({int((~torch.isfinite(x)).sum())} of {x.numel()} values)")
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= -1e-4 and hi <= 1 + 1e-4):
            raise ValueError(
                f"{name} must be in [0, 1], got range [{lo:.3f}, {hi:.3f}]; if they are in [-1, 1] pass (x + 1) / 2"
            )
    return images


def check_completions(completions: Any, name: str) -> list[str]:
    """Validate the input of a text reward: a list of strings (one completion per sample)."""
    if torch.is_tensor(completions) or isinstance(completions, (str, bytes)) or completions is None:
        got = "nothing" if completions is None else type(completions).__name__
        raise ValueError(f"reward {name!r} is a text reward: pass completions=[str, ...] (one per sample), got {got}")
    out = list(completions)
    bad = next((c for c in out if not isinstance(c, str)), None)
    if bad is not None:
        raise ValueError(f"reward {name!r} takes completions as strings, got a {type(bad).__name__}")
    return out


def check_finite_scores(scores: Tensor, name: str) -> Tensor:
    """Raise ``NonFiniteRewardError`` naming reward ``name`` and the samples when ``scores`` hold NaN or inf."""
    bad = ~torch.isfinite(scores.detach())
    if bool(bad.any()):
        idx = bad.nonzero().flatten()[:8].tolist()
        raise NonFiniteRewardError(f"reward {name!r} returned non-finite scores for samples {idx} "
                                   f"(values {scores.detach()[idx].tolist()}); a reward must return finite numbers")
    return scores


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
            inputs = check_completions(completions if completions is not None else images, self.name)
            n = len(inputs)
            if answers is not None:
                answers = list(answers)
                if len(answers) != n:
                    raise ValueError(f"reward {self.name!r} got {n} completions but {len(answers)} answers")
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
        if isinstance(prompts, (str, bytes)):  # list("a cat") would be 5 one-letter prompts
            raise ValueError(f"reward {self.name!r}: prompts must be a list of strings (one per sample), "
                             f"got one string {prompts[:40]!r}")
        prompts = list(prompts) if prompts is not None else [""] * n
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(f"got {n} inputs but {len(prompts)} prompts and {len(metadata)} metadata entries")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"reward {self.name!r}: prompts must be strings")
        if not all(isinstance(m, dict) for m in metadata):
            raise ValueError(f"reward {self.name!r}: metadata must be a list of dicts (one per sample)")
        bs = self.batch_size or n or 1
        outs = [
            _as_float(self.score(inputs[i : i + bs], prompts[i : i + bs], metadata[i : i + bs])).reshape(-1)
            for i in range(0, n, bs)
        ]
        out = torch.cat(outs) if outs else torch.zeros(0)
        if out.shape != (n,):
            raise RuntimeError(f"reward {self.name!r} returned shape {tuple(out.shape)}, expected ({n},)")
        return check_finite_scores(out, self.name)

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


def reward_name(obj: Any) -> str:
    """The log/config name of a reward spec: the string itself, a ``Reward``'s ``name``, a function's ``__name__``
    (``<lambda>`` -> ``lambda``), else the callable's class name."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, Reward):
        return obj.name
    name = getattr(obj, "__name__", None) or type(obj).__name__
    return name.strip("<>") or "reward"


def as_reward(obj: "str | Reward | type[Reward] | Any", **kwargs: Any) -> Reward:
    """Any reward-like object as a ``Reward``: a registered name / ``module:attr`` / ``remote:URL`` string
    (``get_reward``), a ``Reward`` (as is), a ``Reward`` subclass (built with ``kwargs``), or a plain callable
    ``fn(images, prompts, metadata) -> Tensor[B] | list[float]`` wrapped in a ``FunctionReward`` named
    ``fn.__name__`` (differentiable if ``fn.differentiable`` is true, e.g. for reward-backprop methods)."""
    if isinstance(obj, (str, Reward)) or (isinstance(obj, type) and issubclass(obj, Reward)):
        return get_reward(obj, **kwargs)
    if callable(obj) and not isinstance(obj, type):
        return FunctionReward(obj, name=reward_name(obj), differentiable=bool(getattr(obj, "differentiable", False)),
                              **kwargs)
    raise ValueError(f"cannot use {obj!r:.80} as a reward: give a registered name, a Reward, a Reward subclass or a "
                     f"callable fn(images, prompts, metadata) -> Tensor[B]")


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
            weight = kwargs.pop("weight", 1.0)
            reward = get_reward(spec, **kwargs) if isinstance(spec, (str, Reward, type)) else as_reward(spec, **kwargs)
            key = spec if isinstance(spec, str) else reward.name
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise ValueError(f"Compose: the weight of reward {key!r} must be a number, got {weight!r}") from None
            if not math.isfinite(weight):
                raise ValueError(f"Compose: the weight of reward {key!r} is {weight}; weights must be finite")
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
        check_finite_scores(total, f"compose (weights {self.weights})")  # e.g. a weight made NaN after construction
        return (total, parts) if return_components else total

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Compose":
        for r in self.components.values():
            r.to(device, dtype)
        return super().to(device, dtype)
