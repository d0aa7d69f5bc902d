"""Process-group and FSDP plumbing of the trainer: collectives, gradient sums, FSDP2 sharding, whole-tensor state.

Data-parallel runs do not wrap the denoiser in DDP: the adapter calls its own module, and the methods normalise
their loss by the global row count, so summing the gradients over processes (``sum_grads``, one flat all-reduce)
gives the same update for any process count.

FSDP (``accelerate launch --use_fsdp``) shards the trainable module in place with FSDP2 ``fully_shard``
(``shard_module``); gradients are reduce-scattered as a plain SUM. Every rank must run the same forwards and
backwards in the same order (``pad_batches``), evaluation runs with the weights gathered (``gathered``), and
checkpoints hold whole tensors (``full_tensor`` / ``shard_like``, ``full_optimizer_state`` /
``shard_optimizer_state``), so a run resumes at any process count, sharded or not.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import nn


def has_accelerator() -> bool:
    """Whether a GPU-like device (CUDA, XPU, MPS) is present; without one, a multi-process launch needs gloo."""
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool((xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()))


# ----------------------------------------------------------------------------------------------- collectives
def all_reduce(t: torch.Tensor, op: str, device: torch.device | str, world_size: int) -> torch.Tensor:
    """``t`` reduced over processes with ``op`` ("sum" or "max") on ``device`` (the backend's), returned on
    ``t``'s device; ``t`` itself in a single process. Any shape."""
    if world_size == 1:
        return t
    out = t.to(device)
    torch.distributed.all_reduce(out, op={"sum": torch.distributed.ReduceOp.SUM,
                                          "max": torch.distributed.ReduceOp.MAX}[op])
    return out.to(t.device)


def sum_grads(params: list[nn.Parameter], device: torch.device | str, world_size: int) -> None:
    """Sum the gradients of ``params`` over processes in place (the method's loss is globally normalised).

    One flat all-reduce carries the gradients plus a has-grad flag per parameter, so a parameter that no
    process touched keeps ``grad=None`` (AdamW then skips it, exactly as in a single process).
    """
    if world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flags = torch.tensor([float(p.grad is not None) for p in params], device=device)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [flags])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).to(p.dtype).clone()
        offset += n
    for p, used in zip(params, flat[offset:].tolist()):
        if used == 0:
            p.grad = None


# ----------------------------------------------------------------------------------------------- FSDP
def fsdp_requested(accelerator) -> bool:
    """Whether ``accelerate launch`` asked for FSDP. accelerate reports ``DistributedType.FSDP`` only on GPUs; on a
    CPU (gloo) launch the request survives only in ``ACCELERATE_USE_FSDP``."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")


def reshard_after_forward_requested() -> bool:
    """``FSDP_RESHARD_AFTER_FORWARD`` as accelerate sets it (FSDP v1 names a sharding strategy instead)."""
    after = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    return after not in ("false", "shard_grad_op", "no_shard")


def shard_module(module: nn.Module, device: torch.device, world_size: int,
                 reshard_after_forward: bool = True) -> list[nn.Module]:
    """FSDP2-shard ``module`` in place over ``world_size`` ranks on ``device``'s type (explicit: a CPU run on a
    GPU host must not get a CUDA mesh): each block, then the root (the rest); returns the FSDP modules.

    Blocks: the classes in ``FSDP_TRANSFORMER_CLS_TO_WRAP`` (``--fsdp_transformer_layer_cls_to_wrap``), else the
    model's ``_no_split_modules`` (diffusers/transformers), else the children of every ``nn.ModuleList``.
    Gradients are reduced as a plain SUM: the methods normalise the loss by the global row count.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or ",".join(getattr(module, "_no_split_modules", None)
                                                                        or [])
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    if wanted:
        blocks = [m for m in module.modules() if m is not module and type(m).__name__ in wanted]
    else:
        blocks = [c for m in module.modules() if isinstance(m, nn.ModuleList) for c in m.children()]
    outer = [b for b in blocks if not any(a is not b and _contains(a, b) for a in blocks)]  # no nesting
    for b in outer:
        fully_shard(b, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    mods = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM; factor 1 makes it a plain SUM
    return mods


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every rank must call it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as the (possibly sharded) ``like``; every rank holds ``full``, so no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def pad_batches(by_update: dict[int, list[tuple[Any, float]]], num_updates: int, all_reduce_max, rank: int) -> None:
    """FSDP: give every rank as many micro-batches per update as the busiest one (FSDP's all-gathers and
    reduce-scatters are collectives, one per forward/backward of each shard), padding ``by_update`` (update ->
    [(batch, loss scale)]) in place with zero-scaled repeats of a local batch. The methods split rows by a global
    shuffle, so local counts differ. ``all_reduce_max``: the element-wise max over processes of a float64 vector."""
    counts = torch.tensor([float(len(by_update.get(u, []))) for u in range(num_updates)], dtype=torch.float64)
    most = all_reduce_max(counts.clone())
    if not torch.equal(counts, most):
        mine = [b for bs in by_update.values() for b, _ in bs]
        if not mine:
            raise RuntimeError(f"rank {rank} has no micro-batch this iteration but "
                               "others do; FSDP needs one on every rank (use more rows per process)")
        for u in range(num_updates):
            by_update.setdefault(u, []).extend((mine[0], 0.0) for _ in range(int(most[u] - counts[u])))


@contextlib.contextmanager
def gathered(fsdp_modules: list[nn.Module], reshard_after_forward: bool) -> Iterator[None]:
    """Whole weights on every rank inside (forwards need no collectives, so ranks may differ in count); a no-op
    without FSDP modules."""
    for m in fsdp_modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp_modules:
            m.reshard()
            m.set_reshard_after_forward(reshard_after_forward, recurse=False)


def full_optimizer_state(sd: dict) -> dict:
    """An ``optimizer.state_dict()`` with whole tensors (FSDP shards gathered: a collective)."""
    sd["state"] = {i: {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in st.items()}
                   for i, st in sd["state"].items()}
    return sd


def shard_optimizer_state(sd: dict, params: list[torch.Tensor]) -> dict:
    """A whole-tensor optimizer state laid out like the (possibly sharded) ``params``, given in the optimizer's
    ``state_dict`` index order."""
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                    for k, v in st.items()}
    return {**sd, "state": state}
