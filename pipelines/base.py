"""The adapter contract lives in the core (``flowalign.adapter``); this module re-exports it for adapters and
for code written against ``flowalign.pipelines.base``."""

from flowalign.adapter import *  # noqa: F401,F403
from flowalign.adapter import _DTYPE_KW, ADAPTERS, Adapter, Cond  # noqa: F401
