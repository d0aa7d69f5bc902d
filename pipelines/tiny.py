"""Offline builders of tiny *real-class* diffusers pipelines (random weights) for tests, benchmarks and demos.

``build(family, out_dir)`` instantiates the real diffusers/transformers classes of one family with tiny configs
(1-2 layers, widths 16-48, 16x16 latents), seeded random weights and tokenizers written locally (a byte-level
CLIP BPE vocabulary and a character-level T5 unigram vocabulary, so nothing is downloaded), and saves the pipeline
with ``save_pretrained``. Tests then load it through the same ``from_pretrained`` path users take.

``cached(family)`` builds once into ``$FLOWALIGN_CACHE/tiny/<family>-v<VERSION>`` (default
``~/.cache/flowalign/tiny/...``); the build goes to a temporary folder that is renamed into place, so parallel
pytest workers never see a half-written model.

``RESOLUTION[family]`` holds the pixel size (and frames for video) each tiny model is meant to be sampled at;
FLUX's pipeline default (128 x vae factor) would be far too large for a tiny CPU model.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

FAMILIES = ("sd3", "flux", "wan", "sd15")
#: bump when a builder changes so stale caches are rebuilt
VERSION = 1
#: sampling size of each tiny model: height/width in pixels (and num_frames for video)
RESOLUTION: dict[str, dict[str, int]] = {
    "sd3": {"height": 32, "width": 32},
    "flux": {"height": 32, "width": 32},
    "wan": {"height": 32, "width": 32, "num_frames": 9},
    "sd15": {"height": 32, "width": 32},
}
_CLIP_MAX_LEN = 77  # CLIP's real context length; the pipelines read tokenizer.model_max_length


# -- tokenizers (built locally, round-trip through save_pretrained / from_pretrained) -----------------------------
def clip_tokenizer():
    """Byte-level BPE CLIP tokenizer with no merges: 256 byte symbols, their ``</w>`` forms, BOS/EOS (514 ids)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_MAX_LEN)


def t5_tokenizer():
    """Character-level unigram T5 tokenizer (pad=0, eos=1, unk=2; lower-case letters, digits, punctuation)."""
    from transformers import T5Tokenizer

    chars = string.ascii_lowercase + string.digits + " .,'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _clip_text_config(vocab_size: int, hidden: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=_CLIP_MAX_LEN, projection_dim=projection_dim or hidden,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )


def _t5_config(cls, vocab_size: int, d_model: int):
    return cls(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=1,
               num_heads=4, relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False)


def _vae_kl(scaling_factor: float, shift_factor: float | None, quant_conv: bool = True):
    """2-level AutoencoderKL: vae_scale_factor 2, 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=quant_conv, use_post_quant_conv=quant_conv,
    )


# -- one builder per family ---------------------------------------------------------------------------------------
def _sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip, t5 = clip_tokenizer(), t5_tokenizer()
    # CLIP-L/G hidden states (16 + 16) are zero-padded to the T5 width (48) as in SD3; pooled = 16 + 16
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=32,
            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",  # SD3.5 layout
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3.5's static shift
        vae=_vae_kl(scaling_factor=1.5305, shift_factor=0.0609, quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(_clip_text_config(len(clip), 16)),
        tokenizer=clip,
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(len(clip), 16)),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=T5EncoderModel(_t5_config(T5Config, len(t5), 48)),
        tokenizer_3=t5,
    )


def _flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    clip, t5 = clip_tokenizer(), t5_tokenizer()
    return FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
        # FLUX.1-dev's scheduler config: resolution-dependent shift mu
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_vae_kl(scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False),
        text_encoder=CLIPTextModel(_clip_text_config(len(clip), 16)),
        tokenizer=clip,
        text_encoder_2=T5EncoderModel(_t5_config(T5Config, len(t5), 32)),
        tokenizer_2=t5,
    )


def _wan():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    t5 = t5_tokenizer()
    return WanPipeline(
        transformer=WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ),
        vae=AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             temperal_downsample=[False, True, True]),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=UMT5EncoderModel(_t5_config(UMT5Config, len(t5), 32)),
        tokenizer=t5,
    )


def _sd15():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    clip = clip_tokenizer()
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
            attention_head_dim=4,
        ),
        # SD1.5's own beta schedule, sampled with DDIM as DDPO does
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        vae=_vae_kl(scaling_factor=0.18215, shift_factor=None),
        text_encoder=CLIPTextModel(_clip_text_config(len(clip), 32)),
        tokenizer=clip,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


_BUILDERS = {"sd3": _sd3, "flux": _flux, "wan": _wan, "sd15": _sd15}


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise ValueError(f"family={family!r} is not allowed. Allowed: {', '.join(FAMILIES)}")


def build(family: str, out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Build the tiny ``family`` pipeline with weights seeded by ``seed`` and ``save_pretrained`` it to ``out_dir``."""
    _check_family(family)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        pipe = _BUILDERS[family]()
    pipe.save_pretrained(str(out_dir))
    return str(out_dir)


