"""Differentiable sampling: the shared core of the reward-backprop methods (AlignProp, DRaFT, ReFL, LeapAlign).

Notation as ``flowalign.sde``: index ``i`` runs over the ``N`` transitions ``sigmas[i] -> sigmas[i + 1]``; ``x_i`` is
the state *before* transition ``i`` (``x_0`` the initial noise, ``x_N`` the sample).

* ``predict`` -- the adapter's denoiser call, wrapped in ``torch.utils.checkpoint`` (``use_reentrant=False``) when
  grad is on: only the call's input is kept and its activations are recomputed in backward (AlignProp
  ``sd_pipeline.py``; reference ``backprop_preference.md`` §A1), so memory grows with the number of differentiable
  steps by one latent per step, not one activation set per step.
* ``transition`` -- one kernel step ``x_{i+1} = mean + std * noise`` with the kernels of ``flowalign.sde`` (Euler
  ODE for flow models, DDIM for epsilon models, or any stochastic kernel, reparameterised so gradients flow through
  the mean).
* ``leap`` -- a jump over many steps with one prediction: ``x_{t2} = x_{t1} + (sigma_t2 - sigma_t1) v(x_{t1})``
  for flow models (the ODE kernel with an arbitrary step), the DDIM eta=0 jump for epsilon models;
  ``predict_x0`` is the leap to ``sigma = 0`` (``x - sigma v``; DDIM's ``pred_original_sample``).
* ``integrate`` -- a chain of transitions with truncation: steps before ``grad_from`` run under ``no_grad``
  (the DRaFT-K / AlignProp truncation: "no grad before step K from the end"), later ones keep the graph.
* ``straight_through`` / ``scale_grad`` -- ``s + sg(v - s)`` (value ``v``, gradient of ``s``) and
  ``a x + (1 - a) sg(x)`` (value ``x``, gradient scaled by ``a``): LeapAlign's connectors and its discount of
  the nested gradient term (FlowBP ``flux1/leapalign.py``; reference §A5).
* ``GradNorms`` -- per-step gradient accounting by backward hooks: ``||dL/dx_i||`` at the latent entering step
  ``i`` and ``||dL/d out_i||`` at the denoiser output of step ``i`` (the signal that reaches the weights through
  that call).
* ``PeakMemory`` / ``measure`` -- memory and speed instrumentation: CUDA ``max_memory_allocated``; on CPU the peak
  of live tensor bytes allocated in the block (a dispatch-mode tracker, exact and independent of the allocator)
  and the process's RSS high-water mark delta (``/proc/self/clear_refs``).
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint as _checkpoint

from flowalign import sde

from flowalign.adapter import Adapter, Cond, deterministic_kernel


# ----------------------------------------------------------------------------------------------- kernels
def check_kernel(adapter: Adapter, kernel: str) -> None:
    """ValueError when ``kernel`` does not fit the adapter's prediction type (``ddim`` needs epsilon models)."""
    sde.KERNELS.get(kernel)
    if (kernel == "ddim") != (adapter.prediction_type == "epsilon"):
        allowed = "ddim" if adapter.prediction_type == "epsilon" else "ode, flow_sde, cps, dance"
        raise ValueError(f"sample.kernel={kernel!r} does not fit a {adapter.prediction_type!r}-prediction model "
                         f"({type(adapter).__name__}); allowed: {allowed}")


def predict(adapter: Adapter, x: Tensor, sigma: Tensor | float, cond: Cond, guidance: float = 1.0,
            checkpoint: bool = True) -> Tensor:
    """``adapter.predict``, activation-checkpointed (non-reentrant) when grad is on and ``checkpoint``."""
    if checkpoint and torch.is_grad_enabled():
        return _checkpoint(adapter.predict, x, sigma, cond, guidance, use_reentrant=False)
    return adapter.predict(x, sigma, cond, guidance)


