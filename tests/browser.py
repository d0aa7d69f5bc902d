"""Headless Chromium for the browser tests (gallery, labelling page): Debian's ``chromium`` driven by playwright.

``require_browser()`` skips locally when either is missing and fails in CI (``CI`` set), where ``make sysdeps`` and
the dev extras must have installed them.
"""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def require_browser() -> None:
    """Skip (fail in CI) unless playwright and a chromium binary are installed."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("playwright is missing in CI: install the dev extras (pip install -e '.[dev]')")
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: `make sysdeps` installs Debian's chromium")
        pytest.skip("chromium is not installed (make sysdeps)")
