"""Optional system/test dependencies: a missing one skips the test locally and fails it in CI (``CI`` set, as
``.ci/run`` does), where ``make sysdeps`` and the dev extras must have installed it."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest


def missing(what: str, fix: str, module_level: bool = False) -> None:
    """Skip (fail in CI) because ``what`` is not installed; ``fix`` says how to install it."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI: {fix}")
    pytest.skip(f"{what} is not installed ({fix})", allow_module_level=module_level)


def require_executable(name: str, fix: str) -> str:
    """The path of executable ``name``; skips (fails in CI) when it is not on PATH."""
    path = shutil.which(name)
    if path is None:
        missing(name, fix)
    return path


def require_module(name: str, fix: str, module_level: bool = False) -> None:
    """Skips (fails in CI) unless Python module ``name`` is importable."""
    if importlib.util.find_spec(name) is None:
        missing(f"python module {name}", fix, module_level)
