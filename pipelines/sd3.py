"""Stable Diffusion 3 / 3.5 adapter over diffusers' ``StableDiffusion3Pipeline``.

The pipeline's own pieces do the work: ``encode_prompt`` (CLIP-L + CLIP-G + T5), ``prepare_latents`` (the seed-for-
seed initial noise), ``retrieve_timesteps`` on the scheduler (static shift, 3.0 for SD3.5; ``mu`` if a checkpoint
enables dynamic shifting), the VAE with its ``scaling_factor``/``shift_factor`` and the image processor.

``predict`` returns the velocity in diffusers' convention (``x_next = x + (sigma_next - sigma) v``, the scheduler's
Euler step and ``flowalign.sde``'s ``ode`` kernel), with CFG as one batched forward of ``[uncond, cond]`` as the
pipeline does, applied when ``guidance > 1`` (the pipeline's ``do_classifier_free_guidance``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusion3Pipeline
from torch import Tensor, nn

from flowalign.adapter import ADAPTERS, Adapter, Cond, check_size


@ADAPTERS.register("sd3")
class SD3Adapter(Adapter):
    """SD3/SD3.5 text-to-image (``stabilityai/stable-diffusion-3.5-medium`` and friends)."""

    prediction_type = "flow"
    default_kernel = "flow_sde"
    # flow_grpo train_sd3.py: LoRA r=32, alpha=64 on the joint-attention projections
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    lora_rank = 32
    lora_alpha = 64
    pipeline_class = StableDiffusion3Pipeline

    def __init__(self, pipe: StableDiffusion3Pipeline, height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 256) -> None:
        super().__init__(pipe)
        default = pipe.default_sample_size * pipe.vae_scale_factor
        self.height, self.width = check_size(height or default, width or default,
                                             pipe.vae_scale_factor * pipe.patch_size, "vae_scale_factor * patch_size")
        self.max_sequence_length = max_sequence_length

    # -- contract ---------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative: Sequence[str] | str | None = None) -> Cond:
        """CLIP-L/G + T5 embeddings via ``pipe.encode_prompt``; ``negative`` (e.g. ``""``) adds the CFG branch."""
        return self.cached_encode(prompts, negative, self._encode)

    @torch.no_grad()
    def _encode(self, prompts: tuple[str, ...], negative: tuple[str, ...] | None) -> Cond:
        pe, npe, pooled, npooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=negative is not None,
            negative_prompt=list(negative) if negative is not None else None,
            max_sequence_length=self.max_sequence_length,
        )
        uncond = None if negative is None else {"encoder_hidden_states": npe, "pooled_projections": npooled}
        return Cond({"encoder_hidden_states": pe, "pooled_projections": pooled}, uncond)

    def init_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """``[B, C, H/8, W/8]`` drawn by ``pipe.prepare_latents`` (the pipeline's own draw for this generator)."""
        return self.pipe.prepare_latents(batch, self.pipe.transformer.config.in_channels, self.height, self.width,
                                         self.dtype, self.device, generator)

    def sigmas(self, num_steps: int) -> Tensor:
        """The scheduler's shifted sigmas for ``num_steps`` plus the terminal 0 (``num_steps + 1`` values)."""
        kwargs = {}
        if self.pipe.scheduler.config.get("use_dynamic_shifting", None):  # as the pipeline: mu from the token count
            p, f = self.pipe.transformer.config.patch_size, self.pipe.vae_scale_factor
            kwargs["mu"] = self.resolution_shift((self.height // f // p) * (self.width // f // p), max_shift=1.16)
        return self.memo_sigmas(num_steps, lambda n: self.scheduler_sigmas(n, **kwargs))

    def predict(self, x: Tensor, sigma: Tensor | float, cond: Cond, guidance: float = 1.0) -> Tensor:
        """Velocity ``v`` at noise level ``sigma`` (scalar or ``[B]``); CFG ``u + w (c - u)`` when ``guidance > 1``."""
        # the scheduler's timesteps are sigmas * num_train_timesteps in fp32: the same product here
        t = self.expand_sigma(sigma, x.shape[0], x.device) * self.pipe.scheduler.config.num_train_timesteps
        kwargs = cond.kwargs
        cfg = guidance > 1.0
        if cfg:
            (x, t), kwargs = self.cfg_batch(cond, (x, t))
        out = self.pipe.transformer(hidden_states=x, timestep=t, return_dict=False, **kwargs)[0]
        if cfg:
            out = self.cfg_combine(*out.chunk(2), guidance)
        return out

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> images ``[B, 3, H, W]`` in [0, 1] (differentiable; the pipeline's VAE and image processor)."""
        vae = self.pipe.vae
        z = x / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")

    def trainable_module(self) -> nn.Module:
        return self.pipe.transformer

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] -> ``[B, C, H/8, W/8]`` latents: a VAE posterior sample, ``(z - shift) * scale`` (the
        inverse of ``decode``)."""
        cfg = self.pipe.vae.config
        z = self.vae_posterior(self.pipe.vae, images, generator)
        return ((z - cfg.shift_factor) * cfg.scaling_factor).to(self.device, self.dtype)
