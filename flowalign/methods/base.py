"""The method contract: a method turns the current policy into training micro-batches and scores them.

A method owns no loop. Each iteration the trainer calls

1. ``collect(state) -> Collected``: sample/score/prepare this iteration's data (rollouts, DPO pairs,
   differentiable samples -- anything) and cut it into ``Batch`` micro-batches, each tagged with the
   optimizer update (``0 .. num_updates - 1``) it belongs to;
2. for every update ``u``: ``loss(batch)`` for each of its batches, ``backward``; then the trainer sums gradients
   over processes, clips, steps the optimizer, steps the EMA.

Loss normalisation (so any process count gives the same update): ``loss(batch)`` returns the micro-batch's
*contribution* to update ``u``'s objective over **all processes** -- e.g. ``sum_rows(l_i) / N_u`` with ``N_u``
the global number of rows of update ``u``. The trainer sums gradients across processes (it does not average).
Every process must report the same ``num_updates``; a process may have no batch in an update.

The trainer owns devices, mixed precision, LoRA, accumulation, clipping, EMA, checkpoints and logs; the method
reaches the model only through the adapter and ``Runtime`` (e.g. ``runtime.reference()`` for a KL term).
A new method is one file registering a ``Method`` subclass in ``METHODS``; the trainer is not touched. Online
methods compose the shared round of ``flowalign.methods.online`` (deal, sample, score, advantages, split, KL) instead
of subclassing one another.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager

import torch
from torch import Tensor

from flowalign.adapter import Adapter
from flowalign.config import Config, ConfigError, describe, from_dict
from flowalign.data import RewardFn
from flowalign.registry import Registry

#: where a method's options live in the run config
OPTIONS_KEY = "train.method_options"

METHODS: Registry[type["Method"]] = Registry("method", entry_point_group="flowalign.methods")


def derive_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed from ``(seed, *keys)`` (sha256), so each draw of a run has its own stream.

    Deriving instead of carrying generator state makes resume exact by construction and makes a draw independent
    of how many processes share the work (chunk ``c`` of iteration ``i`` gets the same noise on any rank).
    """
    digest = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, *keys: Any, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys))


