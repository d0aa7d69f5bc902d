"""FLUX.2 [dev] adapter over diffusers' ``Flux2Pipeline``.

What differs from FLUX.1 (``flowalign.pipelines.flux``):

* **Text encoder**: Mistral-Small-3.x (``Mistral3ForConditionalGeneration``) behind a ``PixtralProcessor`` chat
  template with the pipeline's system message; the prompt embedding stacks the hidden states of
  ``text_encoder_out_layers`` (10, 20, 30) along the feature axis (``pipe.encode_prompt``). No pooled embedding.
* **Latents**: the VAE latent ``[B, C, H, W]`` is patchified 2x2 into ``[B, 4C, H/2, W/2]`` and packed into tokens
  ``[B, H/2 * W/2, 4C]`` with 4-D position ids ``(t, h, w, l)``; ``decode`` scatters tokens back by those ids,
  undoes the VAE's batch-norm statistics (``vae.bn`` running mean/var) and unpatchifies, as the pipeline.
* **Schedule**: ``sigmas = linspace(1, 1/N, N)`` shifted with ``mu = compute_empirical_mu(image_seq_len, N)`` (it
  depends on the step count too), plus the terminal 0.
* **Guidance** is embedded (guidance-distilled, ``guidance_scale`` 4 by default in the pipeline): no negative
  branch, one forward per step. ``timestep = (1000 sigma).to(dtype) / 1000`` as the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from torch import Tensor, nn

from flowalign.adapter import ADAPTERS, Adapter, Cond, check_size


@ADAPTERS.register("flux2")
class Flux2Adapter(Adapter):
    """FLUX.2 [dev] text-to-image (``black-forest-labs/FLUX.2-dev``)."""

    prediction_type = "flow"
    default_kernel = "flow_sde"
    # double-stream attention (as FLUX.1) + the single-stream blocks' fused QKV/MLP input projection
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                           "to_qkv_mlp_proj"]
    lora_rank = 64
    lora_alpha = 128
    pipeline_class = Flux2Pipeline

    def __init__(self, pipe: Flux2Pipeline, height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 512, text_encoder_out_layers: Sequence[int] = (10, 20, 30)) -> None:
        super().__init__(pipe)
        default = pipe.default_sample_size * pipe.vae_scale_factor
        self.height, self.width = check_size(height or default, width or default, pipe.vae_scale_factor * 2,
                                             "vae_scale_factor * 2 for FLUX.2's 2x2 patches")
        n_layers = pipe.text_encoder.config.text_config.num_hidden_layers
        if not text_encoder_out_layers or any(not 0 <= k <= n_layers for k in text_encoder_out_layers):
            raise ValueError(f"text_encoder_out_layers={list(text_encoder_out_layers)} must be hidden-state indices "
                             f"in [0, {n_layers}] of the text encoder")
        self.max_sequence_length = int(max_sequence_length)
        self.text_encoder_out_layers = tuple(int(k) for k in text_encoder_out_layers)

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Height and width of the patchified latent grid (one token per cell)."""
        f = self.pipe.vae_scale_factor * 2
        return self.height // f, self.width // f

    # -- contract ---------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative: Sequence[str] | str | None = None) -> Cond:
        """Mistral hidden states of the chat-formatted prompts; guidance is embedded, so ``negative`` is unused."""
        return self.cached_encode(prompts, None, self._encode)

    @torch.no_grad()
    def _encode(self, prompts: tuple[str, ...], negative: tuple[str, ...] | None) -> Cond:
        pe, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.device,
                                        max_sequence_length=self.max_sequence_length,
                                        text_encoder_out_layers=self.text_encoder_out_layers)
        return Cond({"encoder_hidden_states": pe})

    def init_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Packed ``[B, h * w, 4C]`` latents drawn by ``pipe.prepare_latents`` (in the text embeddings' dtype)."""
        latents, _ = self.pipe.prepare_latents(batch, self.pipe.transformer.config.in_channels // 4, self.height,
                                               self.width, self.pipe.text_encoder.dtype, self.device, generator)
        return latents

    def sigmas(self, num_steps: int) -> Tensor:
        """``linspace(1, 1/N, N)`` shifted with ``mu = compute_empirical_mu(seq_len, N)``, plus the terminal 0."""
        def make(n: int) -> Tensor:
            h, w = self.latent_hw
            linear = None if self.pipe.scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / n, n)
            return self.scheduler_sigmas(n, sigmas=linear, mu=compute_empirical_mu(h * w, n))
        return self.memo_sigmas(num_steps, make)

    def _latent_ids(self, batch: int, device) -> Tensor:
        h, w = self.latent_hw
        return self.pipe._prepare_latent_ids(torch.empty(batch, 1, h, w)).to(device)

    def predict(self, x: Tensor, sigma: Tensor | float, cond: Cond, guidance: float = 4.0) -> Tensor:
        """Velocity on packed latents with the embedded guidance scale ``guidance``."""
        B = x.shape[0]
        scale = self.pipe.scheduler.config.num_train_timesteps
        t = (self.expand_sigma(sigma, B, x.device) * scale).to(x.dtype) / scale
        g = None
        if self.pipe.transformer.config.guidance_embeds:
            g = torch.full([1], guidance, device=x.device, dtype=torch.float32).expand(B)
        pe = cond.kwargs["encoder_hidden_states"]
        out = self.pipe.transformer(hidden_states=x.to(self.pipe.transformer.dtype), timestep=t, guidance=g,
                                    encoder_hidden_states=pe, txt_ids=self.pipe._prepare_text_ids(pe).to(x.device),
                                    img_ids=self._latent_ids(B, x.device), return_dict=False)[0]
        return out[:, : x.shape[1]]

    def decode(self, x: Tensor) -> Tensor:
        """Packed latents -> images ``[B, 3, H, W]`` in [0, 1] (differentiable)."""
        pipe, vae = self.pipe, self.pipe.vae
        z = pipe._unpack_latents_with_ids(x, self._latent_ids(x.shape[0], x.device))
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
        z = pipe._unpatchify_latents(z * std + mean)
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pt")

    def trainable_module(self) -> nn.Module:
        return self.pipe.transformer

    def pipeline_call_kwargs(self, guidance: float) -> dict:
        """``__call__`` keyword arguments that sample what the adapter samples (``flowalign doctor``)."""
        return {"height": self.height, "width": self.width, "guidance_scale": guidance,
                "max_sequence_length": self.max_sequence_length,
                "text_encoder_out_layers": self.text_encoder_out_layers}
