"""Adapters over diffusers pipelines (the contract lives in the core, ``flowalign.adapter``).

Importing this package registers every built-in adapter in ``ADAPTERS``: ``sd3``, ``flux``, ``wan``, ``sd15``,
``sdxl``, ``flux2``, ``qwenimage``, ``zimage``, ``hunyuan_video`` (and ``shapes``, the embedded tiny world, when
present). ``tiny`` builds offline test instances of each family. ``flowalign.adapter.get_adapter`` imports this
package on the first lookup of a name not registered yet, so the core never imports it at module level.

>>> from flowalign.pipelines import load_adapter
>>> adapter = load_adapter("sd3", "stabilityai/stable-diffusion-3.5-medium", torch_dtype=torch.bfloat16, device="cuda")
"""

from __future__ import annotations

import importlib

from flowalign.pipelines import flux, hunyuan_video, qwenimage, sd3, sd15, sdxl, wan  # noqa: F401  (registers them)
from flowalign.adapter import ADAPTERS, Adapter, Cond, get_adapter, load_adapter  # noqa: F401  (the one lookup)

# Families whose pipeline class only newer diffusers releases ship (FLUX.2 and Z-Image arrived in 0.36): an older
# diffusers still imports the package, and asking for the family says what is missing instead of failing here.
for _family in ("flux2", "zimage"):
    try:
        importlib.import_module(f"flowalign.pipelines.{_family}")
    except (ImportError, RuntimeError) as _err:  # diffusers wraps a failed lazy import in RuntimeError
        import diffusers

        ADAPTERS.mark_unavailable(_family, f"it needs a diffusers release with its pipeline class (installed "
                                           f"diffusers {diffusers.__version__}: {_err}); pip install -U diffusers")

try:  # the shapes world is optional (written separately)
    from flowalign.pipelines import shapes  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["ADAPTERS", "Adapter", "Cond", "get_adapter", "load_adapter"]