def cache_root() -> Path:
    """``$FLOWALIGN_CACHE/tiny`` or ``~/.cache/flowalign/tiny``."""
    base = os.environ.get("FLOWALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flowalign")
    return Path(base) / "tiny"


def cached(family: str) -> str:
    """Path of the tiny ``family`` pipeline, built on first use (safe under parallel workers: atomic rename)."""
    _check_family(family)
    target = cache_root() / f"{family}-v{VERSION}"
    if (target / "model_index.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
    try:
        build(family, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is a normal folder
        try:
            os.rename(tmp, target)  # atomic; fails if another worker won the race
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


# -- more families (issue 11): SDXL, FLUX.2, Qwen-Image, Z-Image, HunyuanVideo ------------------------------------
def _sdxl():
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    clip = clip_tokenizer()
    # CLIP-L (16) + bigG (16) penultimate states concatenated: cross_attention_dim 32; the added "text_time"
    # embedding takes 6 micro-conditioning ids x 8 + the bigG pooled projection (16)
    return StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=8,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 16,
            cross_attention_dim=32,
        ),
        # SDXL's beta schedule (its Euler scheduler's config), sampled with DDIM as DDPO does
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                timestep_spacing="leading"),
        vae=_vae_kl(scaling_factor=0.13025, shift_factor=None),
        text_encoder=CLIPTextModel(_clip_text_config(len(clip), 16)),
        tokenizer=clip,
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(len(clip), 16)),
        tokenizer_2=clip_tokenizer(),
        force_zeros_for_empty_prompt=True,
    )


FAMILIES = FAMILIES + ("sdxl",)
_BUILDERS.update({"sdxl": _sdxl})
RESOLUTION.update({"sdxl": {"height": 32, "width": 32}})


#: words every word-level test tokenizer knows besides its templates' (the tests' prompts and the shapes world)
_WORDS = ("a an the of and in on to with left right above below red green blue yellow white black purple orange cat "
          "dog tree house circle circles square squares triangle triangles star stars one two three four photo text "
          "hi sign says hello world x").split()


def word_tokenizer(texts=(), specials=("<unk>", "<s>", "</s>", "<pad>"), chat_template: str | None = None,
                   **special_tokens):
    """Word-level fast tokenizer built locally: lower-cased words, single punctuation marks and newlines are tokens
    (spaces are dropped), so a pipeline's prompt *template* keeps a realistic token count (a template's fixed
    prefix length, e.g. Qwen-Image's 34 dropped tokens, then matches). The vocabulary is ``specials``, ``"\\n"``,
    letters, digits, punctuation, ``_WORDS`` and every word of ``texts``; anything else is ``specials[0]``."""
    import re

    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = set(_WORDS) | set(string.ascii_lowercase) | set(string.digits) | set(string.punctuation)
    for t in texts:
        words |= set(re.findall(r"\w+|[^\w\s]", t.lower()))
    vocab = {s: i for i, s in enumerate(specials)}
    vocab["\n"] = len(vocab)
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=specials[0]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t\r]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="isolated"),
    ])
    tok.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=chat_template, model_max_length=4096,
                                   **special_tokens)


# Mistral-Small-3.x chat layout (system + user turns), enough for Flux2Pipeline's text-only prompts
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}[/INST]"
    "{% endif %}{% endfor %}"
)


def _flux2():
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessor, PixtralProcessor

    specials = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                "[IMG_BREAK]", "[IMG_END]")
    tok = word_tokenizer([SYSTEM_MESSAGE], specials, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                         pad_token="<pad>")
    processor = PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tok, patch_size=6,
                                 chat_template=_MISTRAL_TEMPLATE)
    # 3 text layers: the pipeline stacks the hidden states of text_encoder_out_layers (real model: 10, 20, 30)
    text = {"model_type": "mistral", "vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
            "max_position_embeddings": 512, "num_attention_heads": 4, "num_hidden_layers": 3, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 1e9, "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 3, "head_dim": 4}
    vision = {"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
              "intermediate_size": 32, "image_size": 30, "patch_size": 6, "num_channels": 3, "head_dim": 4}
    te = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=specials.index("[IMG]"), image_seq_length=4,
        vision_feature_layer=-1, bos_token_id=1, eos_token_id=2, pad_token_id=3))
    return Flux2Pipeline(
        transformer=Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=256,
            axes_dims_rope=(4, 4, 4, 4),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),  # FLUX.2-dev: mu per size
        vae=AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                               up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                               layers_per_block=1, sample_size=32, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=te,
        tokenizer=processor,
    )