def transition(kernel: str, x: Tensor, out: Tensor, sigma, sigma_next, noise_level: float = 0.0,
               noise: Tensor | None = None) -> Tensor:
    """``x_{i+1} = mean + std * noise`` of ``kernel`` (differentiable in ``x`` and ``out``; no noise when std = 0)."""
    mean, std = sde.mean_std(kernel, x, out, sigma, sigma_next, noise_level)
    if noise is not None and sde.is_stochastic(kernel, noise_level):
        mean = mean + std * noise.to(mean.dtype)
    return mean.to(x.dtype)


def leap(adapter: Adapter, x: Tensor, out: Tensor, sigma_from, sigma_to) -> Tensor:
    """One-prediction jump ``sigma_from -> sigma_to`` (any distance; scalars or ``[B]``).

    Flow: ``x + (sigma_to - sigma_from) v`` (LeapAlign arXiv 2604.15311, leap ``x_{t2} = x_{t1} + (t2 - t1) v``);
    epsilon: the DDIM eta=0 jump ``sqrt(ab') x0_hat + sqrt(1 - ab') eps``.
    """
    return transition(deterministic_kernel(adapter.prediction_type)[0], x, out, sigma_from, sigma_to)


def predict_x0(adapter: Adapter, x: Tensor, out: Tensor, sigma) -> Tensor:
    """The one-step estimate of the clean sample: the leap to ``sigma = 0`` (ReFL's ``pred_original_sample``)."""
    return leap(adapter, x, out, sigma, torch.zeros_like(torch.as_tensor(sigma, dtype=torch.float32)))


def renoise(adapter: Adapter, x0: Tensor, noise: Tensor, sigma) -> Tensor:
    """``x0`` forward-noised to ``sigma``: ``(1 - s) x0 + s eps`` (flow) or ``sqrt(1 - s^2) x0 + s eps`` (epsilon)."""
    s = sde.per_sample(sigma, x0)
    keep = (1 - s) if adapter.prediction_type == "flow" else torch.sqrt(1 - s**2)
    return (keep * x0 + s * noise.to(x0.dtype)).to(x0.dtype)


def straight_through(surrogate: Tensor, value: Tensor) -> Tensor:
    """Forward value ``value``, gradient of ``surrogate``: ``s + sg(v - s)`` (reference §C2, "connector")."""
    return surrogate + (value - surrogate).detach()


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Forward value ``x``, gradient scaled by ``scale``: ``a x + (1 - a) sg(x)`` (``a = 0`` stops it)."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return scale * x + (1.0 - scale) * x.detach()


def decode(adapter: Adapter, x: Tensor, checkpoint: bool = False) -> Tensor:
    """``adapter.decode``, optionally checkpointed (a VAE decode at >= 1024 px dominates memory; reference §C1)."""
    if checkpoint and torch.is_grad_enabled() and x.requires_grad:
        return _checkpoint(adapter.decode, x, use_reentrant=False)
    return adapter.decode(x)


# ----------------------------------------------------------------------------------------------- gradient norms
def _third(step: Tensor, num_steps: int) -> Tensor:
    return torch.div(3 * step, num_steps, rounding_mode="floor").clamp(0, 2)


