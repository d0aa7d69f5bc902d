"""LLM RLVR: the GRPO family (GRPO, DAPO, Dr.GRPO, RLOO, REINFORCE++, MC-GRPO, GDPO) on ``transformers`` causal LMs.

Modules, one job each:

* ``rollout``: batched sampling of G completions per prompt (KV cache, prefix sharing, stop strings) and token
  log-probs by teacher forcing (``token_logps``; ``token_logps_grouped`` runs each prompt once per group;
  ``position_ids`` ``mask`` or TRL's ``arange``); ``vllm``: the optional vLLM engine and its weight sync;
* ``losses``: clipped / REINFORCE per-token losses (``TOKEN_POLICY_LOSSES``), k1/k2/k3 KL, explicit aggregation
  modes (TRL grpo / bnpo / dr_grpo / dapo and verl's);
* ``advantages``: the shared ``flowalign.advantages`` estimators over one or several processes; rewards come from
  ``flowalign.rewards``;
* ``config``: the ``kind: llm`` recipe dataclasses on the shared ``flowalign.config`` machinery, and the presets;
  ``trainer``: the loop (accelerate, peft LoRA, JSONL logs); ``checkpointing``: its checkpoints through
  ``flowalign.checkpoint`` (crash-safe, exact resume); ``task`` + ``model``: the embedded addition task, its
  verifier rewards and the shipped tiny Llama (``scripts/pretrain_llm.py``).

    flowalign train recipes/llm_grpo.yaml [key=value ...]
    flowalign train --help-config recipes/llm_grpo.yaml
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLMConfig": "config", "load_config": ("config", "load"), "PRESETS": "config", "describe_llm": "config",
    "LLMTrainer": "trainer", "generate": "rollout", "token_logps": "rollout", "token_logps_grouped": "rollout",
    "Rollout": "rollout", "VLLMEngine": "vllm", "policy_loss": "losses", "aggregate": "losses", "kl_estimate": "losses",
    "ArithmeticTask": "task", "build_tokenizer": "task", "load_model": "model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # lazy: importing flowalign.llm stays cheap
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flowalign.llm' has no attribute {name!r}")
    mod, attr = _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
    return getattr(importlib.import_module(f"flowalign.llm.{mod}"), attr)
