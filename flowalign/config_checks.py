"""Field-level checks of a loaded ``Config`` (issue 22): every number finite, ranges, option maps against the
signature of what receives them, names resolved, duplicate YAML keys refused.

``flowalign.config._validate`` calls ``check_fields`` first, so ``flowalign train --dry-run`` catches everything
that does not need the model:

* finite numbers everywhere: every float in the config, also inside lists and free-form maps (``model.kwargs``,
  ``reward.kwargs``, ``train.method_options``), must be finite; the error names the key path;
* ranges that the cross-field rules do not already cover (``seed >= 0``, ``0 <= model.lora.dropout < 1``, ...);
* ``sample.schedule_options`` against the schedule function's signature (``flowalign.schedules.schedule_options``),
  ``model.kwargs`` against the adapter's ``__init__`` + ``from_pretrained`` (for a diffusers pipeline: its
  components and ``DiffusionPipeline.from_pretrained``'s loading options), ``reward.kwargs`` against each reward's
  constructor;
* names: ``train.lr_scheduler`` (``diffusers.optimization.SchedulerType``), ``log.trackers``
  (``accelerate.utils.LoggerType``), ``model.lora.init`` (peft ``LoraConfig.init_lora_weights``), and every
  ``module:attr`` plug-in (``eval.fn``, rewards, ``model.adapter``) imported.

``load_yaml`` is ``yaml.safe_load`` with a loader that refuses a mapping key given twice (naming key and lines).
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import typing
from typing import Any

import yaml

from flowalign.config import Config, ConfigError

# ----------------------------------------------------------------------------------------------- YAML


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises ``ConfigError`` when a mapping holds the same key twice (PyYAML keeps the
    last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are not duplicates
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first != line:
                raise ConfigError(f"duplicate key {key!r} at line {line} (first given at line {first}); "
                                  "YAML would silently keep the last one")
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str = "<string>") -> Any:
    """``yaml.safe_load`` refusing duplicate keys; errors name ``source``."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------------------------- numbers


def check_finite(data: Any, path: str = "") -> None:
    """Every float in ``data`` (nested dicts/lists of ``Config.to_dict()``) is finite, else ConfigError(path)."""
    if isinstance(data, float) and not math.isfinite(data):
        raise ConfigError(f"{path} must be a finite number, got {data!r}")
    if isinstance(data, dict):
        for k, v in data.items():
            check_finite(v, f"{path}.{k}" if path else str(k))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            check_finite(v, f"{path}[{i}]")


def check_ranges(cfg: Config) -> None:
    """Ranges not covered by ``config._validate``'s > 0 / >= 0 lists."""
    for path, seed in (("seed", cfg.seed), ("eval.seed", cfg.eval.seed)):
        if not 0 <= seed < 2**32:  # numpy's seed range (accelerate set_seed seeds numpy too)
            raise ConfigError(f"{path} must be in [0, 2**32), got {seed}")
    lo = cfg.model.lora
    if not 0 <= lo.dropout < 1:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {lo.dropout}")
    if lo.alpha is not None and not lo.alpha > 0:
        raise ConfigError(f"model.lora.alpha must be > 0, got {lo.alpha}")


# ----------------------------------------------------------------------------------------------- option maps


def _unknown(keys: Any, allowed: set[str], path: str, owner: str) -> None:
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown option {path}.{key}: not an argument of {owner}.{hint} "
                              f"Known: {', '.join(sorted(allowed)) or '(none)'}")


