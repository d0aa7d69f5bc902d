"""Stable Diffusion XL adapter over diffusers' ``StableDiffusionXLPipeline``, sampled with DDIM (DDPO-style).

SDXL is an epsilon-prediction UNet, so everything about the noise schedule is ``SD15Adapter``'s: the ``sigma`` slot
holds ``sqrt(1 - alpha_bar_t)``, ``sigmas(N)`` are the DDIM levels, ``predict`` maps a sigma back to its integer
timestep, and a non-DDIM scheduler on the pipeline (SDXL ships ``EulerDiscreteScheduler``) is replaced by
``DDIMScheduler.from_config`` so the pipeline and the adapter sample the same chain. What SDXL adds:

* **Two text encoders** (CLIP ViT-L + OpenCLIP bigG): ``pipe.encode_prompt`` concatenates their penultimate hidden
  states (``encoder_hidden_states``) and takes the pooled projection of the second (``text_embeds``).
* **Micro-conditioning** ``time_ids = (original_size, crops_coords_top_left, target_size)`` (SDXL paper §2.2),
  built by ``pipe._get_add_time_ids``; defaults as the pipeline: ``(H, W), (0, 0), (H, W)``. They travel in the
  ``Cond`` so every row carries its own.
* **Empty negative prompt = zeros**: with ``force_zeros_for_empty_prompt`` (SDXL's config) the pipeline's default
  unconditional branch is all-zero embeddings, not the encoding of ``""``; ``encode(..., negative="")`` does the
  same, so ``guidance > 1`` matches ``pipe(prompt, guidance_scale=w)``.
* ``guidance_rescale`` (arXiv 2305.08891 §3.4) as the pipeline, and the VAE's optional ``latents_mean/std``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg
from torch import Tensor

from flowalign.adapter import ADAPTERS, Cond
from flowalign.pipelines.sd15 import SD15Adapter


@ADAPTERS.register("sdxl")
class SDXLAdapter(SD15Adapter):
    """SDXL base text-to-image (``stabilityai/stable-diffusion-xl-base-1.0``), sampled with DDIM."""

    prediction_type = "epsilon"
    default_kernel = "ddim"
    # UNet attention projections (as DDPO/SD1.5), rank 8 for the 2.6B UNet
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    lora_rank = 8
    lora_alpha = 8
    pipeline_class = StableDiffusionXLPipeline

    def __init__(self, pipe: StableDiffusionXLPipeline, height: int | None = None, width: int | None = None,
                 original_size: Sequence[int] | None = None, crops_coords_top_left: Sequence[int] = (0, 0),
                 target_size: Sequence[int] | None = None, guidance_rescale: float = 0.0) -> None:
        super().__init__(pipe, height=height, width=width)
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise ValueError("SDXLAdapter: UNets with a guidance embedding (time_cond_proj_dim, LCM) are not "
                             "supported")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        self.original_size = tuple(original_size or (self.height, self.width))
        self.crops_coords_top_left = tuple(crops_coords_top_left)
        self.target_size = tuple(target_size or (self.height, self.width))
        self.guidance_rescale = float(guidance_rescale)

    # -- contract ---------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative: Sequence[str] | str | None = None) -> Cond:
        """Both CLIP encoders via ``pipe.encode_prompt`` plus the micro-conditioning ``time_ids``; an all-empty
        ``negative`` gives the pipeline's zero unconditional embeddings (``force_zeros_for_empty_prompt``)."""
        return self.cached_encode(prompts, negative, self._encode)

    @torch.no_grad()
    def _encode(self, prompts: tuple[str, ...], negative: tuple[str, ...] | None) -> Cond:
        zeros = negative is not None and all(n == "" for n in negative) and self.pipe.config.force_zeros_for_empty_prompt
        pe, npe, pooled, npooled = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=negative is not None,
            negative_prompt=None if negative is None or zeros else list(negative))
        proj = (self.pipe.text_encoder_2.config.projection_dim if self.pipe.text_encoder_2 is not None
                else int(pooled.shape[-1]))
        ids = self.pipe._get_add_time_ids(self.original_size, self.crops_coords_top_left, self.target_size,
                                          dtype=pe.dtype, text_encoder_projection_dim=proj)
        ids = ids.to(self.device).repeat(len(prompts), 1)
        kw = {"encoder_hidden_states": pe, "text_embeds": pooled, "time_ids": ids}
        uncond = None if negative is None else {"encoder_hidden_states": npe, "text_embeds": npooled,
                                                "time_ids": ids.clone()}
        return Cond(kw, uncond)

    def predict(self, x: Tensor, sigma: Tensor | float, cond: Cond, guidance: float = 5.0) -> Tensor:
        """Noise ``eps``; CFG ``u + w (c - u)`` as one batched forward when ``guidance > 1`` (+ ``guidance_rescale``)."""
        t = self.sigma_to_timestep(sigma, x.shape[0], x.device)
        kw = cond.kwargs
        cfg = guidance > 1.0
        if cfg:
            (x, t), kw = self.cfg_batch(cond, (x, t))
        x = self.pipe.scheduler.scale_model_input(x, t)
        out = self.pipe.unet(x, t, encoder_hidden_states=kw["encoder_hidden_states"],
                             added_cond_kwargs={"text_embeds": kw["text_embeds"], "time_ids": kw["time_ids"]},
                             return_dict=False)[0]
        if cfg:
            uncond, text = out.chunk(2)
            out = self.cfg_combine(uncond, text, guidance)
            if self.guidance_rescale > 0:
                out = rescale_noise_cfg(out, text, guidance_rescale=self.guidance_rescale)
        return out

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> images ``[B, 3, H, W]`` in [0, 1] (differentiable; ``latents_mean/std`` when the VAE has them)."""
        vae = self.pipe.vae
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            z = x * std / vae.config.scaling_factor + mean
        else:
            z = x / vae.config.scaling_factor
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] -> latents: a VAE posterior sample, ``(z - mean) * scale / std`` when the VAE has
        ``latents_mean/std``, else ``z * scale`` (the inverse of ``decode``)."""
        vae = self.pipe.vae
        z = self.vae_posterior(vae, images, generator)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            std = torch.tensor(std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            z = (z - mean) / std
        return (z * vae.config.scaling_factor).to(self.device, self.dtype)

    def pipeline_call_kwargs(self, guidance: float) -> dict:
        """``__call__`` keyword arguments that sample what the adapter samples (``flowalign doctor``)."""
        return {"height": self.height, "width": self.width, "guidance_scale": guidance,
                "guidance_rescale": self.guidance_rescale, "original_size": self.original_size,
                "crops_coords_top_left": self.crops_coords_top_left, "target_size": self.target_size}
