"""Training methods: one file per loss family, registered in ``METHODS`` (see ``methods/base.py``).

Every module of this package is imported here, so a new method file registers itself without editing this file
or the trainer. Variants that differ only in kernel, schedule or advantage (DanceGRPO, MixGRPO,
Flow-GRPO-Fast, CPS) are recipes of ``flow_grpo``, not new files.

Every registered method subclasses only ``Method`` and composes what it shares with others: the online round
(``online.py``), the online pair round of D3PO/PRDP (``pair_round.py``), the reward-backprop engine of
AlignProp/DRaFT/ReFL/LeapAlign (``backprop.py``); its flat options are composed from option groups
(``options.py``).
"""

import importlib
import pkgutil

from flowalign.methods.base import METHODS, Batch, Collected, Method, PromptSampler, Runtime, TrainState

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "Batch", "Collected", "Method", "PromptSampler", "Runtime", "TrainState"]
