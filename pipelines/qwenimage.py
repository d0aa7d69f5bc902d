"""Qwen-Image adapter over diffusers' ``QwenImagePipeline`` (true CFG with norm rescaling).

* **Text**: Qwen2.5-VL's last hidden states of the prompt in the pipeline's chat template, with the template's fixed
  prefix (``prompt_template_encode_start_idx`` = 34 tokens) dropped; prompts have their own lengths and a mask. The
  adapter pads every prompt to ``max_sequence_length`` (so prompts encoded apart can be batched) and ``predict``
  trims the batch back to its longest prompt; a mask that is all ones is dropped, as the pipeline does.
* **Latents**: ``[B, (H/16)(W/16), 64]`` packed 2x2 patches of the 16-channel video VAE latent (one frame);
  ``decode`` unpacks, de-normalises with ``latents_mean/std`` and takes frame 0.
* **Schedule**: ``sigmas = linspace(1, 1/N, N)`` with the resolution-dependent ``mu`` (Qwen-Image's scheduler:
  exponential time shift, ``shift_terminal``), plus the terminal 0.
* **Guidance** is *true* CFG against the negative prompt (Qwen-Image is not guidance-distilled):
  ``v = u + w (c - u)`` rescaled per token to the conditional prediction's norm,
  ``v <- v |c| / |v|`` (``QwenImagePipeline.__call__``; ``guidance`` here is the pipeline's ``true_cfg_scale``).
  The conditional and unconditional branches run as one batched forward (the pipeline runs two; the masks keep
  the padded text tokens out, so the numbers agree to fp32 round-off).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import QwenImagePipeline
from torch import Tensor, nn

from flowalign.adapter import ADAPTERS, Adapter, Cond, check_size


@ADAPTERS.register("qwenimage")
class QwenImageAdapter(Adapter):
    """Qwen-Image text-to-image (``Qwen/Qwen-Image``)."""

    prediction_type = "flow"
    default_kernel = "flow_sde"
    # flow_grpo train_qwenimage.py: r=64, alpha=128 on attention and both MLP streams
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                           "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
    lora_rank = 64
    lora_alpha = 128
    pipeline_class = QwenImagePipeline

    def __init__(self, pipe: QwenImagePipeline, height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 512) -> None:
        super().__init__(pipe)
        if pipe.transformer.config.guidance_embeds:
            raise ValueError("QwenImageAdapter: guidance-distilled transformers (guidance_embeds) are not supported")
        default = pipe.default_sample_size * pipe.vae_scale_factor
        self.height, self.width = check_size(height or default, width or default, pipe.vae_scale_factor * 2,
                                             "vae_scale_factor * 2 for the 2x2 packing")
        if not 1 <= max_sequence_length <= pipe.tokenizer_max_length:
            raise ValueError(f"max_sequence_length must be in [1, {pipe.tokenizer_max_length}], "
                             f"got {max_sequence_length}")
        self.max_sequence_length = int(max_sequence_length)

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Height and width of the packed token grid."""
        f = self.pipe.vae_scale_factor * 2
        return self.height // f, self.width // f

    # -- contract ---------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative: Sequence[str] | str | None = None) -> Cond:
        """Qwen2.5-VL embeddings + masks (padded to ``max_sequence_length``); ``negative`` adds the CFG branch."""
        return self.cached_encode(prompts, negative, self._encode)

    def _embed(self, texts: Sequence[str]) -> dict[str, Tensor]:
        pe, mask = self.pipe.encode_prompt(prompt=list(texts), device=self.device,
                                           max_sequence_length=self.max_sequence_length)
        B, L, D = pe.shape
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.long, device=pe.device)
        pad = self.max_sequence_length - L
        pe = torch.cat([pe, pe.new_zeros(B, pad, D)], 1)
        mask = torch.cat([mask.long(), mask.new_zeros(B, pad).long()], 1)
        return {"encoder_hidden_states": pe, "encoder_hidden_states_mask": mask}

    @torch.no_grad()
    def _encode(self, prompts: tuple[str, ...], negative: tuple[str, ...] | None) -> Cond:
        return Cond(self._embed(prompts), None if negative is None else self._embed(negative))

    def init_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Packed ``[B, h * w, 4C]`` latents drawn by ``pipe.prepare_latents``."""
        return self.pipe.prepare_latents(batch, self.pipe.transformer.config.in_channels // 4, self.height,
                                         self.width, self.pipe.text_encoder.dtype, self.device, generator)

    def sigmas(self, num_steps: int) -> Tensor:
        """``linspace(1, 1/N, N)`` shifted with the resolution-dependent ``mu``, plus the terminal 0."""
        h, w = self.latent_hw
        return self.memo_sigmas(num_steps, lambda n: self.scheduler_sigmas(
            n, sigmas=np.linspace(1.0, 1 / n, n), mu=self.resolution_shift(h * w)))

    def predict(self, x: Tensor, sigma: Tensor | float, cond: Cond, guidance: float = 4.0) -> Tensor:
        """Velocity on packed latents; true CFG with norm rescaling when ``guidance > 1``."""
        B = x.shape[0]
        scale = self.pipe.scheduler.config.num_train_timesteps
        t = (self.expand_sigma(sigma, B, x.device) * scale).to(x.dtype) / scale
        kw = cond.kwargs
        cfg = guidance > 1.0
        if cfg:
            (x, t), kw = self.cfg_batch(cond, (x, t), negative_first=False)
        mask = kw["encoder_hidden_states_mask"]
        length = int(mask.sum(1).max())  # trim the shared padding: the batch's longest prompt
        pe, mask = kw["encoder_hidden_states"][:, :length], mask[:, :length]
        h, w = self.latent_hw
        out = self.pipe.transformer(hidden_states=x, timestep=t, guidance=None, encoder_hidden_states=pe,
                                    encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                                    img_shapes=[[(1, h, w)]] * x.shape[0], return_dict=False)[0]
        if cfg:
            positive, negative = out.chunk(2)
            comb = self.cfg_combine(negative, positive, guidance)
            out = comb * (torch.norm(positive, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return out

    def decode(self, x: Tensor) -> Tensor:
        """Packed latents -> images ``[B, 3, H, W]`` in [0, 1] (differentiable)."""
        vae = self.pipe.vae
        z = self.pipe._unpack_latents(x, self.height, self.width, self.pipe.vae_scale_factor).to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        image = vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")

    def trainable_module(self) -> nn.Module:
        return self.pipe.transformer

    def pipeline_call_kwargs(self, guidance: float) -> dict:
        """``__call__`` keyword arguments that sample what the adapter samples (``flowalign doctor``)."""
        kw = {"height": self.height, "width": self.width, "max_sequence_length": self.max_sequence_length,
              "true_cfg_scale": guidance}
        if guidance > 1.0:
            kw["negative_prompt"] = ""
        return kw
