"""The one training loop: accelerate, peft LoRA (or full fine-tuning), AdamW, clipping, EMA, eval, checkpoints.

>>> from flowalign import load_config, train
>>> train(load_config("recipes/sd35_pickscore.yaml", ["train.lr=1e-4"]))

Per iteration: ``method.collect`` (sampling + rewards + advantages, see ``flowalign.methods``), then for each of
its ``num_updates`` optimizer steps: ``backward`` of every micro-batch ``method.loss``, sum of the gradients over
processes (one flat all-reduce of the trainable parameters' grads), grad-norm clipping, AdamW step, LR scheduler
step, EMA step. Then JSONL logs (+ accelerate trackers), sample images, eval, checkpoint.

Distributed: launch with ``accelerate launch`` (or ``torchrun``). Gradients are summed explicitly instead of
wrapping the denoiser in DDP: the adapter calls its own module (no forward through a wrapper), and the method's
loss is already normalised by the global row count, so the update is the same for any process count
(tested: 1 vs 2 processes <= 1e-5, through torchrun and through ``accelerate launch``).

FSDP (``accelerate launch --use_fsdp``, any ``fsdp_version``; GPU or CPU/gloo): the trainable module is sharded in
place with FSDP2 ``fully_shard`` (each block named by ``FSDP_TRANSFORMER_CLS_TO_WRAP`` / the model's
``_no_split_modules``, then the root), so the adapter still calls its own module. FSDP reduce-scatters the
gradients as a SUM (divide factor 1, sum-only collectives: our loss is globally normalised) and ``_sum_grads`` is
skipped. Every rank must run the same forwards/backwards in the same order, so micro-batch lists are padded to the
longest rank with zero-weighted repeats, and eval runs with the weights gathered (ranks evaluate different prompt
counts). Checkpoints hold full tensors in the same files as a single process: a run can be resumed at any process
count, sharded or not. DeepSpeed needs CUDA and is refused with a clear error.

The reference policy for KL terms is the same network with the LoRA adapters disabled (flow_grpo
``disable_adapter()``); for full fine-tuning a frozen copy of the initial weights is swapped in.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from flowalign import checkpoint as ckpt
from flowalign.config import Config
from flowalign.ema import EMA
from flowalign.methods import METHODS, Collected, Method, Runtime, TrainState
from flowalign.registry import import_string

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- building
def build_adapter(cfg: Config, device: torch.device | str = "cpu"):
    """Load ``cfg.model.adapter`` from ``cfg.model.path`` through the adapter's ``from_pretrained``."""
    import importlib

    from flowalign.adapter import ADAPTERS

    name = cfg.model.adapter
    if name not in ADAPTERS and ":" not in name:
        try:  # adapters register on import of their module (flowalign.pipelines.<name>)
            importlib.import_module(f"flowalign.pipelines.{name}")
        except ImportError as e:
            if e.name != f"flowalign.pipelines.{name}":
                raise
    cls = ADAPTERS.get(name)
    return cls.from_pretrained(cfg.model.path, torch_dtype=_DTYPES[cfg.model.dtype], device=device,
                               **cfg.model.kwargs)


def build_reward(cfg: Config, device: torch.device | str = "cpu"):
    """``Compose`` of ``cfg.reward.weights`` with per-reward kwargs (components are logged separately)."""
    from flowalign.rewards.base import Compose

    dev = cfg.reward.device or str(device)
    spec = {}
    for name, w in cfg.reward.weights.items():
        kw = dict(cfg.reward.kwargs.get(name, {}))
        if not name.startswith("remote:"):
            kw.setdefault("device", dev)
        spec[name] = {"weight": w, **kw}
    return Compose(spec, device=dev)


def lora_settings(cfg: Config, adapter) -> dict[str, Any]:
    """Rank/alpha/targets: the config's, else the adapter family's defaults (flow_grpo: SD3/Wan r32/a64 attention,
    FLUX r64/a128 attention + FF). Overriding only the rank keeps the adapter's alpha/rank ratio."""
    lo = cfg.model.lora
    rank = lo.rank or adapter.lora_rank
    alpha = lo.alpha if lo.alpha is not None else adapter.lora_alpha * rank / adapter.lora_rank
    targets = lo.target_modules or list(adapter.lora_target_modules)
    if not targets:
        raise ValueError(f"adapter {type(adapter).__name__} declares no lora_target_modules; "
                         "set model.lora.target_modules")
    init: Any = {"default": True, "true": True, "false": False}.get(str(lo.init).lower(), lo.init)
    return {"r": int(rank), "lora_alpha": float(alpha), "target_modules": targets, "init_lora_weights": init,
            "lora_dropout": lo.dropout}


