"""HunyuanVideo text-to-video adapter over diffusers' ``HunyuanVideoPipeline`` (DanceGRPO's video model).

* **Text**: Llama hidden states (two layers below the top) of the prompt inside the pipeline's prompt template, with
  the template's first ``crop_start`` tokens cut away, padded to ``max_sequence_length`` with a mask; plus CLIP's
  pooled embedding (``pipe.encode_prompt``). ``prompt_template`` defaults to the pipeline's (``crop_start`` 95, the
  prefix length under the released tokenizer); a ``crop_start`` of ``None`` is counted with the pipeline's own
  tokenizer (the pipeline cannot: its ``None`` path pads the template to ``model_max_length``).
* **Latents**: fp32 ``[B, C, (F - 1)/4 + 1, H/8, W/8]`` drawn by ``pipe.prepare_latents``; the transformer sees them
  in its dtype with ``timestep = 1000 sigma`` (not divided by 1000, unlike FLUX).
* **Schedule**: ``linspace(1, 0, N + 1)[:-1]`` through the scheduler's static shift (7.0 for HunyuanVideo), plus 0.
* **Guidance** is embedded (``guidance`` x 1000 in the transformer's dtype, 6.0 by default in the pipeline; DanceGRPO
  trains with it). True CFG against a negative prompt is the pipeline's ``true_cfg_scale``, set on the adapter
  (``> 1`` adds a batched unconditional branch).
* ``decode`` returns frames ``[B, F, 3, H, W]`` in [0, 1] through the pipeline's video processor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import HunyuanVideoPipeline
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from torch import Tensor, nn

from flowalign.adapter import ADAPTERS, Adapter, Cond, check_size


@ADAPTERS.register("hunyuan_video")
class HunyuanVideoAdapter(Adapter):
    """HunyuanVideo text-to-video (``hunyuanvideo-community/HunyuanVideo``)."""

    prediction_type = "flow"
    default_kernel = "dance"  # DanceGRPO trains HunyuanVideo with its constant-eta kernel (eta 0.25)
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    lora_rank = 32
    lora_alpha = 64
    pipeline_class = HunyuanVideoPipeline

    def __init__(self, pipe: HunyuanVideoPipeline, height: int = 720, width: int = 1280, num_frames: int = 129,
                 max_sequence_length: int = 256, prompt_template: dict | None = None,
                 true_cfg_scale: float = 1.0) -> None:
        super().__init__(pipe)
        check_size(height, width, pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size,
                   "vae_scale_factor_spatial * patch_size", num_frames=num_frames,
                   temporal=pipe.vae_scale_factor_temporal)
        if true_cfg_scale < 1:
            raise ValueError(f"true_cfg_scale must be >= 1 (1 = off), got {true_cfg_scale}")
        self.height, self.width, self.num_frames = int(height), int(width), int(num_frames)
        self.max_sequence_length = int(max_sequence_length)
        self.true_cfg_scale = float(true_cfg_scale)
        template = {**DEFAULT_PROMPT_TEMPLATE, **(prompt_template or {})}
        if template.get("crop_start") is None:  # count the template's prefix with this pipeline's tokenizer
            prefix = template["template"].split("{}")[0]
            template["crop_start"] = len(pipe.tokenizer(prefix).input_ids)
        self.prompt_template = template

    # -- contract ---------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative: Sequence[str] | str | None = None) -> Cond:
        """Llama states + mask and CLIP pooled embedding; the negative branch only with ``true_cfg_scale > 1``
        (then defaulting to the empty prompt)."""
        if self.true_cfg_scale > 1.0 and negative is None:
            negative = ""
        elif self.true_cfg_scale <= 1.0:
            negative = None
        return self.cached_encode(prompts, negative, self._encode)

    def _embed(self, texts: Sequence[str]) -> dict[str, Tensor]:
        pe, pooled, mask = self.pipe.encode_prompt(prompt=list(texts), prompt_template=self.prompt_template,
                                                   device=self.device, max_sequence_length=self.max_sequence_length)
        dtype = self.pipe.transformer.dtype
        return {"encoder_hidden_states": pe.to(dtype), "encoder_attention_mask": mask.to(dtype),
                "pooled_projections": pooled.to(dtype)}

    @torch.no_grad()
    def _encode(self, prompts: tuple[str, ...], negative: tuple[str, ...] | None) -> Cond:
        return Cond(self._embed(prompts), None if negative is None else self._embed(negative))

    def init_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """fp32 ``[B, C, T, H/8, W/8]`` drawn by ``pipe.prepare_latents``."""
        return self.pipe.prepare_latents(batch, self.pipe.transformer.config.in_channels, self.height, self.width,
                                         self.num_frames, torch.float32, self.device, generator)

    def sigmas(self, num_steps: int) -> Tensor:
        """``linspace(1, 0, N + 1)[:-1]`` through the scheduler's shift, plus the terminal 0."""
        return self.memo_sigmas(num_steps, lambda n: self.scheduler_sigmas(n, sigmas=np.linspace(1.0, 0.0, n + 1)[:-1]))

    def predict(self, x: Tensor, sigma: Tensor | float, cond: Cond, guidance: float = 6.0) -> Tensor:
        """Velocity ``[B, C, T, H, W]`` with the embedded guidance ``guidance``; true CFG when ``true_cfg_scale > 1``."""
        B = x.shape[0]
        dtype = self.pipe.transformer.dtype
        t = (self.expand_sigma(sigma, B, x.device) * self.pipe.scheduler.config.num_train_timesteps).to(x.dtype)
        g = torch.tensor([guidance] * B, dtype=dtype, device=x.device) * 1000.0
        x_in, kw = x.to(dtype), cond.kwargs
        cfg = self.true_cfg_scale > 1.0
        if cfg:
            (x_in, t, g), kw = self.cfg_batch(cond, (x_in, t, g), negative_first=False, what="true_cfg_scale > 1")
        out = self.pipe.transformer(hidden_states=x_in, timestep=t, guidance=g, return_dict=False, **kw)[0]
        if cfg:
            positive, negative = out.chunk(2)
            out = self.cfg_combine(negative, positive, self.true_cfg_scale)
        return out

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> frames ``[B, F, 3, H, W]`` in [0, 1] (differentiable)."""
        vae = self.pipe.vae
        video = vae.decode(x.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.video_processor.postprocess_video(video, output_type="pt")

    def trainable_module(self) -> nn.Module:
        return self.pipe.transformer

    def pipeline_call_kwargs(self, guidance: float) -> dict:
        """``__call__`` keyword arguments that sample what the adapter samples (``flowalign doctor``)."""
        kw = {"height": self.height, "width": self.width, "num_frames": self.num_frames,
              "max_sequence_length": self.max_sequence_length, "prompt_template": dict(self.prompt_template),
              "guidance_scale": guidance, "true_cfg_scale": self.true_cfg_scale}
        if self.true_cfg_scale > 1.0:
            kw["negative_prompt"] = ""
        return kw
