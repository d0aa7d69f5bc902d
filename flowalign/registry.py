"""One registry helper, reused for kernels, schedules, advantages, losses, methods, adapters and rewards.

A registry maps names to functions/classes filled by a decorator (as verl's ``core_algos.py`` does with
``register_adv_est``), so a recipe names them as strings and a user adds one without editing ours.
``get`` also accepts ``"package.module:attr"`` strings and, when an entry-point group is given,
third-party plug-ins installed under that group.
"""

from __future__ import annotations

import difflib
import importlib
from importlib import metadata
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def import_string(spec: str):
    """Import ``"package.module:attr"`` (or ``"package.module.attr"``) and return the attribute."""
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
    else:
        mod_name, _, attr = spec.rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"cannot import {spec!r}: expected 'package.module:attr'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {mod_name!r} from {spec!r}: {e}") from e
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r} (from {spec!r})") from e
    return obj


class Registry(Generic[T]):
    """Named registry of functions or classes.

    >>> KERNELS = Registry("kernel")
    >>> @KERNELS.register("ode")
    ... def ode(...): ...
    >>> KERNELS.get("ode")
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._unavailable: dict[str, str] = {}
        self._entry_points_loaded = False

    def mark_unavailable(self, name: str, reason: str) -> None:
        """Record that ``name`` exists but cannot load here (an optional dependency is missing): ``get`` then
        raises ``reason`` instead of "unknown name"."""
        self._unavailable[name] = reason

    def register(self, name: str | None = None, *, overwrite: bool = False) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "name", None) or getattr(obj, "__name__")
            if key in self._items and not overwrite and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is already registered; pass overwrite=True to replace it")
            self._items[key] = obj
            return obj

        return deco

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or not self.entry_point_group:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            if ep.name not in self._items:
                self._items[ep.name] = ep.load()

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """Look ``name`` up; ``"module:attr"`` imports a user object. Unknown names list the known ones."""
        if not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a string, got {type(name).__name__}")
        if name in self._items:
            return self._items[name]
        self._load_entry_points()
        if name in self._items:
            return self._items[name]
        if ":" in name:
            return import_string(name)
        if name in self._unavailable:
            raise ValueError(f"{self.kind} {name!r} is not available here: {self._unavailable[name]}")
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(self.names()) or '(none)'}; "
            f"or pass 'package.module:attr'."
        )


def check_choice(arg: str, value, allowed) -> None:
    """Raise a ValueError naming ``arg`` and the allowed values when ``value`` is not one of them."""
    allowed = list(allowed)
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{arg}={value!r} is not allowed.{hint} Allowed: {', '.join(map(str, allowed))}")