def apply_lora(module: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """Freeze ``module`` and inject peft LoRA layers in place (the adapter keeps calling the same module)."""
    from peft import LoraConfig, inject_adapter_in_model

    module.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(**settings), module, adapter_name="default")
    for n, p in module.named_parameters():
        p.requires_grad_("lora_" in n)
    return module


def tuner_layers(module: nn.Module) -> list:
    """The peft tuner (LoRA) layers inside ``module``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def lora_disabled(module: nn.Module, layers: list | None = None) -> Iterator[None]:
    """The base model: every peft tuner layer of ``module`` bypassed (flow_grpo ``disable_adapter()``)."""
    layers = tuner_layers(module) if layers is None else layers
    flags = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, was_disabled in zip(layers, flags):
            m.enable_adapters(not was_disabled)


@contextlib.contextmanager
def weights_swapped(params: list[nn.Parameter], frozen: list[torch.Tensor]) -> Iterator[None]:
    """Point ``params`` at ``frozen`` tensors (full fine-tuning reference) and back; no copies."""
    live = [p.data for p in params]
    for p, f in zip(params, frozen):
        p.data = f
    try:
        yield
    finally:
        for p, d in zip(params, live):
            p.data = d


@contextlib.contextmanager
@torch.no_grad()
def weights_copied(params: list[nn.Parameter], frozen: list[torch.Tensor]) -> Iterator[None]:
    """``weights_swapped`` for FSDP: sharded parameters must be written in place (FSDP all-gathers from their own
    storage, a ``.data`` swap would go unseen); restored bit-exactly."""
    live = [p.detach().clone() for p in params]
    for p, f in zip(params, frozen):
        p.copy_(f)
    try:
        yield
    finally:
        for p, d in zip(params, live):
            p.copy_(d)


# ----------------------------------------------------------------------------------------------- FSDP
def fsdp_requested(accelerator) -> bool:
    """Whether ``accelerate launch`` asked for FSDP. accelerate reports ``DistributedType.FSDP`` only on GPUs; on a
    CPU (gloo) launch the request survives only in ``ACCELERATE_USE_FSDP``."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")


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


