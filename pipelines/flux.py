"""FLUX.1 adapter over diffusers' ``FluxPipeline``.

FLUX works on *packed* latents: the VAE latent ``[B, C, H, W]`` is cut into 2x2 patches giving ``[B, H/2 * W/2,
4C]`` tokens, with positional "latent image ids". ``init_noise`` returns packed latents drawn by the pipeline's own
``prepare_latents`` (seed-for-seed) and ``decode`` unpacks them with ``_unpack_latents``.

Schedule: like the pipeline, ``sigmas = linspace(1, 1/N, N)`` shifted by the resolution-dependent
``mu = calculate_shift(image_seq_len, ...)`` (FLUX.1-dev's ``use_dynamic_shifting``), plus the terminal 0.

Guidance: FLUX.1-dev is guidance-distilled: ``guidance`` is *embedded* (``transformer.config.guidance_embeds``,
3.5 by default in the pipeline) and costs no extra forward. "True" CFG with a negative prompt is the pipeline's
``true_cfg_scale``, set on the adapter (``true_cfg_scale > 1`` adds an unconditional branch, batched with the
conditional one). The transformer gets ``timestep = sigma * 1000 / 1000`` in the latents' dtype, as in the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import FluxPipeline
from torch import Tensor, nn

from flowalign.adapter import ADAPTERS, Adapter, Cond, check_size


@ADAPTERS.register("flux")
class FluxAdapter(Adapter):
    """FLUX.1 [dev]/[schnell] text-to-image."""

    prediction_type = "flow"
    default_kernel = "flow_sde"
    # flow_grpo FLUX config: r=64, alpha=128, attention projections plus both feed-forward stacks
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    lora_rank = 64
    lora_alpha = 128
    pipeline_class = FluxPipeline

    def __init__(self, pipe: FluxPipeline, height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 512, true_cfg_scale: float = 1.0) -> None:
        super().__init__(pipe)
        default = pipe.default_sample_size * pipe.vae_scale_factor
        self.height, self.width = check_size(height or default, width or default, pipe.vae_scale_factor * 2,
                                             "vae_scale_factor * 2 for FLUX's 2x2 packing")
        if true_cfg_scale < 1:
            raise ValueError(f"true_cfg_scale must be >= 1 (1 = off), got {true_cfg_scale}")
        self.max_sequence_length = max_sequence_length
        self.true_cfg_scale = float(true_cfg_scale)
        self._img_ids: dict[tuple, Tensor] = {}

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Unpacked latent height and width."""
        f = self.pipe.vae_scale_factor
        return self.height // f, self.width // f

    @property
    def image_seq_len(self) -> int:
        h, w = self.latent_hw
        return (h // 2) * (w // 2)

    # -- contract ---------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative: Sequence[str] | str | None = None) -> Cond:
        """CLIP pooled + T5 embeddings via ``pipe.encode_prompt``. The negative branch is only encoded when
        ``true_cfg_scale > 1`` (embedded guidance needs none); it then defaults to the empty prompt."""
        if self.true_cfg_scale > 1.0 and negative is None:
            negative = ""
        elif self.true_cfg_scale <= 1.0:
            negative = None
        return self.cached_encode(prompts, negative, self._encode)

    @torch.no_grad()
    def _encode(self, prompts: tuple[str, ...], negative: tuple[str, ...] | None) -> Cond:
        def enc(texts):
            pe, pooled, txt_ids = self.pipe.encode_prompt(prompt=list(texts), prompt_2=None, device=self.device,
                                                          max_sequence_length=self.max_sequence_length)
            return {"encoder_hidden_states": pe, "pooled_projections": pooled}, txt_ids

        kwargs, txt_ids = enc(prompts)
        uncond = None if negative is None else enc(negative)[0]
        return Cond(kwargs, uncond, extra={"txt_ids": txt_ids})

    def init_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Packed ``[B, H/16 * W/16, 4C]`` latents drawn by ``pipe.prepare_latents``."""
        latents, _ = self.pipe.prepare_latents(batch, self.pipe.transformer.config.in_channels // 4, self.height,
                                               self.width, self.dtype, self.device, generator)
        return latents

    def sigmas(self, num_steps: int) -> Tensor:
        """``linspace(1, 1/N, N)`` shifted with the resolution-dependent ``mu``, plus the terminal 0."""
        def make(n: int) -> Tensor:
            linear = None if self.pipe.scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / n, n)
            return self.scheduler_sigmas(n, sigmas=linear, mu=self.resolution_shift(self.image_seq_len))
        return self.memo_sigmas(num_steps, make)

    def _latent_image_ids(self, device, dtype) -> Tensor:
        key = (str(device), dtype)
        if key not in self._img_ids:
            h, w = self.latent_hw
            self._img_ids[key] = self.pipe._prepare_latent_image_ids(None, h // 2, w // 2, device, dtype)
        return self._img_ids[key]

    def predict(self, x: Tensor, sigma: Tensor | float, cond: Cond, guidance: float = 3.5) -> Tensor:
        """Velocity on packed latents. ``guidance`` is the embedded guidance scale (ignored by models without
        ``guidance_embeds``); true CFG (``true_cfg_scale > 1``) combines ``neg + s (cond - neg)``."""
        B = x.shape[0]
        scale = self.pipe.scheduler.config.num_train_timesteps
        # the pipeline: timestep = (sigma * 1000).to(latents.dtype) / 1000
        t = (self.expand_sigma(sigma, B, x.device) * scale).to(x.dtype) / scale
        g = None
        if self.pipe.transformer.config.guidance_embeds:
            g = torch.full([1], guidance, device=x.device, dtype=torch.float32).expand(B)
        kwargs = cond.kwargs
        cfg = self.true_cfg_scale > 1.0
        if cfg:
            (x, t), kwargs = self.cfg_batch(cond, (x, t), negative_first=False, what="true_cfg_scale > 1")
            g = None if g is None else torch.cat([g, g])
        out = self.pipe.transformer(hidden_states=x, timestep=t, guidance=g, txt_ids=cond.extra["txt_ids"],
                                    img_ids=self._latent_image_ids(x.device, x.dtype), return_dict=False,
                                    **kwargs)[0]
        if cfg:
            positive, negative = out.chunk(2)
            out = self.cfg_combine(negative, positive, self.true_cfg_scale)
        return out

    def unpack(self, x: Tensor) -> Tensor:
        """Packed ``[B, N, 4C]`` -> VAE latents ``[B, C, H, W]``."""
        return self.pipe._unpack_latents(x, self.height, self.width, self.pipe.vae_scale_factor)

    def decode(self, x: Tensor) -> Tensor:
        """Packed latents -> images ``[B, 3, H, W]`` in [0, 1] (differentiable)."""
        vae = self.pipe.vae
        z = self.unpack(x) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")

    def trainable_module(self) -> nn.Module:
        return self.pipe.transformer

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] -> packed ``[B, H/16 * W/16, 4C]`` latents: a VAE posterior sample,
        ``(z - shift) * scale``, packed into 2x2 patches (the inverse of ``decode``)."""
        cfg = self.pipe.vae.config
        z = (self.vae_posterior(self.pipe.vae, images, generator) - cfg.shift_factor) * cfg.scaling_factor
        b, c, h, w = z.shape
        return self.pipe._pack_latents(z, b, c, h, w).to(self.device, self.dtype)
