"""Headless Chromium for the browser tests (gallery, labelling page): Debian's ``chromium`` driven by playwright.

``require_browser()`` skips locally when either is missing and fails in CI (``CI`` set), where ``make sysdeps`` and
the dev extras must have installed them.
"""

from __future__ import annotations

import shutil

from tests.deps import missing, require_module

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def require_browser() -> None:
    """Skip (fail in CI) unless playwright and a chromium binary are installed."""
    require_module("playwright", "pip install -e '.[dev]'")
    if CHROMIUM is None:
        missing("chromium", "`make sysdeps` installs Debian's chromium")
