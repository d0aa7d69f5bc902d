"""Stable Diffusion 1.x adapter over diffusers' ``StableDiffusionPipeline`` with a DDIM schedule (DDPO/D3PO/AlignProp).

SD1.5 predicts noise (``prediction_type = "epsilon"``). Its noise level enters the kernels through the shared sigma
slot as ``sigma_t = sqrt(1 - alpha_bar_t)`` (so ``flowalign.sde``'s ``ddim`` kernel recovers
``alpha_bar = 1 - sigma^2``): ``sigmas(N)`` is ``sqrt(1 - alpha_bar)`` at the DDIM timesteps, then the terminal level
``sqrt(1 - final_alpha_cumprod)`` (``final_alpha_cumprod`` is 1 with ``set_alpha_to_one`` else ``alpha_bar_0``),
computed in float64 and cast to fp32. ``predict`` maps a sigma back to its integer timestep by exact lookup in the
same table, so no state is carried between ``sigmas`` and ``predict``.

DDIM's own chain steps ``t -> t - T/N``; the sigma list is a single chain only when that lands on the next listed
timestep ("leading"/"trailing" spacing, SD1.5's default), which ``sigmas`` checks. A non-DDIM scheduler on the
pipeline (SD1.5 ships PNDM) is replaced by ``DDIMScheduler.from_config`` as DDPO does. ``init_noise_sigma`` and
``scale_model_input`` are DDIM's (1 and identity), applied through the scheduler anyway.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from torch import Tensor, nn

from flowalign.adapter import ADAPTERS, Adapter, Cond, check_size

logger = logging.getLogger(__name__)
_SIGMA_ATOL = 1e-6  # a sigma further than this from every DDPM level is not one of ours


@ADAPTERS.register("sd15")
class SD15Adapter(Adapter):
    """SD1.x text-to-image (``stable-diffusion-v1-5/stable-diffusion-v1-5``), sampled with DDIM."""

    prediction_type = "epsilon"
    default_kernel = "ddim"
    # DDPO (trl DDPOTrainer / kvablack/ddpo-pytorch): LoRA r=4 on the UNet attention projections
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    lora_rank = 4
    lora_alpha = 4
    pipeline_class = StableDiffusionPipeline

    def __init__(self, pipe: StableDiffusionPipeline, height: int | None = None, width: int | None = None) -> None:
        super().__init__(pipe)
        if not isinstance(pipe.scheduler, DDIMScheduler):
            logger.warning("SD15Adapter: replacing %s by DDIMScheduler on the pipeline (as DDPO does)",
                           type(pipe.scheduler).__name__)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        if pipe.scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"SD15Adapter needs an epsilon-prediction model, scheduler says "
                             f"prediction_type={pipe.scheduler.config.prediction_type!r}")
        default = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.height, self.width = check_size(height or default, width or default, pipe.vae_scale_factor,
                                             "the VAE factor")
        # sqrt(1 - alpha_bar_t) for every training timestep t, the table predict() inverts
        self._levels = torch.sqrt(1.0 - pipe.scheduler.alphas_cumprod.double()).float()

    # -- contract ---------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative: Sequence[str] | str | None = None) -> Cond:
        """CLIP text embeddings via ``pipe.encode_prompt``; ``negative`` adds the CFG branch."""
        return self.cached_encode(prompts, negative, self._encode)

    @torch.no_grad()
    def _encode(self, prompts: tuple[str, ...], negative: tuple[str, ...] | None) -> Cond:
        pe, npe = self.pipe.encode_prompt(list(prompts), self.device, 1, negative is not None,
                                          list(negative) if negative is not None else None)
        uncond = None if negative is None else {"encoder_hidden_states": npe}
        return Cond({"encoder_hidden_states": pe}, uncond)

    def init_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """``[B, 4, H/8, W/8]`` by ``pipe.prepare_latents`` (scaled by ``init_noise_sigma``)."""
        return self.pipe.prepare_latents(batch, self.pipe.unet.config.in_channels, self.height, self.width,
                                         self.dtype, self.device, generator)

    def timesteps(self, num_steps: int) -> Tensor:
        """The DDIM timesteps the pipeline would use for ``num_steps``."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        timesteps, _ = retrieve_timesteps(scheduler, num_steps, "cpu")
        return timesteps

    def sigmas(self, num_steps: int) -> Tensor:
        """``sqrt(1 - alpha_bar)`` at the DDIM timesteps, then ``sqrt(1 - final_alpha_cumprod)``, in float64: the
        ``ddim`` kernel rebuilds ``alpha_bar = 1 - sigma^2``, which an fp32 sigma would blur where ``alpha_bar`` is
        small (``flowalign.sde``). ``predict`` takes fp32 or fp64 sigmas alike."""
        def make(n: int) -> Tensor:
            sched = self.pipe.scheduler
            ts = self.timesteps(n).long()
            prev = ts - sched.config.num_train_timesteps // n  # DDIMScheduler.step's previous timestep
            if not torch.equal(prev[:-1], ts[1:]):
                raise ValueError(
                    f"DDIM with timestep_spacing={sched.config.timestep_spacing!r} and num_steps={n} does not "
                    f"step onto its own next timestep; use timestep_spacing 'leading' or 'trailing'")
            alphas = sched.alphas_cumprod.double()
            final = torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float64)
            last = alphas[prev[-1]] if prev[-1] >= 0 else final
            alpha_bar = torch.cat([alphas[ts], last.reshape(1)])
            return torch.sqrt(1.0 - alpha_bar)
        return self.memo_sigmas(num_steps, make)

    def sigma_to_timestep(self, sigma: Tensor | float, batch: int, device=None) -> Tensor:
        """Integer timesteps ``[B]`` whose level ``sqrt(1 - alpha_bar_t)`` equals ``sigma``."""
        s = self.expand_sigma(sigma, batch).cpu()
        dist = (s[:, None] - self._levels[None, :]).abs()
        err, t = dist.min(dim=1)
        if bool((err > _SIGMA_ATOL).any()):
            raise ValueError(f"sigma {s[err.argmax()].item():.8f} is not a DDPM level sqrt(1 - alpha_bar_t); "
                             f"use the values of SD15Adapter.sigmas()")
        return t.to(device)

    def predict(self, x: Tensor, sigma: Tensor | float, cond: Cond, guidance: float = 7.5) -> Tensor:
        """Noise ``eps`` at level ``sigma``; CFG ``u + w (c - u)`` as one batched forward when ``guidance > 1``."""
        t = self.sigma_to_timestep(sigma, x.shape[0], x.device)
        kw = cond.kwargs
        cfg = guidance > 1.0
        if cfg:
            (x, t), kw = self.cfg_batch(cond, (x, t))
        hidden = kw["encoder_hidden_states"]
        x = self.pipe.scheduler.scale_model_input(x, t)
        out = self.pipe.unet(x, t, encoder_hidden_states=hidden, return_dict=False)[0]
        if cfg:
            out = self.cfg_combine(*out.chunk(2), guidance)
        return out

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> images ``[B, 3, H, W]`` in [0, 1] (differentiable; no safety checker)."""
        vae = self.pipe.vae
        image = vae.decode((x / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")

    def trainable_module(self) -> nn.Module:
        return self.pipe.unet

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] -> ``[B, 4, H/8, W/8]`` latents: a VAE posterior sample times ``scaling_factor`` (the
        inverse of ``decode``)."""
        z = self.vae_posterior(self.pipe.vae, images, generator)
        return (z * self.pipe.vae.config.scaling_factor).to(self.device, self.dtype)
