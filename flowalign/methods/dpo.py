"""Offline Diffusion-DPO (Wallace et al., arXiv 2311.12908) and Flow-DPO (VideoAlign, Liu et al., arXiv 2501.13918).

Data: a pairs dataset (``flowalign.pairs``: JSONL of ``id, prompt, chosen, rejected`` image/video paths, or a
labelled queue folder written by ``flowalign label serve``), validated in full when the method is built -- every bad
row is reported in one ``PairsError`` before anything trains.

Per pair and timestep (shared noise ``eps`` and noise level for chosen ``w`` and rejected ``l``, reference B3-B4)::

    x0 = latents of the image (VAE encode, a sample of the posterior; pixel-space models: 2 img - 1)
    epsilon models: t ~ U{0..T-1},  x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps,  target = eps   (Diffusion-DPO)
    flow models:    u ~ logit-normal(0, 1) (or uniform), sigma = shift u / (1 + (shift - 1) u),
                    x_t = (1 - sigma) x0 + sigma eps,  target = v = eps - x0               (flow_grpo train_sd3_dpo.py)
    e = mean((model(x_t) - target)^2)  for the policy and for the reference (LoRA disabled, no grad)
    L = -log sigmoid(-beta/2 [(e_w - e_ref_w) - (e_l - e_ref_l)])                         (losses.diffusion_dpo_loss)

``beta = train.beta``: ~2000-5000 for epsilon models (per-element MSE; Diffusion-DPO SD1.5: 5000), ~100 for flow
models (flow_grpo). No CFG in training (the conditional model, as both papers). One iteration is
``train.updates_per_iteration`` optimizer steps of ``pairs_per_update`` pairs (global) drawn epoch-wise in a seeded
order; each pair is evaluated at ``timesteps_per_pair`` noise levels (Diffusion-DPO 1; flow_grpo ~ every sampling
step). Every draw of a pair (timesteps, noise, VAE sample) comes from ``(seed, iteration, position)``, so an update
does not depend on the process count or the micro-batch size.

Latents: the adapter contract's ``encode_images(images, generator)`` (``flowalign.adapter``), the inverse of each
family's ``decode`` (SD1.5/SDXL/SD3 ``(z - shift) * scale``, FLUX packed, Wan ``latents_mean/std``; pixel-space
models such as the shapes model ``2 img - 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from flowalign.adapter import Adapter, Cond
from flowalign.config import Config, ConfigError, help_field
from flowalign.data import RewardFn
from flowalign.losses import diffusion_dpo_loss
from flowalign.methods.base import (
    METHODS,
    Batch,
    Collected,
    Method,
    PromptSampler,
    Runtime,
    TrainState,
    generator,
    option_error,
)
from flowalign.pairs import Pair, load_media, load_pairs


@dataclass
class DPOOptions:
    """Offline DPO's options (``train.method_options``)."""

    pairs: str = help_field("", "Pairs dataset: a .jsonl of {id, prompt, chosen, rejected} (paths relative to it) or a "
                        "labelled queue folder (pairs.jsonl + labels.jsonl from `flowalign label serve`).")
    pairs_per_update: int = help_field(8, "Pairs per optimizer step over all processes (Diffusion-DPO: 2048 on 16 GPUs).")
    timesteps_per_pair: int = help_field(1, "Noise levels drawn per pair per step (Diffusion-DPO 1; flow_grpo ~39).")
    timestep_sampling: Literal["auto", "uniform", "logit_normal"] = help_field(
        "auto", "How t / sigma is drawn: uniform (Diffusion-DPO), logit_normal (flow_grpo, SD3); auto = uniform for "
                "epsilon models, logit_normal for flow models.")
    logit_mean: float = help_field(0.0, "Mean of the logit-normal draw.")
    logit_std: float = help_field(1.0, "Std of the logit-normal draw.")
    shift: float | None = help_field(None, "Flow models: time shift of sigma; null = the scheduler's config.shift (SD3 3.0, "
                                   "shapes 1.0; set it for dynamic-shift schedulers such as FLUX's).")
    label_smoothing: float = help_field(0.0, "cDPO label smoothing (0 = Diffusion-DPO).")

    def check(self, cfg) -> None:
        if not self.pairs:  # its rows are read and validated when the method is built (they need the model size)
            raise option_error("pairs", "is required: a pairs .jsonl or a labelled queue folder")
        if self.pairs_per_update < 1 or self.timesteps_per_pair < 1:
            raise option_error("pairs_per_update and timesteps_per_pair", "must be >= 1")
        if self.logit_std <= 0 or (self.shift is not None and self.shift <= 0):
            raise option_error("logit_std and shift", "must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise option_error("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")


# ----------------------------------------------------------------------------------------------- latents
def to_latents(adapter, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Images in [0, 1] (``B,C,H,W`` or ``B,T,C,H,W``) -> the adapter's latents: the contract's ``encode_images``."""
    return adapter.encode_images(images, generator=generator)


# ----------------------------------------------------------------------------------------------- method
@METHODS.register("dpo")
class DPO(Method):
    """Diffusion-DPO (epsilon models) / Flow-DPO (flow models) on an offline pairs dataset."""

    name = "dpo"
    offline: ClassVar[bool] = True  # trains from files: sample.prompts is not needed
    Options: ClassVar[type[DPOOptions]] = DPOOptions

    def __init__(self, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, adapter, reward_fn, runtime)
        self.opts = self.options(cfg)
        self.flow = adapter.prediction_type == "flow"
        with torch.no_grad():  # the media size the model makes; every pair must have it
            probe = adapter.decode(adapter.init_noise(1, torch.Generator(device=adapter.device).manual_seed(0)))
        self.frames = probe.shape[1] if probe.ndim == 5 else None
        self.pairs: list[Pair] = load_pairs(self.opts.pairs, size=tuple(probe.shape[-2:]), frames=self.frames)
        self.sampler = PromptSampler(len(self.pairs), seed=cfg.seed, shuffle=cfg.sample.shuffle_prompts)
        o = self.opts
        self.sampling = o.timestep_sampling if o.timestep_sampling != "auto" else \
            ("logit_normal" if self.flow else "uniform")
        if self.flow:  # the adapter contract gives the training-time schedule (flowalign.adapter)
            self.shift = o.shift if o.shift is not None else adapter.flow_shift()
        else:  # sqrt(1 - alpha_bar_t), the sigma slot of epsilon adapters (exact lookup in predict)
            self.levels = adapter.ddpm_levels()

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if not cfg.train.beta > 0:
            raise ConfigError(f"train.beta is DPO's beta and must be > 0 (Diffusion-DPO SD1.5: 5000 for epsilon "
                              f"models, flow_grpo: 100 for flow models), got {cfg.train.beta}")
        if cfg.train.num_inner_epochs != 1:
            raise ConfigError("train.num_inner_epochs must be 1 for dpo (an iteration draws fresh pairs; use "
                              "updates_per_iteration)")

    # ------------------------------------------------------------------------------------------ collect
    def collect(self, state: TrainState) -> Collected:
        cfg, rt, o = self.cfg, self.runtime, self.opts
        U, P = cfg.train.updates_per_iteration, o.pairs_per_update
        idx = self.sampler.next(U * P)
        per_mb = max(1, cfg.train_batch_size // 2)  # a pair is two rows of the denoiser batch
        batches = []
        for u in range(U):
            pos = torch.arange(u * P, (u + 1) * P)
            mine = torch.tensor_split(pos, rt.world_size)[rt.rank]
            for i in range(0, len(mine), per_mb):
                p = mine[i: i + per_mb]
                batches.append(Batch({"pos": p, "pairs": idx[p], "iteration": state.iteration,
                                      "weight": 1.0 / (P * o.timesteps_per_pair)}, update=u))
        return Collected(batches=batches, num_updates=U, num_samples=0,
                         metrics={"pairs_epoch": float(self.sampler.epoch), "num_pairs": float(len(self.pairs))})

    # ------------------------------------------------------------------------------------------ loss
    def _draw(self, gen: torch.Generator, k: int) -> Tensor:
        """``k`` noise levels in the adapter's sigma slot."""
        if self.flow:
            if self.sampling == "uniform":
                u = torch.rand(k, generator=gen)
            else:
                u = torch.sigmoid(self.opts.logit_mean + self.opts.logit_std * torch.randn(k, generator=gen))
            return self.shift * u / (1 + (self.shift - 1) * u)
        n = len(self.levels)
        if self.sampling == "uniform":
            t = torch.randint(0, n, (k,), generator=gen)
        else:
            u = torch.sigmoid(self.opts.logit_mean + self.opts.logit_std * torch.randn(k, generator=gen))
            t = (u * n).long().clamp_max(n - 1)
        return self.levels[t]

    @torch.no_grad()
    def prepare(self, pos: Tensor, pair_idx: Tensor, iteration: int) -> dict[str, Tensor]:
        """Noised inputs of a micro-batch: rows ``[w_0 .. w_{m-1}, l_0 .. l_{m-1}]`` repeated per timestep."""
        K, dev = self.opts.timesteps_per_pair, self.runtime.device
        sig, eps, x0s, conds = [], [], [], []
        for p, i in zip(pos.tolist(), pair_idx.tolist()):
            pair = self.pairs[i]
            gen = generator(self.cfg.seed, "dpo", iteration, p)
            media = torch.stack([load_media(pair.chosen), load_media(pair.rejected)])
            vae_gen = generator(self.cfg.seed, "dpo_vae", iteration, p, device=dev)
            x0 = to_latents(self.adapter, media, vae_gen)  # [2, ...]
            s = self._draw(gen, K)  # shared by chosen and rejected
            e = torch.randn((K, *x0.shape[1:]), generator=gen).to(dev, torch.float32)
            cond = self.adapter.encode([pair.prompt])
            for k in range(K):
                x0s.append(x0.float())
                eps.append(e[k].expand_as(x0))
                sig.append(s[k].repeat(2))
                conds.append(cond)
        x0, e, sigma = torch.stack(x0s), torch.stack(eps), torch.stack(sig).to(dev)  # [m*K, 2, ...]
        view = (-1, 2, *([1] * (x0.ndim - 2)))
        sv = sigma.view(view)
        if self.flow:
            x, target = (1 - sv) * x0 + sv * e, e - x0
        else:
            x, target = torch.sqrt(1 - sv**2) * x0 + sv * e, e
        flat = lambda t: t.transpose(0, 1).reshape(-1, *t.shape[2:])  # chosen rows first
        cond = Cond.cat(conds)
        return {"x": flat(x).to(self.adapter.dtype), "target": flat(target), "sigma": flat(sigma),
                "cond": Cond.cat([cond, cond])}

    def errors(self, inp: dict[str, Tensor]) -> Tensor:
        """Per-row mean squared error of the prediction (policy, or reference inside ``runtime.reference()``)."""
        with self.runtime.autocast():
            out = self.adapter.predict(inp["x"], inp["sigma"], inp["cond"], 1.0)
        err = (out.float() - inp["target"]) ** 2
        return err.mean(dim=tuple(range(1, err.ndim)))

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Any]]:
        d = batch.data
        inp = self.prepare(d["pos"], d["pairs"], d["iteration"])
        err = self.errors(inp)
        with torch.no_grad(), self.runtime.reference():
            err_ref = self.errors(inp)
        n = len(err) // 2
        per, metrics = diffusion_dpo_loss(err[:n], err_ref[:n], err[n:], err_ref[n:], self.cfg.train.beta,
                                          self.opts.label_smoothing)
        metrics["sigma_mean"] = inp["sigma"].float().mean()
        return per.sum() * d["weight"], metrics

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
