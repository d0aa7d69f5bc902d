"""LLM RLVR: the GRPO family (GRPO, DAPO, Dr.GRPO, RLOO, REINFORCE++, MC-GRPO, GDPO) on ``transformers`` causal LMs.

Modules, one job each:

* ``rollout``: batched sampling of G completions per prompt (KV cache, prefix sharing, stop strings) and token
  log-probs by teacher forcing (``token_logps``; ``token_logps_grouped`` runs each prompt once per group);
* ``losses``: clipped / REINFORCE per-token losses, k1/k2/k3 KL, explicit aggregation modes;
* advantages come from the shared ``flowalign.advantages`` registry, rewards from ``flowalign.rewards``;
* ``config``: the ``kind: llm`` recipe dataclasses and presets; ``trainer``: the loop (accelerate, peft LoRA,
  checkpoints with exact resume, JSONL logs); ``task`` + ``model``: the embedded addition task, its verifier
  rewards and the shipped tiny Llama (``scripts/pretrain_llm.py``).

    flowalign train recipes/llm_grpo.yaml [key=value ...]
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLMConfig": "config", "load_config": ("config", "load"), "PRESETS": "config",
    "LLMTrainer": "trainer", "generate": "rollout", "token_logps": "rollout", "token_logps_grouped": "rollout",
    "Rollout": "rollout", "VLLMEngine": "rollout", "policy_loss": "losses", "aggregate": "losses", "kl_estimate": "losses",
    "ArithmeticTask": "task", "build_tokenizer": "task", "load_model": "model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # lazy: importing flowalign.llm stays cheap
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flowalign.llm' has no attribute {name!r}")
    mod, attr = _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
    return getattr(importlib.import_module(f"flowalign.llm.{mod}"), attr)