@dataclass
class Runtime:
    """What the trainer lends a method. Defaults describe a single process without accelerate."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    gather: Callable[[Tensor], Tensor] = lambda t: t  # concatenate a per-process tensor over ranks (rank order)
    autocast: Callable[[], ContextManager] = nullcontext  # mixed precision for denoiser calls
    reference: Callable[[], ContextManager] = nullcontext  # inside: the adapter computes the reference policy
    # wraps a loop inside one iteration (sampling chunks) in a progress bar: progress(iterable, desc) -> iterable
    progress: Callable[[Any, str], Any] = lambda iterable, desc: iterable

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainState:
    """Counters the trainer checkpoints."""

    iteration: int = 0  # completed iterations
    global_step: int = 0  # completed optimizer steps
    samples: int = 0  # samples generated over all processes


@dataclass
class Batch:
    """One micro-batch: ``data`` is method-specific (a typed payload); ``update`` the optimizer step it contributes
    to; ``weight`` the factor on its summed per-row loss (e.g. ``1 / N_u``, see the loss normalisation above)."""

    data: Any
    update: int = 0
    weight: float = 1.0


@dataclass
class Collected:
    """The output of ``Method.collect`` for one iteration."""

    batches: list[Batch]
    num_updates: int  # optimizer steps this iteration (same on every process)
    metrics: dict[str, float] = field(default_factory=dict)  # reward stats etc. (already global)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "sample", "reward", ...
    num_samples: int = 0  # samples generated on this process
    images: Tensor | None = None  # a few samples for image logging (main process)
    captions: list[str] | None = None  # one per logged image: "<prompt> | reward r" (flowalign.trackers)


@dataclass
class NoOptions:
    """The options of a method that has none."""

    def check(self, cfg) -> None:
        """Range checks that need the whole config (raise ``ConfigError`` naming ``train.method_options.<key>``)."""


def option_error(key: str, msg: str) -> ConfigError:
    """``ConfigError("train.method_options.<key> <msg>")``."""
    return ConfigError(f"{OPTIONS_KEY}.{key} {msg}")


class Method:
    """Base class; see the module docstring for the contract.

    Options: a method declares ``Options``, a dataclass whose fields are ``flowalign.config.help_field``s (type,
    default and help on every field) with an optional ``check(cfg)``. ``options(cfg)`` parses
    ``train.method_options`` into it through the shared config code (unknown keys and wrong types fail with the
    key path), and ``flowalign train --help-config recipe.yaml`` lists them.
    """

    name: ClassVar[str] = "method"
    Options: ClassVar[type] = NoOptions
    #: the shared piece this method composes (``OnlineRound``, ``PairRound``, the reward-backprop engine): unless
    #: the method overrides them, ``check_world`` / ``state_dict`` / ``load_state_dict`` / ``close`` delegate to it, and so do
    #: ``collect`` / ``loss`` when the component has them (a method that only supplies a forward, e.g. DRaFT)
    component: Any = None

    def __init__(self, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime | None = None) -> None:
        self.cfg = cfg
        self.adapter = adapter
        self.reward_fn = reward_fn
        self.runtime = runtime or Runtime()

    @classmethod
    def options(cls, cfg) -> Any:
        """``train.method_options`` parsed into ``cls.Options`` and checked (``ConfigError`` naming the key)."""
        opts = from_dict(cls.Options, dict(cfg.train.method_options), OPTIONS_KEY)
        check = getattr(opts, "check", None)
        if check is not None:
            check(cfg)
        return opts

    @classmethod
    def describe_options(cls) -> str:
        """Every option with its type, default and help (as ``flowalign.config.describe``)."""
        return describe(cls.Options, OPTIONS_KEY + ".")

    @classmethod
    def check_config(cls, cfg) -> None:
        """Load-time checks: the options, plus method rules (raise ``ConfigError`` naming the key)."""
        cls.options(cfg)

    def check_world(self, world_size: int) -> None:
        """Checks that need the process count (called when the trainer starts); the component's, if it has any."""
        if hasattr(self.component, "check_world"):
            self.component.check_world(world_size)

    def collect(self, state: TrainState) -> Collected:
        if not hasattr(self.component, "collect"):
            raise NotImplementedError(f"{type(self).__name__} defines no collect() and composes no component with one")
        return self.component.collect(state)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if not hasattr(self.component, "loss"):
            raise NotImplementedError(f"{type(self).__name__} defines no loss() and composes no component with one")
        return self.component.loss(batch)

    def state_dict(self) -> dict:
        """JSON-serialisable state to checkpoint (e.g. a prompt-sampler position)."""
        return {} if self.component is None else self.component.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.component is not None:
            self.component.load_state_dict(state)

    def close(self) -> None:
        """Release threads/resources."""
        if self.component is not None and hasattr(self.component, "close"):
            self.component.close()


class PromptSampler:
    """Epoch-wise permutation of prompt indices, seeded per epoch; state = (epoch, position).

    Every process holds the same sampler and draws the same global prompt list per round (flow_grpo's
    ``DistributedKRepeatSampler`` shares one seeded generator the same way).
    """

    def __init__(self, num_prompts: int, seed: int = 0, shuffle: bool = True) -> None:
        if num_prompts < 1:
            raise ValueError("PromptSampler needs at least one prompt")
        self.n, self.seed, self.shuffle = num_prompts, seed, shuffle
        self.epoch, self.pos = 0, 0

    def _order(self) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=generator(self.seed, "prompts", self.epoch))

    def next(self, k: int) -> Tensor:
        """The next ``k`` prompt indices (wrapping into the next epoch)."""
        out = []
        while len(out) < k:
            order = self._order()
            take = order[self.pos: self.pos + k - len(out)]
            out.extend(take.tolist())
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return torch.tensor(out, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
