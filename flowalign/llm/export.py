"""LLM exports that plain transformers / peft load: ``save_pretrained`` of the model plus its tokenizer.

``export_llm(out, weights, config, state)`` rebuilds the trained model from the base (``model.path``, the
embedded weights for ``embedded``) and the checkpoint's trainable tensors, on CPU, apart from the live policy (so a
checkpoint never perturbs training):

* full fine-tune: ``model.load_state_dict(weights)`` -> ``out/`` (``config.json``, ``model.safetensors``,
  ``generation_config.json``) + the tokenizer: ``AutoModelForCausalLM.from_pretrained(out)``,
  ``AutoTokenizer.from_pretrained(out)``;
* LoRA: ``get_peft_model`` with the run's ``LoraConfig`` and ``set_peft_model_state_dict(weights)`` ->
  ``out/adapter/`` (peft's own ``save_pretrained``: ``PeftModel.from_pretrained(base, out/"adapter")``), then
  ``merge_and_unload()`` -> ``out/`` as above. The adapter sits in a subfolder because transformers treats a
  folder with ``adapter_config.json`` as an adapter and would load the base model from elsewhere.

A model card ``README.md`` and ``recipe.yaml`` come from ``flowalign.export.write_card``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

#: subfolder of an LLM export with the peft adapter (LoRA runs)
ADAPTER_DIR = "adapter"


def export_llm(out: str | Path, *, weights: dict[str, torch.Tensor], config: dict, state: dict) -> Path:
    """Write the LLM exports of one checkpoint into ``out`` (created; emptied first); returns ``out``.

    ``weights``: the trainer's ``trainable_state()`` (peft names for LoRA, the model's state dict otherwise);
    ``config``: ``LLMConfig.to_dict()``; ``state``: the checkpoint's ``state.json`` (``step``, ``lora``)."""
    from flowalign.export import write_card
    from flowalign.llm.model import WEIGHTS_DIR, load_model

    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    m = config["model"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[m.get("dtype", "float32")]
    model, tok = load_model(m.get("path"), dtype)
    base = str(WEIGHTS_DIR) if m.get("path") in (None, "embedded") else str(m["path"])
    lora = bool(state.get("lora", (m.get("lora") or {}).get("enabled")))
    if lora:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        lc = m["lora"]
        peft_model = get_peft_model(model, LoraConfig(
            task_type="CAUSAL_LM", r=lc["rank"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"],
            target_modules=list(lc["target_modules"]), base_model_name_or_path=base))
        result = set_peft_model_state_dict(peft_model, weights)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA weights do not fit the base model: unexpected {result.unexpected_keys[:3]}")
        peft_model.save_pretrained(str(out / ADAPTER_DIR))
        model = peft_model.merge_and_unload()
        formats = ["transformers (LoRA merged)", "peft-lora (adapter/)"]
    else:
        model.load_state_dict(weights)
        formats = ["transformers"]
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    step = state.get("step")
    a, r = config.get("algo") or {}, config.get("rollout") or {}
    per_step = int(r.get("prompts_per_step", 0)) * int(r.get("group_size", 0))
    progress = f"step {step}, about {per_step * int(step or 0)} sampled completions " \
               f"({r.get('prompts_per_step')} prompts x {r.get('group_size')} per step)"
    usage = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
             "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n"
             "tok = AutoTokenizer.from_pretrained(\"path/to/this/folder\")")
    if lora:
        usage += ("\n# or the adapter on the base: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
                  f"{base!r}), \"path/to/this/folder/{ADAPTER_DIR}\")")
    write_card(out, config=config, base=base, kind="llm", method=str(a.get("preset") or a.get("loss") or "grpo"),
               formats=formats, progress=progress, upto=int(step or 0), usage=usage, ema=None)
    return out