class GradNorms:
    """Per-step gradient norms recorded by backward hooks.

    ``latent[i]`` accumulates ``sum_b ||dL/dx_i[b]||`` over the samples of the batch (the state entering step
    ``i``), ``out[i]`` the same for the denoiser output of step ``i``; divide by ``batch`` for the mean per-sample
    norm. ``metrics()`` returns 0-dim tensors that the hooks fill *in place during backward*: read them after
    ``loss.backward()`` (the trainer converts metrics with ``float()`` after its backward). A step that carries no
    gradient records exactly 0.
    """

    KINDS = ("latent", "out")

    def __init__(self, num_steps: int, batch: int) -> None:
        if num_steps < 1 or batch < 1:
            raise ValueError(f"num_steps ({num_steps}) and batch ({batch}) must be >= 1")
        self.num_steps, self.batch = num_steps, batch
        self.per_step = torch.zeros(len(self.KINDS), num_steps, dtype=torch.float64)
        self.thirds = torch.zeros(len(self.KINDS), 3, dtype=torch.float64)

    @property
    def latent(self) -> Tensor:
        return self.per_step[0]

    @property
    def out(self) -> Tensor:
        return self.per_step[1]

    def watch(self, kind: str, tensor: Tensor, step: int | Tensor) -> None:
        """Record ``||dL/d tensor||`` per sample at ``step`` (an int, or ``[B]`` per-sample steps) in backward."""
        if kind not in self.KINDS:
            raise ValueError(f"kind={kind!r} is not allowed. Allowed: {', '.join(self.KINDS)}")
        if not tensor.requires_grad:
            return
        row = self.KINDS.index(kind)
        steps = torch.as_tensor(step, dtype=torch.long).reshape(-1).cpu()

        def hook(grad: Tensor) -> None:
            with torch.no_grad():
                norms = grad.detach().flatten(1).double().norm(dim=1).cpu()
                idx = steps.expand(norms.shape[0]) if steps.numel() == 1 else steps
                self.per_step[row].index_add_(0, idx, norms)
                self.thirds[row].index_add_(0, _third(idx, self.num_steps), norms / self.batch)

        tensor.register_hook(hook)

    def metrics(self, per_step: bool = False) -> dict[str, Tensor]:
        """``grad/<kind>_{first,mid,last}_third``: sum over the steps of that third of the mean per-sample norm
        (steps ``i`` with ``floor(3 i / N)`` = 0, 1, 2); with ``per_step`` also ``grad/<kind>_step<i>``."""
        out: dict[str, Tensor] = {}
        for r, kind in enumerate(self.KINDS):
            for t, name in enumerate(("first", "mid", "last")):
                out[f"grad/{kind}_{name}_third"] = self.thirds[r, t]  # a view: filled in place by the hooks
            if per_step:
                for i in range(self.num_steps):
                    out[f"grad/{kind}_step{i:02d}"] = self.per_step[r, i]
        return out


# ----------------------------------------------------------------------------------------------- the chain
@dataclass
class Chain:
    """Output of ``integrate``: the state at ``stop`` and the states captured on the way (``x_i`` before step i)."""

    x: Tensor
    states: dict[int, Tensor] = field(default_factory=dict)
    nfe: int = 0


def integrate(adapter: Adapter, x: Tensor, cond: Cond, sigmas: Tensor, guidance: float = 1.0, *, start: int = 0,
              stop: int | None = None, grad_from: int | None = None, kernel: str | None = None,
              noise_level: float = 0.0, generator: torch.Generator | None = None, checkpoint: bool = True,
              norms: GradNorms | None = None, capture: Sequence[int] = ()) -> Chain:
    """Run transitions ``start .. stop - 1`` from ``x`` (the state at ``start``).

    Transitions ``i < grad_from`` run under ``torch.no_grad()`` (default ``grad_from = stop``: nothing keeps a
    graph); from ``grad_from`` on every denoiser call is checkpointed (``checkpoint``) and keeps its graph, so the
    returned state is differentiable w.r.t. the trainable weights through the last ``stop - grad_from`` steps.
    ``kernel`` defaults to the deterministic one of the family; a stochastic kernel draws its noise from
    ``generator`` at *every* step (grad or not), so the noise does not depend on ``grad_from``. With ``norms``,
    the state entering the first grad step is made a leaf that requires grad and every grad step's latent and
    output are watched. ``capture`` lists indices ``i`` (``start <= i <= stop``) whose states are returned.
    """
    n = len(sigmas) - 1
    stop = n if stop is None else stop
    grad_from = stop if grad_from is None else grad_from
    if not 0 <= start <= stop <= n:
        raise ValueError(f"need 0 <= start ({start}) <= stop ({stop}) <= num_steps ({n})")
    if not start <= grad_from <= stop:
        raise ValueError(f"grad_from={grad_from} must lie in [start={start}, stop={stop}]")
    bad = [i for i in capture if not start <= i <= stop]
    if bad:
        raise ValueError(f"capture indices {bad} must lie in [start={start}, stop={stop}]")
    kernel = kernel or deterministic_kernel(adapter.prediction_type)[0]
    stochastic = sde.is_stochastic(kernel, noise_level)
    want = {int(i) for i in capture}
    states: dict[int, Tensor] = {}
    nfe = 0
    for i in range(start, stop):
        if i in want:
            states[i] = x
        grad = i >= grad_from
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32) if stochastic else None
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if grad and norms is not None and not x.requires_grad:
                x = x.detach().requires_grad_(True)
            out = predict(adapter, x, sigmas[i], cond, guidance, checkpoint)
            nfe += 1
            if norms is not None:
                norms.watch("latent", x, i)
                norms.watch("out", out, i)
            x = transition(kernel, x, out, sigmas[i], sigmas[i + 1], noise_level, noise)
    if stop in want:
        states[stop] = x
    return Chain(x, states, nfe)