def _params(fn: Any, drop: set[str]) -> tuple[set[str], bool]:
    """Keyword-passable parameter names of ``fn`` minus ``drop``, and whether it takes ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - drop
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def check_schedule_options(cfg: Config) -> None:
    """``sample.schedule_options`` keys must be arguments of the schedule. The untouched default
    (``{fraction: 0.99}``, the ``all`` schedule's) is dropped for a schedule without ``fraction``."""
    from flowalign.schedules import schedule_options

    s = cfg.sample
    allowed = schedule_options(s.schedule)
    if allowed is None:  # a plug-in schedule taking **kwargs
        return
    if s.schedule_options == {"fraction": 0.99} and "fraction" not in allowed:
        s.schedule_options = {}
    _unknown(s.schedule_options, allowed, "sample.schedule_options", f"schedule {s.schedule!r}")


_PIPELINE_LOAD_OPTIONS: set[str] | None = None


def _pipeline_load_options() -> set[str]:
    """The keywords ``DiffusionPipeline.from_pretrained`` pops from its ``**kwargs`` (read from its source, so the
    list follows the installed diffusers)."""
    global _PIPELINE_LOAD_OPTIONS
    if _PIPELINE_LOAD_OPTIONS is None:
        from diffusers import DiffusionPipeline

        src = inspect.getsource(DiffusionPipeline.from_pretrained)
        _PIPELINE_LOAD_OPTIONS = set(re.findall(r"kwargs\.pop\(\s*[\"'](\w+)[\"']", src))
    return _PIPELINE_LOAD_OPTIONS


def adapter_options(cls: type) -> set[str] | None:
    """Keywords ``model.kwargs`` may hold for adapter class ``cls`` (None: anything, the loader takes **kwargs
    we cannot see through). The adapter's ``__init__`` options, then ``from_pretrained``'s; the base
    ``Adapter.from_pretrained`` hands the rest to ``pipeline_class.from_pretrained`` (a diffusers pipeline:
    its components and loading options)."""
    init, _ = _params(cls.__init__, {"self", "pipe"})
    fp, var = _params(cls.from_pretrained, {"cls", "path_or_repo_id", "path"})
    allowed = init | fp
    if not var:
        return allowed
    pipe = getattr(cls, "pipeline_class", None)
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return None
    if not (isinstance(pipe, type) and issubclass(pipe, DiffusionPipeline)):
        return None
    components, _ = _params(pipe.__init__, {"self"})
    return allowed | components | _pipeline_load_options()


def check_model_kwargs(cfg: Config) -> None:
    from flowalign.adapter import get_adapter

    try:
        cls = get_adapter(cfg.model.adapter)
    except ValueError as e:
        raise ConfigError(f"model.adapter: {e}") from None
    for key, where in (("torch_dtype", "model.dtype"), ("dtype", "model.dtype"), ("device", "the trainer")):
        if key in cfg.model.kwargs:
            raise ConfigError(f"model.kwargs.{key}: set by {where}; remove it from model.kwargs")
    allowed = adapter_options(cls)
    if allowed is not None:
        _unknown(cfg.model.kwargs, allowed, "model.kwargs", f"adapter {cfg.model.adapter!r} ({cls.__name__}.__init__ "
                 "or its pipeline's from_pretrained)")


def _reward_target(name: str) -> Any:
    from flowalign.registry import import_string
    from flowalign.rewards.base import REWARDS

    if name.startswith("remote:"):
        return REWARDS.get("remote") if "remote" in REWARDS.names() else None
    if ":" in name:
        return import_string(name)
    return REWARDS.get(name)


def check_rewards(cfg: Config) -> None:
    """``module:attr`` rewards importable; ``reward.kwargs.<name>`` keys are constructor arguments."""
    from flowalign.rewards.base import Reward

    for name in cfg.reward.weights:
        try:
            target = _reward_target(name)
        except ValueError as e:
            raise ConfigError(f"reward.weights.{name}: {e}") from None
        kw = cfg.reward.kwargs.get(name)
        if not kw or target is None:
            continue
        if isinstance(target, type) and issubclass(target, Reward):
            allowed, var = _params(target.__init__, {"self", "url"} if name.startswith("remote:") else {"self"})
            if not var:
                _unknown(kw, allowed, f"reward.kwargs.{name}", f"reward {name!r} ({target.__name__}.__init__)")


# ----------------------------------------------------------------------------------------------- names


def _lora_inits() -> tuple[set[str], list[re.Pattern]]:
    """String values peft's ``LoraConfig.init_lora_weights`` accepts (its Literal), plus our aliases."""
    from peft import LoraConfig

    hint = typing.get_type_hints(LoraConfig).get("init_lora_weights")
    values: set[str] = {"default", "true", "false"}
    patterns = []
    stack = [hint]
    while stack:
        tp = stack.pop()
        args = typing.get_args(tp)
        if typing.get_origin(tp) is typing.Literal:
            for a in args:
                if isinstance(a, str) and "[" in a:  # 'pissa_niter_[number of iters]'
                    patterns.append(re.compile(re.escape(a.split("[")[0]) + r"\d+$"))
                elif isinstance(a, str):
                    values.add(a)
        else:
            stack.extend(args)
    return values, patterns


def check_names(cfg: Config) -> None:
    from accelerate.utils import LoggerType
    from diffusers.optimization import SchedulerType

    from flowalign.registry import import_string

    def one_of(path: str, value: str, allowed: list[str]) -> None:
        if value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}={value!r} is not known.{hint} Known: {', '.join(allowed)}")

    one_of("train.lr_scheduler", cfg.train.lr_scheduler, [t.value for t in SchedulerType])
    for i, tracker in enumerate(cfg.log.trackers):
        one_of(f"log.trackers[{i}]", tracker, [t.value for t in LoggerType])
    from flowalign.trackers import check_installed

    check_installed(cfg.log.trackers)  # a known tracker whose package is missing: stop here, not warn and go on
    values, patterns = _lora_inits()
    init = str(cfg.model.lora.init)
    if init.lower() not in {"default", "true", "false"} and not any(p.match(init) for p in patterns):
        one_of("model.lora.init", init, sorted(values))
    try:
        fn = import_string(cfg.eval.fn)
    except ValueError as e:
        raise ConfigError(f"eval.fn: {e}") from None
    if not callable(fn):
        raise ConfigError(f"eval.fn={cfg.eval.fn!r} is not callable")


def check_fields(cfg: Config) -> None:
    """All of the above, in the order a user would fix them."""
    check_finite(cfg.to_dict())
    check_ranges(cfg)
    check_names(cfg)
    check_schedule_options(cfg)
    check_model_kwargs(cfg)
    check_rewards(cfg)
