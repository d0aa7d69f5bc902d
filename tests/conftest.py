"""Test-session settings.

Under pytest-xdist each worker gets an equal share of the cores as torch threads: the default (every core per
worker) oversubscribes the machine, and multi-threaded CPU kernels split their reductions by thread count, so
batch-split invariance checks at the 1e-6 level (e.g. the SDXL UNet's convolutions) would depend on the load.
"""

from __future__ import annotations

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
