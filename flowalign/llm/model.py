"""The embedded tiny causal LM: a ``transformers`` ``LlamaForCausalLM`` over the character tokenizer of ``task.py``.

``load_model(path)`` loads any local causal LM directory (``from_pretrained``); ``path=None`` or ``"embedded"``
loads the shipped weights in ``flowalign/llm/weights/`` (written by ``scripts/pretrain_llm.py``). Nothing is ever
downloaded: ``local_files_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def tiny_llama_config(vocab_size: int, **overrides):
    """Config of the embedded model (~0.8M parameters, tied embeddings, RoPE)."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_random_model(seed: int = 0, **overrides):
    """A randomly initialised embedded-architecture model and its tokenizer (for tests and pretraining)."""
    from transformers import LlamaForCausalLM

    from flowalign.llm.task import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), **overrides))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a local directory; ``None``/``"embedded"`` = the shipped weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None or str(path) == "embedded":
        path = WEIGHTS_DIR
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(
                f"embedded LLM weights missing in {path}; run `python scripts/pretrain_llm.py` to create them"
            )
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    _realign(model)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.padding_side = "left"
    return model, tok


@torch.no_grad()
def _realign(model) -> None:
    """Give every parameter its own freshly allocated (64-byte aligned) storage, tied parameters staying tied.

    ``from_pretrained`` leaves tensors at their offsets in the safetensors file (not 64-byte aligned), and CPU
    BLAS kernels take other code paths for unaligned operands: the same forward then differs in the last bits from
    that of a copied model (``copy.deepcopy``, DDP-wrapped training processes). Aligned copies make the numbers
    independent of how the weights were loaded, so one and several processes agree (tests/test_llm_multiprocess.py).
    """
    for p in model.parameters():  # deduplicated: a tied weight is one Parameter, cloned once
        p.data = p.data.clone(memory_format=torch.contiguous_format)

