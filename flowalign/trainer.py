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
gradients as a SUM (divide factor 1, sum-only collectives: our loss is globally normalised) and the explicit
gradient sum is skipped. Every rank must run the same forwards/backwards in the same order, so micro-batch lists are
padded to the longest rank with zero-weighted repeats, and eval runs with the weights gathered (ranks evaluate
different prompt counts). Checkpoints hold full tensors in the same files as a single process: a run can be resumed
at any process count, sharded or not. DeepSpeed needs CUDA and is refused with a clear error. The collectives and
the FSDP plumbing live in ``flowalign.distributed``.

The reference policy for KL terms is the same network with the LoRA adapters disabled (flow_grpo
``disable_adapter()``); for full fine-tuning a frozen copy of the initial weights is swapped in. LoRA injection,
the reference swaps and trainable-weight loading live in ``flowalign.lora`` (re-exported here).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from flowalign import checkpoint as ckpt
from flowalign import distributed as dist
from flowalign import guards, trackers
from flowalign.adapter import Adapter, adapter_from_config
from flowalign.config import Config
from flowalign.distributed import fsdp_requested, full_tensor, shard_like, shard_module
from flowalign.ema import EMA
# apply_lora and tuner_layers are re-exported: doctor, eval tests and benchmarks import them from here
from flowalign.lora import (apply_lora, load_trainable, lora_disabled, lora_settings,  # noqa: F401
                            tuner_layers, weights_copied, weights_swapped)
from flowalign.methods import METHODS, Collected, Method, Runtime, TrainState
from flowalign.registry import import_string


# ----------------------------------------------------------------------------------------------- building
def build_adapter(cfg: Config, device: torch.device | str = "cpu") -> Adapter:
    """Load ``cfg.model.adapter`` from ``cfg.model.path`` (``flowalign.adapter.adapter_from_config``: the one
    ``load_adapter``, ``model.dtype`` from ``DTYPES``)."""
    return adapter_from_config(cfg, device)


def build_reward(cfg: Config, device: torch.device | str = "cpu", inline: dict[str, Any] | None = None):
    """``Compose`` of ``cfg.reward.weights`` with per-reward kwargs (components are logged separately);
    ``inline``: reward objects / callables by name (``train(rewards=[fn, ...])``, ``flowalign.api``)."""
    from flowalign.api import build_rewards

    return build_rewards(cfg, device, inline)


