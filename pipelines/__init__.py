"""Adapters over diffusers pipelines (see ``flowalign.pipelines.base`` for the contract).

Importing this package registers every built-in adapter in ``ADAPTERS``: ``sd3``, ``flux``, ``wan``, ``sd15``,
``sdxl``, ``flux2``, ``qwenimage``, ``zimage``, ``hunyuan_video`` (and ``shapes``, the embedded tiny world, when
present). ``tiny`` builds offline test instances of each family.

>>> from flowalign.pipelines import load_adapter
>>> adapter = load_adapter("sd3", "stabilityai/stable-diffusion-3.5-medium", torch_dtype=torch.bfloat16, device="cuda")
"""

from __future__ import annotations

from flowalign.pipelines import flux, sd3, sd15, wan  # noqa: F401  (registers the adapters)
from flowalign.pipelines import flux2, hunyuan_video, qwenimage, sdxl, zimage  # noqa: F401
from flowalign.pipelines.base import ADAPTERS, Adapter, Cond

try:  # the shapes world is optional (written separately)
    from flowalign.pipelines import shapes  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["ADAPTERS", "Adapter", "Cond", "get_adapter", "load_adapter"]


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class registered as ``name`` (or a ``"package.module:Class"`` string)."""
    return ADAPTERS.get(name)


def load_adapter(name: str, path: str, **kwargs) -> Adapter:
    """``get_adapter(name).from_pretrained(path, **kwargs)``: adapter options (``height``, ``max_sequence_length``,
    ...) and pipeline ``from_pretrained`` options (``torch_dtype``, ``device``, ``variant``, ...) in one call."""
    return get_adapter(name).from_pretrained(path, **kwargs)