# ----------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the model, optimizer, EMA, checkpoints and logs; delegates data and loss to a ``Method``.

    ``adapter`` and ``reward_fn`` may be passed in (tests, notebooks); otherwise they are built from ``cfg``.
    """

    def __init__(self, cfg: Config, adapter=None, reward_fn=None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, set_seed

        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        # accelerate only sets up a CPU (gloo) process group when asked for CPU; without it, torchrun on a
        # machine without GPUs silently starts independent single-process runs
        cpu = cfg.cpu or (launched > 1 and not _has_accelerator())
        self.accelerator = acc = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision,
                                             log_with=cfg.log.trackers or None, project_dir=str(self.output_dir))
        if acc.num_processes != launched:
            raise RuntimeError(f"launched with WORLD_SIZE={launched} but accelerate set up {acc.num_processes} "
                               "process(es); check the launcher / accelerate config")
        if acc.distributed_type == DistributedType.DEEPSPEED:
            raise NotImplementedError("DeepSpeed is not supported; shard with FSDP instead (accelerate launch "
                                      "--use_fsdp) or launch plain data-parallel (accelerate launch --multi_gpu)")
        self.fsdp = fsdp_requested(acc)
        if self.fsdp and cfg.train.adam_8bit:
            raise ValueError("train.adam_8bit does not work on FSDP-sharded parameters; set train.adam_8bit=false")
        if cfg.deterministic:  # before any kernel runs (cuBLAS reads its workspace config once)
            from flowalign.doctor import set_deterministic

            set_deterministic(True)
        set_seed(cfg.seed)  # LoRA init etc.: identical on every process
        self.device = acc.device

        self.adapter = adapter if adapter is not None else build_adapter(cfg, self.device)
        self.module = self.adapter.trainable_module()
        if cfg.model.gradient_checkpointing and hasattr(self.module, "enable_gradient_checkpointing"):
            self.module.enable_gradient_checkpointing()
        self._setup_params()
        self.fsdp_modules: list[nn.Module] = self._shard() if self.fsdp else []

        self.reward_fn = reward_fn if reward_fn is not None else build_reward(cfg, self.device)
        self.runtime = Runtime(device=self.device, rank=acc.process_index, world_size=acc.num_processes,
                               seed=cfg.seed, gather=self._gather, autocast=acc.autocast, reference=self.reference)
        self.method: Method = METHODS.get(cfg.train.method)(cfg, self.adapter, self.reward_fn, self.runtime)
        self.method.check_world(acc.num_processes)

        t = cfg.train
        if t.adam_8bit:
            try:
                import bitsandbytes as bnb
            except ImportError as e:
                raise ImportError("train.adam_8bit=true needs `pip install bitsandbytes`") from e
            opt_cls: Callable = bnb.optim.AdamW8bit
        else:
            opt_cls = torch.optim.AdamW
        optimizer = opt_cls(self.params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                            eps=t.adam_eps)
        self.optimizer = acc.prepare_optimizer(optimizer)  # handles the fp16 grad scaler
        from diffusers.optimization import get_scheduler

        total_steps = cfg.max_iterations * t.updates_per_iteration * t.num_inner_epochs
        # not accelerator.prepare'd: that would step it once per process per optimizer step
        self.lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                                          num_training_steps=total_steps)
        self.ema = EMA(self.params, cfg.ema.decay, cfg.ema.interval) if cfg.ema.enabled else None
        self.state = TrainState()
        self.eval_fn: Callable[["Trainer"], dict] = import_string(cfg.eval.fn)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.output_dir / "checkpoints"
        self.history: list[dict] = []
        self._elapsed_before = 0.0
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(cfg.to_yaml())
        self.jsonl = Path(cfg.log.jsonl) if cfg.log.jsonl else self.output_dir / "metrics.jsonl"
        if cfg.log.trackers:
            acc.init_trackers(cfg.log.project, config=_flat(cfg.to_dict()))
        if cfg.resume:
            self.load_checkpoint(ckpt.resolve(cfg.resume, self.ckpt_dir))

    # ------------------------------------------------------------------------------------------- params
    def _setup_params(self) -> None:
        from diffusers.training_utils import cast_training_params

        lo = self.cfg.model.lora
        self.ref_weights: list[torch.Tensor] | None = None
        if lo.enabled:
            self.lora = lora_settings(self.cfg, self.adapter)
            apply_lora(self.module, self.lora)
            self._tuner_layers = tuner_layers(self.module)
        else:
            self.lora = None
            self.module.requires_grad_(True)
        cast_training_params(self.module, dtype=torch.float32)  # trainable weights stay fp32 (frozen: model.dtype)
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters: check model.lora.target_modules")
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if not lo.enabled and self.cfg.train.beta > 0:
            self.ref_weights = [p.detach().clone() for p in self.params]
        if lo.path:
            self._load_weights(lo.path)

    def _shard(self) -> list[nn.Module]:
        """FSDP: shard the trainable module; its parameters become new (DTensor) objects, so re-collect them."""
        after = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()  # v1 names a sharding strategy
        self._reshard_after_forward = after not in ("false", "shard_grad_op", "no_shard")
        mods = shard_module(self.module, torch.device(self.device), self.accelerator.num_processes,
                            reshard_after_forward=self._reshard_after_forward)
        named = dict(self.module.named_parameters())
        self.params = [named[n] for n in self.param_names]
        if self.ref_weights is not None:
            self.ref_weights = [shard_like(r, p).detach() for r, p in zip(self.ref_weights, self.params)]
        return mods

    def _load_weights(self, path: str) -> None:
        from safetensors.torch import load_file

        p = Path(path)
        file = p / "weights.safetensors" if p.is_dir() else p
        state = load_file(str(file))
        missing = [n for n in self.param_names if n not in state]
        if missing:
            raise ValueError(f"{file} lacks {len(missing)} trainable parameters, e.g. {missing[:3]}")
        with torch.no_grad():
            for n, prm in zip(self.param_names, self.params):
                prm.copy_(shard_like(state[n], prm))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parameters by name, whole (under FSDP a collective: call it on every rank)."""
        return {n: full_tensor(p.detach()) for n, p in zip(self.param_names, self.params)}

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside: the adapter computes the reference (initial) policy."""
        if self.lora is not None:
            with lora_disabled(self.module, self._tuner_layers):
                yield
        elif self.ref_weights is not None:
            with (weights_copied if self.fsdp else weights_swapped)(self.params, self.ref_weights):
                yield
        else:
            raise RuntimeError("full fine-tuning keeps a reference copy only when train.beta > 0")

    # ------------------------------------------------------------------------------------------- comms
    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(t.contiguous()) if self.accelerator.num_processes > 1 else t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return t
        out = t.to(self.device)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out.to(t.device)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return t
        out = t.to(self.device)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
        return out.to(t.device)

    def _sum_grads(self) -> None:
        """Sum the trainable gradients over processes (the method's loss is globally normalised).

        One flat all-reduce carries the gradients plus a has-grad flag per parameter, so a parameter that no
        process touched keeps ``grad=None`` (AdamW then skips it, exactly as in a single process).
        """
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flags = torch.tensor([float(p.grad is not None) for p in self.params], device=self.device)
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [flags])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset: offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        for p, used in zip(self.params, flat[offset:].tolist()):
            if used == 0:
                p.grad = None

    # ------------------------------------------------------------------------------------------- loop
    def step(self) -> dict[str, Any]:
        """One iteration: collect, ``num_updates`` optimizer steps, logs. Returns the logged record."""
        acc, cfg = self.accelerator, self.cfg
        t0 = time.perf_counter()
        self.module.eval()
        col: Collected = self.method.collect(self.state)
        t1 = time.perf_counter()
        self.module.train()
        by_update: dict[int, list[tuple[Any, float]]] = {}  # update -> (batch, loss scale)
        for b in col.batches:
            by_update.setdefault(b.update, []).append((b, 1.0))
        if self.fsdp:
            self._pad_batches(by_update, col.num_updates)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # per key: a metric may come from some micro-batches only
        grad_norms, losses = [], []
        self.optimizer.zero_grad(set_to_none=True)
        for u in range(col.num_updates):
            loss_sum = 0.0
            for b, scale in by_update.get(u, []):
                loss, metrics = self.method.loss(b)
                if scale != 1.0:  # FSDP padding: the collectives run, the gradient gets exact zeros
                    acc.backward(loss * scale)
                    continue
                acc.backward(loss)
                loss_sum += float(loss.detach())
                for k, v in metrics.items():
                    v, old = float(v), sums.get(k)
                    # *_max / *_min keys keep their extreme, the rest their mean over the batches reporting them
                    sums[k] = v if old is None else max(old, v) if k.endswith("_max") else min(old, v) \
                        if k.endswith("_min") else old + v
                    counts[k] = counts.get(k, 0) + 1
            if not self.fsdp:  # FSDP has already reduce-scattered (summed) them
                self._sum_grads()
            max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else math.inf
            norm = acc.clip_grad_norm_(self.params, max_norm)
            grad_norms.append(float(full_tensor(norm)))
            losses.append(loss_sum)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.step(self.state.global_step)
            self.state.global_step += 1
        t2 = time.perf_counter()
        self.state.iteration += 1
        self.state.samples += col.num_samples * acc.num_processes

        # per-micro-batch metrics: mean over the batches reporting them (all processes); *_max/*_min: extremes
        keys = sorted(sums)
        ext = [k for k in keys if k.endswith(("_max", "_min"))]
        avg = [k for k in keys if k not in ext]
        vec = self.all_reduce_sum(torch.tensor([sums[k] for k in avg] + [float(counts[k]) for k in avg],
                                               dtype=torch.float64))
        loss_metrics = {k: vec[i].item() / max(vec[len(avg) + i].item(), 1.0) for i, k in enumerate(avg)}
        signed = torch.tensor([sums[k] if k.endswith("_max") else -sums[k] for k in ext], dtype=torch.float64)
        signed = self.all_reduce_max(signed)
        loss_metrics.update({k: signed[i].item() if k.endswith("_max") else -signed[i].item()
                             for i, k in enumerate(ext)})
        it_time = t2 - t0
        record = {
            "iteration": self.state.iteration, "global_step": self.state.global_step,
            "samples": self.state.samples, "lr": self.lr_scheduler.get_last_lr()[0],
            **col.metrics, **loss_metrics,
            # the objective of each update summed over processes = the loss that was minimised
            "loss": float(self.all_reduce_sum(torch.tensor(losses or [0.0], dtype=torch.float64)).mean()),
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
            "num_updates": col.num_updates,
            **{f"time/{k}": v for k, v in col.timings.items()},
            "time/train": t2 - t1, "time/iteration": it_time,
            "images_per_s": col.num_samples * acc.num_processes / max(it_time, 1e-9),
        }
        self._log(record, col)
        return record

    def _pad_batches(self, by_update: dict[int, list[tuple[Any, float]]], num_updates: int) -> None:
        """FSDP: give every rank as many micro-batches per update as the busiest one (FSDP's all-gathers and
        reduce-scatters are collectives, one per forward/backward of each shard), padding with zero-scaled repeats
        of a local batch. The methods split rows by a global shuffle, so local counts differ."""
        counts = torch.tensor([float(len(by_update.get(u, []))) for u in range(num_updates)], dtype=torch.float64)
        most = self.all_reduce_max(counts.clone())
        if not torch.equal(counts, most):
            mine = [b for bs in by_update.values() for b, _ in bs]
            if not mine:
                raise RuntimeError(f"rank {self.accelerator.process_index} has no micro-batch this iteration but "
                                   "others do; FSDP needs one on every rank (use more rows per process)")
            for u in range(num_updates):
                by_update.setdefault(u, []).extend((mine[0], 0.0) for _ in range(int(most[u] - counts[u])))

    @contextlib.contextmanager
    def _gathered(self) -> Iterator[None]:
        """FSDP: whole weights on every rank, so forwards need no collectives (ranks may differ in count)."""
        if not self.fsdp:
            yield
            return
        for m in self.fsdp_modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in self.fsdp_modules:
                m.reshard()
                m.set_reshard_after_forward(self._reshard_after_forward, recurse=False)

    def _log(self, record: dict, col: Collected) -> None:
        acc, cfg = self.accelerator, self.cfg
        self.history.append(record)
        if acc.is_main_process:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            with self.jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")
            every = cfg.log.sample_images_every
            if every and self.state.iteration % every == 0 and col.images is not None:
                self.save_images(col.images)
        if cfg.log.trackers:
            acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=self.state.iteration)

    def save_images(self, images: torch.Tensor) -> Path:
        from torchvision.utils import save_image

        if images.ndim == 5:  # video: first frame of each sample
            images = images[:, 0]
        path = self.output_dir / "samples" / f"iter_{self.state.iteration:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(images[:16].float(), str(path), nrow=min(8, len(images)))
        return path

    def _should_stop(self, start: float) -> bool:
        if self.cfg.max_minutes is None:
            return False
        over = (self._elapsed_before + time.time() - start) > self.cfg.max_minutes * 60
        # every process must take the same decision
        flag = self.all_reduce_sum(torch.tensor([float(over)], dtype=torch.float64))
        return bool(flag.item() > 0)

    def train(self) -> list[dict]:
        """Run until ``max_iterations`` (or ``max_minutes``); returns the per-iteration records."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        start = time.time()
        bar = tqdm(total=cfg.max_iterations, initial=self.state.iteration, desc="flowalign",
                   disable=not (cfg.log.progress and acc.is_main_process), dynamic_ncols=True)
        try:
            while self.state.iteration < cfg.max_iterations and not self._should_stop(start):
                rec = self.step()
                bar.update(1)
                bar.set_postfix(reward=f"{rec.get('reward_mean', float('nan')):.4f}",
                                kl=f"{rec.get('approx_kl', 0.0):.2e}")
                it = self.state.iteration
                if cfg.eval.every and it % cfg.eval.every == 0:
                    self.evaluate()
                if cfg.checkpoint.every and it % cfg.checkpoint.every == 0:
                    self.save_checkpoint(elapsed=self._elapsed_before + time.time() - start)
            last_eval = self.history and cfg.eval.every and self.state.iteration % cfg.eval.every
            if last_eval:
                self.evaluate()
            if cfg.checkpoint.save_final and (not cfg.checkpoint.every
                                              or self.state.iteration % cfg.checkpoint.every):
                self.save_checkpoint(elapsed=self._elapsed_before + time.time() - start)
        finally:
            bar.close()
            self.method.close()
            if cfg.log.trackers:
                acc.end_training()
        return self.history

    # ------------------------------------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, float]:
        use_ema = self.cfg.eval.use_ema and self.ema is not None
        self.module.eval()
        with torch.no_grad(), (self.ema.swapped_in() if use_ema else contextlib.nullcontext()), self._gathered():
            res = self.eval_fn(self)
        res = {"iteration": self.state.iteration, **res}
        if self.accelerator.is_main_process:
            with self.jsonl.open("a") as f:
                f.write(json.dumps(res) + "\n")
        if self.cfg.log.trackers:
            self.accelerator.log({k: v for k, v in res.items() if k != "iteration"}, step=self.state.iteration)
        return res

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, elapsed: float = 0.0) -> Path:
        acc = self.accelerator
        state = {"iteration": self.state.iteration, "global_step": self.state.global_step,
                 "samples": self.state.samples, "elapsed_s": elapsed, "world_size": acc.num_processes,
                 "fsdp": self.fsdp,
                 "method": self.method.state_dict(), "lora": self.lora, "config": self.cfg.to_dict()}
        # whole tensors in the single-process layout (collectives under FSDP: every rank builds them)
        ema = None if self.ema is None else {n: full_tensor(t)
                                             for n, t in self.ema.state_dict(self.param_names).items()}
        return ckpt.save(
            self.ckpt_dir, self.state.iteration, weights=self.trainable_state_dict(),
            optimizer=self._optimizer_state(), scheduler=self.lr_scheduler.state_dict(), state=state, ema=ema,
            rank=acc.process_index, is_main=acc.is_main_process, barrier=acc.wait_for_everyone,
            keep_last=self.cfg.checkpoint.keep_last)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        data = ckpt.load(path, rank=self.accelerator.process_index)
        st = data["state"]
        self._load_weights(str(Path(path) / "weights.safetensors"))
        self.optimizer.load_state_dict(self._shard_optimizer_state(data["optimizer"]))
        if "scheduler" in data:
            self.lr_scheduler.load_state_dict(data["scheduler"])
        if self.ema is not None:
            if "ema" not in data:
                raise ValueError(f"{path} has no EMA state but ema.enabled is true")
            self.ema.load_state_dict({n: shard_like(data["ema"][n], p) for n, p in zip(self.param_names, self.params)
                                      if n in data["ema"]}, self.param_names)
        self.method.load_state_dict(st["method"])
        self.state = TrainState(iteration=st["iteration"], global_step=st["global_step"], samples=st["samples"])
        self._elapsed_before = float(st.get("elapsed_s", 0.0))
        if "rng" in data:
            ckpt.set_rng_state(data["rng"])
        if self.accelerator.is_main_process:  # iterations logged after this checkpoint are about to run again
            ckpt.truncate_log(self.jsonl, self.state.iteration)

    def _opt_params(self) -> list[torch.Tensor]:
        """The optimizer's parameters in ``state_dict`` index order."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _optimizer_state(self) -> dict:
        """``optimizer.state_dict()`` with whole tensors (FSDP shards gathered, a collective)."""
        sd = self.optimizer.state_dict()
        if self.fsdp:
            sd["state"] = {i: {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in st.items()}
                           for i, st in sd["state"].items()}
        return sd

    def _shard_optimizer_state(self, sd: dict) -> dict:
        """A whole-tensor optimizer state laid out like the (possibly sharded) parameters."""
        if not self.fsdp:
            return sd
        params = self._opt_params()
        state = {}
        for i, st in sd["state"].items():
            p = params[int(i)]
            state[i] = {k: shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                        for k, v in st.items()}
        return {**sd, "state": state}


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool((xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()))


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
        else:
            out[key] = str(v)
    return out


def train(cfg: Config, adapter=None, reward_fn=None) -> list[dict]:
    """Build a ``Trainer`` and run it; returns the per-iteration metric records."""
    return Trainer(cfg, adapter=adapter, reward_fn=reward_fn).train()
