"""The shapes-world text-to-image pipeline (a real diffusers pipeline class) and its adapter.

``ShapesPipeline`` is a ``DiffusionPipeline`` in *pixel space* (``3 x 32 x 32``, values in [-1, 1]) made of real
library classes, so it saves and loads with ``save_pretrained`` / ``from_pretrained`` like any diffusers pipeline:

* ``transformer``: ``SD3Transformer2DModel`` (MMDiT; patch 4 -> 64 image tokens, 4 layers, width 128),
* ``text_encoder``: a tiny ``CLIPTextModel`` (its last hidden states are the joint-attention context, its pooled
  EOS state the ``pooled_projections``),
* ``tokenizer``: a word-level ``PreTrainedTokenizerFast`` over ``flowalign.shapes.VOCAB`` (built locally by
  :func:`build_tokenizer`; ``<bos> words <eos> <pad>...``, fixed length ``MAX_LENGTH``),
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler``.

Flow matching (rectified flow, diffusers convention): ``x_t = (1 - sigma) x_0 + sigma eps``, the transformer predicts
``v = eps - x_0`` at ``timestep = 1000 sigma`` and the Euler ODE step is ``x_next = x + (sigma_next - sigma) v``.
CFG uses the empty prompt: ``v = v_u + w (v_c - v_u)``, one batched forward of ``[uncond, cond]``.

``ShapesAdapter`` (``ADAPTERS["shapes"]``) exposes the same denoiser to the step kernels; sampling through it with
``flowalign.sde.step("ode", ...)`` reproduces ``ShapesPipeline.__call__`` (the parity test).
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from flowalign.adapter import ADAPTERS, Adapter, Cond
from flowalign.shapes import VOCAB

#: special tokens (ids 0-3); eos != 2 so CLIP pools at the first <eos> (transformers' non-legacy path)
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>")
MAX_LENGTH = 16  # <bos> + up to 9 words + <eos>, padded


def build_tokenizer(max_length: int = MAX_LENGTH) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the world vocabulary: lower-case, whitespace split, ``<bos> ... <eos>``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in VOCAB:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length, padding_side="right")


def build_pipeline(seed: int = 0, num_layers: int = 4, width: int = 128, heads: int = 4, patch_size: int = 4,
                   text_hidden: int = 64, text_layers: int = 2, image_size: int = 32, shift: float = 1.0
                   ) -> "ShapesPipeline":
    """A randomly initialised pipeline (seeded): the pretraining script's starting point and the tests' model."""
    tokenizer = build_tokenizer()
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
            num_hidden_layers=text_layers, num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
            projection_dim=text_hidden, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ))
        transformer = SD3Transformer2DModel(
            sample_size=image_size, patch_size=patch_size, in_channels=3, out_channels=3, num_layers=num_layers,
            attention_head_dim=width // heads, num_attention_heads=heads, joint_attention_dim=text_hidden,
            caption_projection_dim=width, pooled_projection_dim=text_hidden,
            pos_embed_max_size=image_size // patch_size,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return ShapesPipeline(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


class ShapesPipeline(DiffusionPipeline):
    """Pixel-space flow-matching text-to-image pipeline of the shapes world (see module docstring)."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer: SD3Transformer2DModel, text_encoder: CLIPTextModel,
                 tokenizer: PreTrainedTokenizerFast, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)

    @property
    def image_size(self) -> int:
        return int(self.transformer.config.sample_size)

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                              return_tensors="pt").input_ids

    def encode_prompt(self, prompts: Sequence[str], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """``(encoder_hidden_states [B, L, D], pooled_projections [B, D])`` from the CLIP text encoder."""
        device = device or self.text_encoder.device
        ids = self.tokenize(prompts).to(device)
        out = self.text_encoder(ids)
        return out.last_hidden_state, out.pooler_output

    def prepare_latents(self, batch: int, dtype: torch.dtype, device: torch.device,
                        generator: torch.Generator | list[torch.Generator] | None = None,
                        latents: Tensor | None = None) -> Tensor:
        """Initial noise ``[B, 3, H, W]`` (``randn_tensor``, the diffusers draw for ``generator``)."""
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        c = self.transformer.config.in_channels
        shape = (batch, c, self.image_size, self.image_size)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 10, guidance_scale: float = 1.0, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Euler ODE sampling with the scheduler; CFG against ``negative_prompt`` (default ``""``) when
        ``guidance_scale > 1``. ``output_type``: ``"pil"``, ``"np"`` (``[B, H, W, 3]`` in [0, 1]), ``"pt"``
        (``[B, 3, H, W]`` in [0, 1]) or ``"latent"`` (raw ``[-1, 1]`` pixels)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        device = self._execution_device
        dtype = self.transformer.dtype
        do_cfg = guidance_scale > 1.0
        pe, pooled = self.encode_prompt(prompts, device)
        if do_cfg:
            neg = negative_prompt if negative_prompt is not None else ""
            neg = [neg] * batch if isinstance(neg, str) else [n for n in neg for _ in range(num_images_per_prompt)]
            npe, npooled = self.encode_prompt(neg, device)
            pe, pooled = torch.cat([npe, pe]), torch.cat([npooled, pooled])
        pe, pooled = pe.to(dtype), pooled.to(dtype)
        x = self.prepare_latents(batch, dtype, device, generator, latents)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            inp = torch.cat([x, x]) if do_cfg else x
            v = self.transformer(hidden_states=inp, timestep=t.expand(inp.shape[0]), encoder_hidden_states=pe,
                                 pooled_projections=pooled, return_dict=False)[0]
            if do_cfg:
                v_u, v_c = v.chunk(2)
                v = v_u + guidance_scale * (v_c - v_u)
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        self.maybe_free_model_hooks()
        if output_type == "latent":
            images = x
        else:
            images = (x.float() / 2 + 0.5).clamp(0, 1)
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            elif output_type == "pil":
                images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
            elif output_type != "pt":
                raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


@ADAPTERS.register("shapes")
class ShapesAdapter(Adapter):
    """Adapter over :class:`ShapesPipeline` (the embedded default; weights in ``pipelines/weights/shapes``)."""

    prediction_type = "flow"
    default_kernel = "flow_sde"
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    lora_rank = 16
    lora_alpha = 32
    pipeline_class = ShapesPipeline

    def __init__(self, pipe: ShapesPipeline) -> None:
        super().__init__(pipe)

    @classmethod
    def default_weights(cls) -> str:
        """Path of the shipped pretrained weights."""
        from pathlib import Path

        return str(Path(__file__).parent / "weights" / "shapes")

    def encode(self, prompts: Sequence[str], negative: Sequence[str] | str | None = None) -> Cond:
        """CLIP embeddings of ``prompts`` (and of ``negative``, e.g. ``""``, for CFG); cached, no grad."""
        return self.cached_encode(prompts, negative, self._encode)

    @torch.no_grad()
    def _encode(self, prompts: tuple[str, ...], negative: tuple[str, ...] | None) -> Cond:
        dt = self.dtype
        pe, pooled = self.pipe.encode_prompt(prompts, self.device)
        cond = {"encoder_hidden_states": pe.to(dt), "pooled_projections": pooled.to(dt)}
        uncond = None
        if negative is not None:
            npe, npooled = self.pipe.encode_prompt(negative, self.device)
            uncond = {"encoder_hidden_states": npe.to(dt), "pooled_projections": npooled.to(dt)}
        return Cond(cond, uncond)

    def init_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """``[B, 3, 32, 32]`` standard normal, the pipeline's own draw (``prepare_latents``)."""
        return self.pipe.prepare_latents(batch, self.dtype, self.device, generator)

    def sigmas(self, num_steps: int) -> Tensor:
        """The scheduler's (shifted) sigmas for ``num_steps`` plus the terminal 0: ``num_steps + 1`` values."""
        return self.memo_sigmas(num_steps, lambda n: self.scheduler_sigmas(n).float())

    def predict(self, x: Tensor, sigma: Tensor | float, cond: Cond, guidance: float = 1.0) -> Tensor:
        """Velocity ``v = eps - x_0`` at ``sigma`` (scalar or ``[B]``); CFG ``u + w (c - u)`` if ``guidance > 1``."""
        t = self.expand_sigma(sigma, x.shape[0], x.device) * self.pipe.scheduler.config.num_train_timesteps
        kwargs = cond.kwargs
        cfg = guidance > 1.0
        if cfg:
            (x, t), kwargs = self.cfg_batch(cond, (x, t))
        out = self.pipe.transformer(hidden_states=x, timestep=t.to(x.dtype), return_dict=False, **kwargs)[0]
        if cfg:
            out = self.cfg_combine(*out.chunk(2), guidance)
        return out

    def decode(self, x: Tensor) -> Tensor:
        """Pixels in [-1, 1] -> images in [0, 1]: ``clamp(x / 2 + 1/2)`` (differentiable)."""
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def trainable_module(self) -> nn.Module:
        return self.pipe.transformer

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] -> pixels ``2 img - 1`` in [-1, 1] (pixel space: the exact inverse of ``decode``)."""
        return (images.to(self.device) * 2 - 1).to(self.dtype)