# ----------------------------------------------------------------------------------------------- instrumentation
class _LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storages allocated inside the mode and still alive; ``peak`` is their maximum.

    Storages are found on op outputs; outputs that alias an input (views, in-place ops) are not new. Python
    wrappers of storages live as long as the storage (PyObject preservation), so a ``weakref.finalize`` on the
    wrapper runs exactly when the memory is released.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
                  and t.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in inputs or key in self._seen:
                continue
            nbytes = st.nbytes()
            self._seen.add(key)
            self.live += nbytes
            weakref.finalize(st, self._free, key, nbytes)
            self.peak = max(self.peak, self.live)
        return out


def _rss_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:  # pragma: no cover - not Linux
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:  # pragma: no cover - not Linux / not permitted
        return False


class PeakMemory:
    """Peak memory of a block, in bytes above what was allocated when it started.

    ``peak_bytes``: CUDA ``max_memory_allocated`` delta on a CUDA device; on CPU the peak of live tensor bytes
    allocated in the block (``_LiveTensorBytes``). ``rss_peak_bytes`` (CPU, Linux): the RSS high-water mark delta
    -- only meaningful when freed memory goes back to the OS (set ``MALLOC_MMAP_THRESHOLD_=65536`` before the
    process starts, as ``benchmarks/backprop_memory.py`` does), else ``None``-like noise from heap reuse.
    """

    def __init__(self, device: torch.device | str = "cpu", track_tensors: bool = True) -> None:
        self.device = torch.device(device)
        self.track_tensors = track_tensors
        self.peak_bytes: int | None = None
        self.rss_peak_bytes: int | None = None
        self._mode: _LiveTensorBytes | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._rss0 = _rss_kb("VmRSS") if _reset_rss_peak() else None
        if self.track_tensors:
            self._mode = _LiveTensorBytes()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak
        hwm = _rss_kb("VmHWM")
        if self._rss0 is not None and hwm is not None:
            self.rss_peak_bytes = max(hwm - self._rss0, 0) * 1024


def measure(fn: Callable[[], Any], device: torch.device | str = "cpu", track_tensors: bool = True) -> dict[str, Any]:
    """Run ``fn()`` once under ``PeakMemory``; ``{"seconds", "peak_mb", "rss_peak_mb"}`` (MB = 2**20 bytes)."""
    dev = torch.device(device)
    t0 = time.perf_counter()
    with PeakMemory(dev, track_tensors) as pm:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    mb = 2.0**20
    return {"seconds": seconds, "peak_mb": None if pm.peak_bytes is None else pm.peak_bytes / mb,
            "rss_peak_mb": None if pm.rss_peak_bytes is None else pm.rss_peak_bytes / mb,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
