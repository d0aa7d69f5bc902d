"""The adapter contract lives in the core (``flowalign.adapter``); this module re-exports it for adapters and
for code written against ``flowalign.pipelines.base``."""

from flowalign.adapter import *  # noqa: F401,F403
from flowalign.adapter import (ADAPTERS, DTYPES, Adapter, Cond, check_size, deterministic_kernel,  # noqa: F401
                               get_adapter, load_adapter)