# ----------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the model, optimizer, EMA, checkpoints and logs; delegates data and loss to a ``Method``.

    ``adapter`` and ``reward_fn`` may be passed in (tests, notebooks); otherwise they are built from ``cfg``.
    """

    def __init__(self, cfg: "Config | str | os.PathLike | dict", adapter=None, reward_fn=None, *, rewards: Any = None,
                 prompts: Any = None, overrides: Sequence[str] | None = None, overwrite: bool = False,
                 allow_config_change: Sequence[str] = ()) -> None:
        """``cfg``: a ``Config``, a recipe path or shipped name, or a dict; ``rewards`` (callables, names,
        ``Reward`` objects), ``prompts`` (any ``load_prompts`` source) and ``overrides``: ``flowalign.api``.
        ``overwrite``: a fresh run may take over an output directory that holds another run (moved aside,
        ``flowalign.guards``); ``allow_config_change``: config keys a resume may change (``--allow-config-change``).
        """
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, set_seed

        self._inline_rewards: dict[str, Any] = {}
        if (not isinstance(cfg, Config) or rewards is not None or prompts is not None or overrides
                or (reward_fn is not None and not cfg.reward.weights)):
            from flowalign.api import prepare

            cfg, self._inline_rewards = prepare(cfg, rewards, prompts, overrides, reward_fn)
            if any(r is reward_fn for r in self._inline_rewards.values()):
                reward_fn = None  # wrapped into the Compose below: named, weighted, logged per component
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        # accelerate only sets up a CPU (gloo) process group when asked for CPU; without it, torchrun on a
        # machine without GPUs silently starts independent single-process runs
        cpu = cfg.cpu or (launched > 1 and not dist.has_accelerator())
        self.accelerator = acc = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision,
                                             log_with=trackers.log_with(cfg.log, self.output_dir),
                                             project_dir=str(self.output_dir))
        if acc.num_processes != launched:
            raise RuntimeError(f"launched with WORLD_SIZE={launched} but accelerate set up {acc.num_processes} "
                               "process(es); check the launcher / accelerate config")
        if acc.distributed_type == DistributedType.DEEPSPEED:
            raise NotImplementedError(
                "DeepSpeed (accelerate launch --use_deepspeed) is not supported by flowalign's trainer; FSDP is the "
                "equivalent: ZeRO-2 -> `accelerate launch --use_fsdp --fsdp_sharding_strategy SHARD_GRAD_OP`, "
                "ZeRO-3 -> `--use_fsdp --fsdp_sharding_strategy FULL_SHARD` (docs/migration from flow_grpo), or "
                "plain data-parallel with `accelerate launch --multi_gpu`")
        self.fsdp = fsdp_requested(acc)
        if self.fsdp and cfg.train.adam_8bit:
            raise ValueError("train.adam_8bit does not work on FSDP-sharded parameters; set train.adam_8bit=false")
        if cfg.deterministic:  # before any kernel runs (cuBLAS reads its workspace config once)
            from flowalign.determinism import set_deterministic

            set_deterministic(True)
        set_seed(cfg.seed)  # LoRA init etc.: identical on every process
        self.device = acc.device
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.output_dir / "checkpoints"
        self.jsonl = Path(cfg.log.jsonl) if cfg.log.jsonl else self.output_dir / "metrics.jsonl"
        # before the model loads: a used output dir, a damaged checkpoint or a changed config fail fast
        self._resume_path, self.config_changes = self._check_run(overwrite, allow_config_change)

        self.adapter = adapter if adapter is not None else build_adapter(cfg, self.device)
        self.module = self.adapter.trainable_module()
        if cfg.model.gradient_checkpointing and hasattr(self.module, "enable_gradient_checkpointing"):
            self.module.enable_gradient_checkpointing()
        self._setup_params()
        self.fsdp_modules: list[nn.Module] = self._shard() if self.fsdp else []

        self.reward_fn = (reward_fn if reward_fn is not None
                          else build_reward(cfg, self.device, self._inline_rewards))
        self.runtime = Runtime(device=self.device, rank=acc.process_index, world_size=acc.num_processes,
                               seed=cfg.seed, gather=self._gather, autocast=acc.autocast, reference=self.reference,
                               progress=self._inner_bar)
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
        self.history: list[dict] = []
        self._elapsed_before = 0.0
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(cfg.to_yaml())
        trackers.start(acc, cfg.log, cfg.to_dict())  # log.trackers/project/run_name/init_kwargs
        if self._resume_path is not None:
            self.load_checkpoint(self._resume_path)
            self._apply_config_changes()

    # ------------------------------------------------------------------------------------------- run guards
    def _check_run(self, overwrite: bool, allow: Sequence[str]) -> tuple[Path | None, list[tuple[str, Any, Any]]]:
        """A fresh run: refuse a used output dir unless ``overwrite`` (then move the old run aside). A resume:
        the newest intact checkpoint (``ckpt.resolve``; None = none yet, start afresh) and the allowed config
        changes against the checkpoint's config (``guards.resume_changes`` refuses the others)."""
        cfg, acc = self.cfg, self.accelerator
        if not cfg.resume:
            if guards.run_files(self.output_dir, self.jsonl, self.ckpt_dir) and not overwrite:
                guards.prepare_output_dir(self.output_dir, self.jsonl, self.ckpt_dir, overwrite=False)  # raises
            if acc.is_main_process:
                aside = guards.prepare_output_dir(self.output_dir, self.jsonl, self.ckpt_dir, overwrite=True)
                if aside is not None:
                    print(f"--overwrite: the previous run in {self.output_dir} was moved to {aside}", file=sys.stderr)
            acc.wait_for_everyone()
            return None, []
        path = ckpt.resolve(cfg.resume, self.ckpt_dir)
        if path is None:  # killed before its first checkpoint: start afresh, without the killed run's rows
            if acc.is_main_process:
                print(f"warning: --resume {cfg.resume}: no checkpoint under {self.ckpt_dir}; starting afresh",
                      file=sys.stderr)
                ckpt.truncate_log(self.jsonl, 0)
            return None, []
        old = json.loads((path / "state.json").read_text()).get("config") or {}
        changes = guards.resume_changes(old, cfg.to_dict(), allow, where=str(path), defaults=Config().to_dict())
        if acc.is_main_process:
            for key, a, b in changes:
                print(f"--resume: config change {key}: {a!r} -> {b!r}", file=sys.stderr)
        return path, changes

    def _apply_config_changes(self) -> None:
        """After loading a checkpoint: the optimizer hyper-parameters and the LR schedule of the *new* config
        (the loaded optimizer/scheduler state carries the old lr, betas, ...; the schedule's lambdas are already
        the new config's, its ``base_lrs`` are not). LambdaLR: lr = base_lr * lambda(last_epoch)."""
        keys = ("train.lr", "train.betas", "train.weight_decay", "train.adam_eps", "train.lr_scheduler",
                "train.warmup_steps", "max_iterations", "train.updates_per_iteration", "train.num_inner_epochs")
        if not any(k == c or k.startswith(c + ".") or c.startswith(k + ".") for c, _, _ in self.config_changes
                   for k in keys):
            return
        t, sched = self.cfg.train, self.lr_scheduler
        for g in self.optimizer.param_groups:
            g.update(betas=tuple(t.betas), weight_decay=t.weight_decay, eps=t.adam_eps, initial_lr=t.lr)
        sched.base_lrs = [t.lr] * len(sched.base_lrs)
        lrs = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs)]
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        sched._last_lr = lrs  # what get_last_lr() (the logged lr) reports until the next step

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
        self._reshard_after_forward = dist.reshard_after_forward_requested()
        mods = shard_module(self.module, torch.device(self.device), self.accelerator.num_processes,
                            reshard_after_forward=self._reshard_after_forward)
        named = dict(self.module.named_parameters())
        self.params = [named[n] for n in self.param_names]
        if self.ref_weights is not None:
            self.ref_weights = [shard_like(r, p).detach() for r, p in zip(self.ref_weights, self.params)]
        return mods

    def _load_weights(self, path: str) -> None:
        load_trainable(path, self.param_names, self.params)

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
        return dist.all_reduce(t, "sum", self.device, self.accelerator.num_processes)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce(t, "max", self.device, self.accelerator.num_processes)

    # ------------------------------------------------------------------------------------------- loop
    def step(self) -> dict[str, Any]:
        """One iteration: collect, ``num_updates`` optimizer steps, logs. Returns the logged record."""
        acc, cfg = self.accelerator, self.cfg
        t0 = time.perf_counter()
        self.module.eval()
        from flowalign.rewards.base import NonFiniteRewardError  # the reward library's "reward NAME gave NaN"

        it = self.state.iteration + 1
        try:
            col: Collected = self.method.collect(self.state)
        except NonFiniteRewardError as e:
            raise guards.NonFiniteError(f"iteration {it}: non-finite reward: {e}") from e
        t1 = time.perf_counter()
        self.module.train()
        by_update: dict[int, list[tuple[Any, float]]] = {}  # update -> (batch, loss scale)
        for b in col.batches:
            by_update.setdefault(b.update, []).append((b, 1.0))
        if self.fsdp:
            dist.pad_batches(by_update, col.num_updates, self.all_reduce_max, acc.process_index)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # per key: a metric may come from some micro-batches only
        grad_norms, losses = [], []
        self.optimizer.zero_grad(set_to_none=True)
        for u in self._inner_bar(range(col.num_updates), "updates"):
            loss_sum, bad_loss = 0.0, None
            for b, scale in by_update.get(u, []):
                loss, metrics = self.method.loss(b)
                if bad_loss is None and not bool(torch.isfinite(loss.detach())):
                    bad_loss = float(loss.detach())
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
                dist.sum_grads(self.params, self.device, acc.num_processes)
            max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else math.inf
            norm = acc.clip_grad_norm_(self.params, max_norm)
            grad_norms.append(float(full_tensor(norm)))
            # the gradients are summed over processes, so their norm is the same everywhere: every rank stops
            # together on it; with one process a NaN/inf loss stops the run even when its gradient is finite
            if not math.isfinite(grad_norms[-1]) or (bad_loss is not None and acc.num_processes == 1):
                what = f"loss is {bad_loss}" if bad_loss is not None else f"gradient norm is {grad_norms[-1]}"
                raise guards.NonFiniteError(f"iteration {it}, update {u}: {what} (method {self.cfg.train.method}); "
                                            "stopped before the optimizer step, no checkpoint written")
            losses.append(loss_sum)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.step(self.state.global_step)
            self.state.global_step += 1
        self._check_weights(it)
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

    def _check_weights(self, it: int) -> None:
        """NaN/inf in the trainable weights after the iteration's optimizer steps (an overflowing update) stops
        the run; under FSDP each rank checks its shards and the flags are combined."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]
        bad = guards.first_non_finite(self.param_names, local)
        if self.fsdp:
            flag = self.all_reduce_max(torch.tensor([float(bad is not None)], dtype=torch.float64))
            bad = bad or ("a parameter shard on another process" if flag.item() > 0 else None)
        if bad is not None:
            raise guards.NonFiniteError(f"iteration {it}: weights after the optimizer step hold NaN or inf ({bad}); "
                                        "stopped, no checkpoint written")

    def _gathered(self) -> contextlib.AbstractContextManager:
        """FSDP: whole weights on every rank, so forwards need no collectives (ranks may differ in count)."""
        return dist.gathered(self.fsdp_modules, self._reshard_after_forward) if self.fsdp else contextlib.nullcontext()

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
                trackers.log_images(acc, "samples/images", col.images, col.captions, self.state.iteration)
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

    def _inner_bar(self, iterable: Any, desc: str) -> Any:
        """A transient bar over a loop inside one iteration (sampling chunks, updates); main process only."""
        from flowalign.console import inner

        return inner(iterable, desc, enabled=self.cfg.log.progress and self.accelerator.is_main_process)

    def summary(self) -> str:
        """The start-up block ``train`` prints (``flowalign.console.summary``)."""
        from flowalign.console import summary

        weights = getattr(self.reward_fn, "weights", None)
        return summary(self.cfg, trainable=sum(p.numel() for p in self.params),
                       total=sum(p.numel() for p in self.module.parameters()),
                       world_size=self.accelerator.num_processes,
                       reward_weights=weights if isinstance(weights, dict) else None)

    def train(self) -> list[dict]:
        """Run until ``max_iterations`` (or ``max_minutes``); returns the per-iteration records. Prints the
        start-up summary and a progress bar whose total is the time budget when ``max_minutes`` is set."""
        from flowalign.console import RunBar

        cfg, acc = self.cfg, self.accelerator
        start = time.time()
        if acc.is_main_process:
            print(self.summary(), flush=True)
        bar = RunBar(cfg.max_iterations, cfg.max_minutes, iteration=self.state.iteration,
                     elapsed_s=self._elapsed_before, enabled=cfg.log.progress and acc.is_main_process)
        try:
            while self.state.iteration < cfg.max_iterations and not self._should_stop(start):
                rec = self.step()
                bar.update(self.state.iteration, reward=f"{rec.get('reward_mean', float('nan')):.4f}",
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
            trackers.log_eval_grid(self.accelerator, self.output_dir / "eval" / f"iter-{self.state.iteration:06d}"
                                   / ("rank-0" if self.accelerator.num_processes > 1 else ""), self.state.iteration)
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
        weights = self.trainable_state_dict()
        from flowalign.export import image_checkpoint_export  # <checkpoint>/export, written inside the temp dir

        path = ckpt.save(
            self.ckpt_dir, self.state.iteration, weights=weights,
            optimizer=self._optimizer_state(), scheduler=self.lr_scheduler.state_dict(), state=state, ema=ema,
            rank=acc.process_index, is_main=acc.is_main_process, barrier=acc.wait_for_everyone,
            keep_last=self.cfg.checkpoint.keep_last, extra=image_checkpoint_export(self, weights, ema, state))
        if acc.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(f"checkpoint saved to {path}")  # above the progress bar, not through it
        return path

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

    def _optimizer_state(self) -> dict:
        """``optimizer.state_dict()`` with whole tensors (FSDP shards gathered, a collective)."""
        sd = self.optimizer.state_dict()
        return dist.full_optimizer_state(sd) if self.fsdp else sd

    def _shard_optimizer_state(self, sd: dict) -> dict:
        """A whole-tensor optimizer state laid out like the (possibly sharded) parameters."""
        if not self.fsdp:
            return sd
        return dist.shard_optimizer_state(sd, [p for g in self.optimizer.param_groups for p in g["params"]])


def train(cfg: "Config | str | os.PathLike | dict", rewards: Any = None, prompts: Any = None, *,
          overrides: Sequence[str] | None = None, adapter=None, reward_fn=None, **kwargs: Any) -> list[dict]:
    """Build a ``Trainer`` and run it; returns the per-iteration metric records. ``cfg``: a ``Config``, a recipe
    path or shipped name, or a dict; ``rewards``: callables ``fn(images, prompts, metadata)``, registered names
    and ``Reward`` objects (a list, or ``{reward: weight}``); ``prompts``: a list, a .txt/.jsonl/.csv path, a
    ``datasets.Dataset`` or a ``{dataset, split, column}`` spec (``flowalign.api``); ``kwargs``: ``overwrite``,
    ``allow_config_change``."""
    return Trainer(cfg, adapter=adapter, reward_fn=reward_fn, rewards=rewards, prompts=prompts, overrides=overrides,
                   **kwargs).train()
