"""Wan 2.x text-to-video adapter over diffusers' ``WanPipeline``.

Latents are ``[B, C, T, H, W]`` (``T = (num_frames - 1) / 4 + 1``), drawn in fp32 by the pipeline's
``prepare_latents``; the denoiser sees them cast to its dtype, as in the pipeline. ``decode`` de-normalises with the
VAE's ``latents_mean``/``latents_std`` and returns frames ``[B, T, 3, H, W]`` in [0, 1] through the pipeline's video
processor. CFG runs ``[cond, uncond]`` in one batched forward (the pipeline runs two; the numbers agree to fp32
round-off) when ``guidance > 1``.

Schedule: the flow-matching Euler schedule of the pipeline's ``FlowMatchEulerDiscreteScheduler``. The Wan 2.1 hub
checkpoints ship a ``UniPCMultistepScheduler`` (a multistep solver, which no one-step kernel can reproduce); the
adapter then swaps in ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)`` on the pipeline itself, as DDPO swaps
SD's scheduler for DDIM, so the pipeline and the adapter keep sampling the same chain.

Wan 2.2 A14B (``transformer_2`` with ``boundary_ratio``) uses ``transformer`` for ``t >= boundary`` and
``transformer_2`` below with guidance ``guidance_2`` (default: ``guidance``); Wan 2.2 TI2V (``expand_timesteps``)
gets one timestep per latent token, as in the pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from torch import Tensor, nn

from flowalign.adapter import ADAPTERS, Adapter, Cond, check_size

logger = logging.getLogger(__name__)


@ADAPTERS.register("wan")
class WanAdapter(Adapter):
    """Wan 2.1 / 2.2 text-to-video (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` and friends)."""

    prediction_type = "flow"
    default_kernel = "flow_sde"
    # flow_grpo train_wan2_1.py: r=32, alpha=64 on the attention projections
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    lora_rank = 32
    lora_alpha = 64
    pipeline_class = WanPipeline

    def __init__(self, pipe: WanPipeline, height: int = 480, width: int = 832, num_frames: int = 81,
                 max_sequence_length: int = 512, guidance_2: float | None = None) -> None:
        super().__init__(pipe)
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            cfg = pipe.scheduler.config
            shift = cfg.get("flow_shift", None) or cfg.get("shift", None) or 1.0
            logger.warning("WanAdapter: replacing %s by FlowMatchEulerDiscreteScheduler(shift=%s) on the pipeline "
                           "(the step kernels are one-step Euler/SDE)", type(pipe.scheduler).__name__, shift)
            pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=shift)
        multiple = pipe.vae_scale_factor_spatial * self.denoiser.config.patch_size[1]
        self.height, self.width = check_size(height, width, multiple, "vae_scale_factor_spatial * patch_size",
                                             num_frames=num_frames, temporal=pipe.vae_scale_factor_temporal)
        self.num_frames = int(num_frames)
        self.max_sequence_length = max_sequence_length
        self.guidance_2 = guidance_2

    @property
    def denoiser(self) -> nn.Module:
        """The (high-noise) transformer; Wan 2.2 A14B's low-noise expert is ``pipe.transformer_2``."""
        return self.pipe.transformer if self.pipe.transformer is not None else self.pipe.transformer_2

    # -- contract ---------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative: Sequence[str] | str | None = None) -> Cond:
        """UMT5 embeddings (zero-padded to ``max_sequence_length``) via ``pipe.encode_prompt``."""
        return self.cached_encode(prompts, negative, self._encode)

    @torch.no_grad()
    def _encode(self, prompts: tuple[str, ...], negative: tuple[str, ...] | None) -> Cond:
        pe, npe = self.pipe.encode_prompt(
            prompt=list(prompts), negative_prompt=list(negative) if negative is not None else None,
            do_classifier_free_guidance=negative is not None, max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        dtype = self.denoiser.dtype
        uncond = None if negative is None else {"encoder_hidden_states": npe.to(dtype)}
        return Cond({"encoder_hidden_states": pe.to(dtype)}, uncond)

    def init_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """fp32 ``[B, C, T, H/8, W/8]`` drawn by ``pipe.prepare_latents``."""
        return self.pipe.prepare_latents(batch, self.denoiser.config.in_channels, self.height, self.width,
                                         self.num_frames, torch.float32, self.device, generator)

    def sigmas(self, num_steps: int) -> Tensor:
        """The scheduler's shifted sigmas for ``num_steps`` plus the terminal 0."""
        return self.memo_sigmas(num_steps, self.scheduler_sigmas)

    def predict(self, x: Tensor, sigma: Tensor | float, cond: Cond, guidance: float = 5.0) -> Tensor:
        """Velocity ``[B, C, T, H, W]``; CFG ``u + w (c - u)`` when ``guidance > 1`` (the pipeline's rule)."""
        B = x.shape[0]
        t = self.expand_sigma(sigma, B, x.device) * self.pipe.scheduler.config.num_train_timesteps
        model, scale = self._expert(t, guidance)
        x_in = x.to(model.dtype)
        if self.pipe.config.expand_timesteps:  # Wan 2.2 TI2V: one timestep per 2x2 latent patch
            seq = x.shape[2] * ((x.shape[3] + 1) // 2) * ((x.shape[4] + 1) // 2)
            t = t[:, None].expand(B, seq)
        kwargs = cond.kwargs
        cfg = guidance > 1.0
        if cfg:
            (x_in, t), kwargs = self.cfg_batch(cond, (x_in, t), negative_first=False)
        out = model(hidden_states=x_in, timestep=t, return_dict=False, **kwargs)[0]
        if cfg:
            positive, negative = out.chunk(2)
            out = self.cfg_combine(negative, positive, scale)
        return out

    def _expert(self, t: Tensor, guidance: float) -> tuple[nn.Module, float]:
        """Which transformer (and guidance) denoises at timestep ``t`` (Wan 2.2's two-expert split)."""
        ratio = self.pipe.config.boundary_ratio
        if ratio is None:
            return self.denoiser, guidance
        high = t >= ratio * self.pipe.scheduler.config.num_train_timesteps
        if bool(high.all()):
            return self.pipe.transformer, guidance
        if bool((~high).all()):
            return self.pipe.transformer_2, guidance if self.guidance_2 is None else self.guidance_2
        raise ValueError("a batch must not straddle Wan 2.2's expert boundary; pass rows of one sigma")

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> frames ``[B, T, 3, H, W]`` in [0, 1] (differentiable)."""
        vae = self.pipe.vae
        z = x.to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        video = vae.decode(z / inv_std + mean, return_dict=False)[0]
        return self.pipe.video_processor.postprocess_video(video, output_type="pt")

    def trainable_module(self) -> nn.Module:
        return self.denoiser

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Frames ``[B, T, 3, H, W]`` in [0, 1] -> fp32 ``[B, C, T', H/8, W/8]`` latents: a VAE posterior sample
        normalised with ``latents_mean/std`` (the inverse of ``decode``)."""
        z = self.vae_posterior(self.pipe.vae, images, generator)
        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        return ((z - mean) / std).to(self.device, torch.float32)
