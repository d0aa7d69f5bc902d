"""A method's flat options, composed from the option groups of the components it uses (no options inheritance).

A component a method composes -- the reward-backprop engine, the online pair round, a truncation rule -- declares
its options as one small dataclass of ``flowalign.config.help_field``s with an optional ``check(self, cfg)``
(raising ``base.option_error``). A method's ``Options`` is the *flat* union of its groups, so recipes keep writing
``train.method_options.<key>`` without nesting, the base class parses and checks it (``Method.options``), and
``describe_options`` lists every key. Each component gets its own typed group back with ``opts.part(Group)``::

    Options = compose_options("DraftOptions", BackpropOptions, Truncation,
                              truncation=help_field("fixed", "DRaFT-K: ..."))   # another default + help
    opts = cls.options(cfg)                  # one flat DraftOptions, checked group by group
    engine_opts = opts.part(BackpropOptions) # a BackpropOptions with the same values

Why flat and not a nested sub-dataclass field: the keys are the recipes' public contract (``objective``,
``ratio_clip`` ...); nesting them would rename every recipe key. Why not a base class: a group is a part of a
method's options, not a kind of them, and two methods sharing a group share nothing else.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any


def _copy(f: dataclasses.Field) -> Any:
    """A fresh field with ``f``'s default and help (a ``Field`` object belongs to one class)."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)  # type: ignore[misc]
    return dataclasses.field(default=f.default, metadata=f.metadata)


def compose_options(name: str, *groups: type, **overrides: Any) -> type:
    """The flat dataclass ``name`` holding every field of ``groups``, in order.

    ``overrides`` replaces a field's spec (``help_field(default, help)``) keeping its type: one method's default of
    a shared key. A name may appear in one group only. The class gets ``check(cfg)`` (every group's ``check`` on its
    part, in order), ``part(Group)`` and ``groups``.
    """
    fields, owner = [], {}
    for g in groups:
        hints = typing.get_type_hints(g)
        for f in dataclasses.fields(g):
            if f.name in owner:
                raise TypeError(f"{name}: option {f.name!r} is in both {owner[f.name].__name__} and {g.__name__}")
            owner[f.name] = g
            fields.append((f.name, hints[f.name], overrides.pop(f.name, None) or _copy(f)))
    if overrides:
        raise TypeError(f"{name}: overrides name no option of its groups: {', '.join(overrides)}")

    def part(self, group: type) -> Any:
        """This object's values of ``group``'s fields, as a ``group`` instance."""
        if group not in groups:
            raise TypeError(f"{name} does not compose {group.__name__}")
        return group(**{f.name: getattr(self, f.name) for f in dataclasses.fields(group)})

    def check(self, cfg) -> None:
        """Every group's range checks, in order (``ConfigError`` naming ``train.method_options.<key>``)."""
        for g in groups:
            if hasattr(g, "check"):
                self.part(g).check(cfg)

    doc = f"Options of one method: the fields of {', '.join(g.__name__ for g in groups)}."
    cls = dataclasses.make_dataclass(name, fields, namespace={"part": part, "check": check, "groups": groups,
                                                              "__doc__": doc})
    cls.__module__ = sys._getframe(1).f_globals.get("__name__", __name__)  # where the method declared it
    return cls
