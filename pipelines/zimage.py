"""Z-Image adapter over diffusers' ``ZImagePipeline``.

* **Text**: Qwen3's second-to-last hidden states of the chat-formatted prompt, one variable-length tensor per prompt
  (padding dropped, ``pipe.encode_prompt``). The ``Cond`` holds them padded to ``max_sequence_length`` with a mask;
  ``predict`` hands the transformer the unpadded list it expects.
* **Latents**: ``[B, 16, H/8, W/8]`` in fp32 (the pipeline keeps fp32 latents); the transformer gets a list of
  ``[C, 1, h, w]`` frames in its dtype.
* **Sign and time**: the transformer is fed ``1 - sigma`` and predicts ``x0 - eps``; the pipeline's scheduler
  velocity is its negative, so ``predict`` returns ``v = -out`` in the shared convention (``x_next = x + dt v``).
* **Guidance**: the pipeline's ``guidance_scale = w`` gives ``pos + w (pos - neg)``; that is standard CFG
  ``neg + g (pos - neg)`` with ``g = w + 1``, so the adapter's ``guidance`` is ``g`` (1 = no CFG, as every adapter)
  and ``pipeline_call_kwargs`` passes ``guidance_scale = g - 1``. ``cfg_normalization`` (clip the guided norm to
  that many times the conditional one) and ``cfg_truncation`` (no CFG where ``1 - sigma > cfg_truncation``) are the
  pipeline's options, off by default.
* **Schedule**: ``linspace(1, 1/N, N)`` through the scheduler's shift (``mu`` when it shifts dynamically), plus 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas
from torch import Tensor, nn

from flowalign.adapter import ADAPTERS, Adapter, Cond, check_size


@ADAPTERS.register("zimage")
class ZImageAdapter(Adapter):
    """Z-Image (``Tongyi-MAI/Z-Image-Turbo`` and the base model) text-to-image."""

    prediction_type = "flow"
    default_kernel = "flow_sde"
    # single-stream DiT: attention projections and the SwiGLU feed-forward
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
    lora_rank = 32
    lora_alpha = 64
    pipeline_class = ZImagePipeline

    def __init__(self, pipe: ZImagePipeline, height: int = 1024, width: int = 1024, max_sequence_length: int = 512,
                 cfg_normalization: float = 0.0, cfg_truncation: float = 1.0) -> None:
        super().__init__(pipe)
        check_size(height, width, pipe.vae_scale_factor * 2, "vae_scale_factor * the transformer's 2x2 patches")
        if cfg_normalization < 0:
            raise ValueError(f"cfg_normalization must be >= 0 (0 = off), got {cfg_normalization}")
        self.height, self.width = int(height), int(width)
        self.max_sequence_length = int(max_sequence_length)
        self.cfg_normalization = float(cfg_normalization)
        self.cfg_truncation = float(cfg_truncation)

    # -- contract ---------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative: Sequence[str] | str | None = None) -> Cond:
        """Qwen3 embeddings padded to ``max_sequence_length`` + masks; ``negative`` adds the CFG branch."""
        return self.cached_encode(prompts, negative, self._encode)

    def _embed(self, texts: Sequence[str]) -> dict[str, Tensor]:
        items = self.pipe._encode_prompt(prompt=list(texts), device=self.device,
                                         max_sequence_length=self.max_sequence_length)
        D = items[0].shape[-1]
        feats = items[0].new_zeros(len(items), self.max_sequence_length, D)
        mask = torch.zeros(len(items), self.max_sequence_length, dtype=torch.long, device=feats.device)
        for i, e in enumerate(items):
            feats[i, : len(e)] = e
            mask[i, : len(e)] = 1
        return {"cap_feats": feats, "cap_mask": mask}

    @torch.no_grad()
    def _encode(self, prompts: tuple[str, ...], negative: tuple[str, ...] | None) -> Cond:
        return Cond(self._embed(prompts), None if negative is None else self._embed(negative))

    def init_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """fp32 ``[B, C, H/8, W/8]`` drawn by ``pipe.prepare_latents``."""
        return self.pipe.prepare_latents(batch, self.pipe.transformer.in_channels, self.height, self.width,
                                         torch.float32, self.device, generator)

    def sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's ``linspace(1, 1/N, N)`` through the scheduler's shift, plus the terminal 0."""
        f = self.pipe.vae_scale_factor * 2
        mu = self.resolution_shift((self.height // f) * (self.width // f))
        return self.memo_sigmas(num_steps, lambda n: self.scheduler_sigmas(n, sigmas=get_default_z_image_sigmas(n),
                                                                            mu=mu))

    @staticmethod
    def _unpad(kw: dict[str, Tensor]) -> list[Tensor]:
        return [f[: int(m.sum())] for f, m in zip(kw["cap_feats"], kw["cap_mask"])]

    def predict(self, x: Tensor, sigma: Tensor | float, cond: Cond, guidance: float = 1.0) -> Tensor:
        """Velocity ``-(transformer output)`` in fp32; CFG ``neg + g (pos - neg)`` when ``guidance > 1``."""
        B = x.shape[0]
        t = self.expand_sigma(sigma, B, x.device) * self.pipe.scheduler.config.num_train_timesteps
        t_in = (1000 - t) / 1000  # the pipeline's timestep: 1 - sigma
        w = torch.full((B,), guidance - 1.0, device=x.device)
        w = torch.where(t_in > self.cfg_truncation, torch.zeros_like(w), w)  # cfg_truncation: no CFG late
        cfg = bool((w > 0).any())
        caps = self._unpad(cond.kwargs)
        frames = x.to(self.pipe.transformer.dtype).unsqueeze(2)
        if cfg:
            if cond.uncond is None:
                raise ValueError("guidance > 1 needs negative embeddings: encode(prompts, negative='')")
            frames, t_in, caps = torch.cat([frames, frames]), torch.cat([t_in, t_in]), caps + self._unpad(cond.uncond)
        outs = self.pipe.transformer(list(frames.unbind(0)), t_in, caps, return_dict=False)[0]
        if cfg:
            preds = []
            for j in range(B):
                pos, neg = outs[j].float(), outs[B + j].float()
                pred = pos + float(w[j]) * (pos - neg)
                if self.cfg_normalization > 0:  # keep |pred| <= cfg_normalization |pos| (the pipeline's rule)
                    cap = torch.linalg.vector_norm(pos) * self.cfg_normalization
                    norm = torch.linalg.vector_norm(pred)
                    if norm > cap:
                        pred = pred * (cap / norm)
                preds.append(pred)
            out = torch.stack(preds)
        else:
            out = torch.stack([o.float() for o in outs])
        return -out.squeeze(2)

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> images ``[B, 3, H, W]`` in [0, 1] (differentiable)."""
        vae = self.pipe.vae
        z = x.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")

    def trainable_module(self) -> nn.Module:
        return self.pipe.transformer

    def pipeline_call_kwargs(self, guidance: float) -> dict:
        """``__call__`` keyword arguments that sample what the adapter samples (``flowalign doctor``)."""
        return {"height": self.height, "width": self.width, "max_sequence_length": self.max_sequence_length,
                "guidance_scale": guidance - 1.0, "cfg_normalization": self.cfg_normalization,
                "cfg_truncation": self.cfg_truncation}