FAMILIES = FAMILIES + ("flux2",)
_BUILDERS.update({"flux2": _flux2})
RESOLUTION.update({"flux2": {"height": 32, "width": 32, "max_sequence_length": 64,
                             "text_encoder_out_layers": [1, 2, 3]}})


_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")


def _qwenimage():
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    template = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n")
    tok = word_tokenizer([template], _QWEN_SPECIALS, unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    sp = {s: tok.convert_tokens_to_ids(s) for s in _QWEN_SPECIALS}
    te = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tok), "rope_theta": 1e6,
                     "bos_token_id": sp["<|endoftext|>"], "eos_token_id": sp["<|im_end|>"],
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tok), bos_token_id=sp["<|endoftext|>"], eos_token_id=sp["<|im_end|>"],
        vision_start_token_id=sp["<|vision_start|>"],
        vision_end_token_id=sp["<|vision_end|>"], vision_token_id=sp["<|image_pad|>"],
        image_token_id=sp["<|image_pad|>"], video_token_id=sp["<|video_pad|>"])).eval()
    return QwenImagePipeline(
        transformer=QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        ),
        vae=AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                   temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
        # Qwen-Image's scheduler: resolution-dependent exponential shift, terminal sigma stretched to 0.02
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                  max_image_seq_len=8192, shift_terminal=0.02,
                                                  time_shift_type="exponential"),
        text_encoder=te,
        tokenizer=tok,
    )


FAMILIES = FAMILIES + ("qwenimage",)
_BUILDERS.update({"qwenimage": _qwenimage})
RESOLUTION.update({"qwenimage": {"height": 32, "width": 32, "max_sequence_length": 32}})


# Qwen3's chat layout (user turn + generation prompt; enable_thinking=False adds the empty think block)
_QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _zimage():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = word_tokenizer(["user assistant system"], _QWEN_SPECIALS + ("<think>", "</think>"),
                         chat_template=_QWEN3_TEMPLATE, unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # the pad tokens are torch.empty in the model: fix them (diffusers' tests do the same)
        transformer.x_pad_token.normal_(0, 0.02)
        transformer.cap_pad_token.normal_(0, 0.02)
    return ZImagePipeline(
        transformer=transformer,
        # FLUX.1's VAE layout (16 channels, scaling/shift factors) as Z-Image
        vae=AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=4,
                          layers_per_block=1, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # Z-Image-Turbo's static shift
        text_encoder=Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                            vocab_size=len(tok), max_position_embeddings=512,
                                            bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                                            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))),
        tokenizer=tok,
    )


FAMILIES = FAMILIES + ("zimage",)
_BUILDERS.update({"zimage": _zimage})
RESOLUTION.update({"zimage": {"height": 32, "width": 32, "max_sequence_length": 32}})


def _hunyuan_video():
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from diffusers import HunyuanVideoTransformer3DModel
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel

    specials = ("<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>")
    tok = word_tokenizer([DEFAULT_PROMPT_TEMPLATE["template"]], specials, unk_token="<unk>",
                         bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<pad>")
    clip = clip_tokenizer()
    return HunyuanVideoPipeline(
        transformer=HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
        ),
        vae=AutoencoderKLHunyuanVideo(
            latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),  # HunyuanVideo's flow shift
        # 3 Llama layers: the pipeline takes the hidden states 2 layers below the top
        text_encoder=LlamaModel(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4,
                                            num_key_value_heads=2, num_hidden_layers=3, vocab_size=len(tok),
                                            bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                            max_position_embeddings=512)),
        tokenizer=tok,
        text_encoder_2=CLIPTextModel(_clip_text_config(len(clip), 8)),
        tokenizer_2=clip,
    )


FAMILIES = FAMILIES + ("hunyuan_video",)
_BUILDERS.update({"hunyuan_video": _hunyuan_video})
# crop_start None: the adapter counts the template's prefix tokens with this (word-level) tokenizer
RESOLUTION.update({"hunyuan_video": {"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 16,
                                     "prompt_template": {"crop_start": None}}})
