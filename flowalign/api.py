"""The Python entry points' inputs, TRL-style: ``train(cfg, rewards=[...], prompts=...)`` and ``Trainer(...)``.

>>> from flowalign import train
>>> def brightness(images, prompts, metadata):          # images [B,C,H,W] in [0, 1] -> [B]
...     return images.mean(dim=(1, 2, 3))
>>> train("shapes_flow_grpo", rewards=[brightness, "shapes_geneval"], prompts=["a red circle", "a blue square"],
...       overrides=["max_iterations=1"])

* ``cfg``: a ``Config``, a recipe path or shipped recipe name (``"sd35_pickscore"``), a dict, or None (defaults);
  ``overrides`` are ``key=value`` strings as on the command line.
* ``rewards``: a list (each weight 1.0) or a ``{reward: weight}`` dict of registered names (``"pickscore"``,
  ``"module:attr"``, ``"remote:URL"``; their ``reward.kwargs`` still apply), ``Reward`` objects, and plain
  callables ``fn(images, prompts, metadata) -> Tensor[B] | list[float]``. Each is one component of a ``Compose``
  (so per-reward logging, ``reward.weights`` and multi-reward advantages work) named by the string, the
  ``Reward.name`` or ``fn.__name__`` (repeats get ``_2``, ``_3``); the names replace ``reward.weights``.
* ``prompts``: anything ``flowalign.data.load_prompts`` takes (a list, a .txt/.jsonl/.csv path, a
  ``datasets.Dataset``, a ``{dataset, split, column}`` spec); it replaces ``sample.prompts``. A ``Dataset`` is
  read once into ``{"prompt": ..., **metadata}`` records so the saved ``config.yaml`` stays plain data.
"""

from __future__ import annotations

import copy
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any

from flowalign.config import Config, load_config
from flowalign.data import PromptSpec, is_hf_dataset, load_prompts

#: a reward as ``train(rewards=...)`` takes it: a registered name, a Reward object, or a plain callable
RewardLike = Any
#: what ``train(rewards=...)`` takes: one reward, a list of them (weight 1 each) or ``{reward: weight}``
RewardsSpec = "RewardLike | Sequence[RewardLike] | Mapping[RewardLike, float]"
_VALIDATING = types.SimpleNamespace()  # inline reward objects during config validation (prepare)


def resolve_config(cfg: "Config | str | os.PathLike | dict | None", overrides: Sequence[str] | None = None) -> Config:
    """An unvalidated ``Config`` from a ``Config`` (deep-copied: the caller's object is never modified), a recipe
    path or name, a dict, or None; ``overrides`` applied."""
    if isinstance(cfg, Config):
        cfg = cfg.to_dict()
    return load_config(cfg, list(overrides or []), validate=False)


def reward_items(rewards: Any) -> list[tuple[str, Any, float]]:
    """``[(name, reward_like, weight)]`` of a ``rewards=`` argument; names as ``Compose`` keys them."""
    from flowalign.rewards.base import reward_name

    if isinstance(rewards, Mapping):
        pairs = list(rewards.items())
    elif isinstance(rewards, (list, tuple)):
        pairs = [(r, 1.0) for r in rewards]
    else:
        pairs = [(rewards, 1.0)]
    if not pairs:
        raise ValueError("rewards is empty: give at least one reward (a name, a Reward or a callable)")
    out, seen = [], set()
    for obj, weight in pairs:
        base = reward_name(obj)
        name, i = base, 1
        while name in seen:  # the same de-duplication as Compose
            i += 1
            name = f"{base}_{i}"
        seen.add(name)
        out.append((name, obj, float(weight)))
    return out


def prompt_setting(prompts: PromptSpec) -> Any:
    """The ``sample.prompts`` value of a ``prompts=`` argument, checked now (a bad suffix fails here)."""
    if is_hf_dataset(prompts):
        texts, meta = load_prompts(prompts)
        return [{"prompt": p, **m} if m else p for p, m in zip(texts, meta)]
    load_prompts(prompts)  # raises ConfigError naming sample.prompts on a missing file or an unknown suffix
    if isinstance(prompts, os.PathLike):
        return os.fspath(prompts)
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    return prompts


def prepare(cfg: "Config | str | os.PathLike | dict | None", rewards: Any = None, prompts: PromptSpec | None = None,
            overrides: Sequence[str] | None = None, reward_fn: Any = None) -> tuple[Config, dict[str, Any]]:
    """``(validated Config, inline rewards {name: object})`` for ``Trainer``/``train`` (module docstring).

    ``reward_fn`` (the older keyword) with an empty ``reward.weights`` counts as ``rewards=[reward_fn]``; with
    weights set it is used as given (the caller built the reward) and ``inline`` is empty."""
    cfg = resolve_config(cfg, overrides)
    if prompts is not None:
        cfg.sample.prompts = prompt_setting(prompts)
    if rewards is None and reward_fn is not None and not cfg.reward.weights:
        rewards = [reward_fn]
    inline: dict[str, Any] = {}
    if rewards is not None:
        items = reward_items(rewards)
        cfg.reward.weights = {name: w for name, _, w in items}
        # the recipe's kwargs go with its rewards: kept only for the names still used
        cfg.reward.kwargs = {k: v for k, v in cfg.reward.kwargs.items() if k in cfg.reward.weights}
        inline = {name: obj for name, obj, _ in items if not isinstance(obj, str)}
    # object rewards are not registry names: the config checks see each one as an importable "module:attr" spec
    # that resolves to the object itself (held in _VALIDATING only while validating)
    shadow = copy.deepcopy(cfg)
    keys = {k: f"{__name__}:_VALIDATING.r{i}" for i, k in enumerate(inline)}
    shadow.reward.weights = {keys.get(k, k): w for k, w in cfg.reward.weights.items()}
    for k, spec in keys.items():
        setattr(_VALIDATING, spec.rsplit(".", 1)[1], inline[k])
    try:
        shadow.validate()
    finally:
        _VALIDATING.__dict__.clear()
    return cfg, inline


def build_rewards(cfg: Config, device: Any, inline: Mapping[str, Any] | None = None):
    """``Compose`` of ``cfg.reward.weights``: names through the registry with ``reward.kwargs`` (on ``device``
    unless ``reward.device``), and the ``inline`` objects (``as_reward``) under their names."""
    from flowalign.rewards.base import Compose, as_reward

    inline = dict(inline or {})
    dev = cfg.reward.device or str(device)
    spec = []
    for name, w in cfg.reward.weights.items():
        if name in inline:
            spec.append((as_reward(inline[name]), {"weight": w}))
            continue
        kw = dict(cfg.reward.kwargs.get(name, {}))
        if not name.startswith("remote:"):
            kw.setdefault("device", dev)
        spec.append((name, {"weight": w, **kw}))
    reward = Compose(spec, device=dev)
    if list(reward.weights) != list(cfg.reward.weights):  # logging keys = config keys
        reward.components = dict(zip(cfg.reward.weights, reward.components.values()))
        reward.weights = dict(cfg.reward.weights)
    return reward
