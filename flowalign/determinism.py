"""Deterministic mode (config ``deterministic: true``, ``flowalign doctor --deterministic``).

``set_deterministic(True)`` selects deterministic kernels, so the same input gives the same bits in rollout and
training forwards on GPU (cuDNN/cuBLAS otherwise pick algorithms per shape). A small core module: the trainer and
the doctor both use it, and neither imports the other for it.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def set_deterministic(enabled: bool = True) -> dict[str, Any]:
    """Select deterministic kernels (or undo it); returns the previous settings for ``restore_determinism``.

    ``torch.use_deterministic_algorithms`` (errors on ops without a deterministic implementation), cuDNN
    deterministic without autotuning, TF32 and reduced-precision reductions off, and ``CUBLAS_WORKSPACE_CONFIG``
    (needed by deterministic cuBLAS; set only when absent, before the first cuBLAS call).
    """
    cuda = torch.backends.cuda.matmul
    prev = {
        "algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_tf32": cuda.allow_tf32,
        "fp16_reduction": cuda.allow_fp16_reduced_precision_reduction,
        "bf16_reduction": cuda.allow_bf16_reduced_precision_reduction,
    }
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled and prev["cudnn_benchmark"]
    torch.backends.cudnn.allow_tf32 = not enabled and prev["cudnn_tf32"]
    cuda.allow_tf32 = not enabled and prev["matmul_tf32"]
    cuda.allow_fp16_reduced_precision_reduction = not enabled and prev["fp16_reduction"]
    cuda.allow_bf16_reduced_precision_reduction = not enabled and prev["bf16_reduction"]
    return prev


def restore_determinism(prev: dict[str, Any]) -> None:
    """Undo ``set_deterministic`` with the settings it returned."""
    cuda = torch.backends.cuda.matmul
    torch.use_deterministic_algorithms(prev["algorithms"])
    torch.backends.cudnn.deterministic = prev["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = prev["cudnn_benchmark"]
    torch.backends.cudnn.allow_tf32 = prev["cudnn_tf32"]
    cuda.allow_tf32 = prev["matmul_tf32"]
    cuda.allow_fp16_reduced_precision_reduction = prev["fp16_reduction"]
    cuda.allow_bf16_reduced_precision_reduction = prev["bf16_reduction"]
