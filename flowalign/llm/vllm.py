"""The optional vLLM rollout engine (``pip install flowalign[vllm]``): ``VLLMEngine`` and its weight sync.

``flowalign.llm.rollout.generate(engine="vllm")`` calls into this module; nothing here is imported unless that
engine is used. The engine returns the same ``Rollout`` as the other engines, so the trainer's log-prob passes
(teacher forcing, ``rollout.token_logps``) are unchanged.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from flowalign.llm.rollout import Generators, Rollout


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ValueError("engine='vllm' needs the optional vllm package (pip install 'flowalign[vllm]'); "
                         "use engine='cached' or 'hf'") from e
    return vllm


def policy_weights_for_vllm(model) -> dict[str, Tensor]:
    """The policy's current weights under their Hugging Face checkpoint names (what vLLM's ``load_weights`` reads).

    A peft LoRA model is merged on the fly (``W + scaling * B @ A`` for the active adapter; the model is not
    modified): vLLM receives plain base-model names, no ``lora_*``/``base_layer`` keys (as TRL's colocate sync).
    """
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a core dependency
        PeftModel = LoraLayer = None
    if PeftModel is None or not isinstance(model, PeftModel):
        return {k: v.detach() for k, v in model.state_dict().items()}
    base = model.get_base_model()
    deltas: dict[str, Tensor] = {}
    for name, mod in base.named_modules():
        if isinstance(mod, LoraLayer) and not getattr(mod, "merged", False) and not mod.disable_adapters:
            d = None
            for ad in mod.active_adapters:
                if ad in getattr(mod, "lora_A", {}):
                    dw = mod.get_delta_weight(ad)
                    d = dw if d is None else d + dw
            if d is not None:
                deltas[f"{name}.weight"] = d.detach()
    out: dict[str, Tensor] = {}
    for k, v in base.state_dict().items():
        if "lora_" in k or "original_module" in k:
            continue
        k = k.replace(".base_layer.", ".").replace("modules_to_save.default.", "")
        v = v.detach()
        if k in deltas:
            v = v + deltas[k].to(v.dtype)
        out[k] = v
    return out


def _load_weights_on_worker(worker, weights):  # runs inside a vLLM worker (LLM.collective_rpc with a callable)
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    runner.model.load_weights(weights)


_RUNNER_MODEL_PATHS = (
    ("model_executor", "driver_worker", "worker", "model_runner", "model"),  # vLLM V1 in-process (TRL colocate, verl)
    ("model_executor", "driver_worker", "model_runner", "model"),  # vLLM V0 (TRL <= 0.17)
    ("engine_core", "engine_core", "model_executor", "driver_worker", "worker", "model_runner", "model"),
)


class VLLMEngine:
    """Rollouts with vLLM's offline API (``vllm.LLM`` / ``SamplingParams`` / ``LLM.generate``), as a ``Rollout``.

    * One request per prompt with ``SamplingParams(n=G, temperature, top_p, top_k, max_tokens, stop,
      include_stop_str_in_output=True, logprobs=0, seed)``; the prompt goes in as token ids from *our* tokenizer
      (BOS included), so the completion is sampled after exactly the prompt the trainer's log-prob pass sees.
      Greedy (``temperature=0``) asks for one sample per prompt and repeats it ``G`` times.
    * Seeds: one per prompt, drawn from that prompt's generator (or the shared one), so a seeded run repeats.
    * ``completion_ids`` are vLLM's ``token_ids`` (EOS / the token completing a stop string kept, as the other
      engines), right padded; ``truncated`` is ``finish_reason == "length"``; ``sampler_logps`` are vLLM's
      per-token log-probs of the sampled tokens (vLLM V1 reports raw, temperature-free log-probs unless the engine
      is built with ``logprobs_mode="processed_logprobs"``). The trainer never uses them: it recomputes the
      policy and old-policy log-probs by teacher forcing (``token_logps``) on these tokens.
    * ``sync_weights(model)`` loads the policy's current weights (``policy_weights_for_vllm``; LoRA merged) with the
      vLLM model's ``load_weights``: in process through
      ``llm.llm_engine.model_executor.driver_worker[.worker].model_runner.model`` (TRL's colocate mode, verl),
      else through ``LLM.collective_rpc``; then resets vLLM's prefix cache (cached KV of the old weights).

    ``VLLM_ENABLE_V1_MULTIPROCESSING`` defaults to ``0`` here so that vLLM V1 keeps its model in this process and
    the direct ``load_weights`` path works. ``llm_kwargs`` go to ``vllm.LLM`` (``gpu_memory_utilization`` defaults
    to 0.3: the engine shares the GPU with training, as TRL's colocate default).

    Not exercised against a real vLLM in this repository's tests (no GPU): ``tests/test_llm_vllm.py`` drives it
    with a fake ``vllm`` module implementing exactly the API used here.
    """

    def __init__(self, model: str | os.PathLike, *, dtype: str = "float32", seed: int = 0, **llm_kwargs) -> None:
        self.vllm = _import_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kw = {"gpu_memory_utilization": 0.3, **llm_kwargs}
        self.model_path = str(model)
        self.llm = self.vllm.LLM(model=self.model_path, dtype=dtype, seed=seed, **kw)
        self.syncs = 0

    def _runner_model(self):
        for path in _RUNNER_MODEL_PATHS:
            obj = getattr(self.llm, "llm_engine", None)
            for attr in path:
                obj = getattr(obj, attr, None)
                if obj is None:
                    break
            if obj is not None and hasattr(obj, "load_weights"):
                return obj
        return None

    @torch.no_grad()
    def sync_weights(self, model) -> int:
        """Load ``model``'s current weights into the engine; returns the number of tensors sent."""
        weights = policy_weights_for_vllm(model)
        target = self._runner_model()
        if target is not None:
            target.load_weights(weights.items())
        elif hasattr(self.llm, "collective_rpc"):
            self.llm.collective_rpc(_load_weights_on_worker, args=(list(weights.items()),))
        else:
            raise RuntimeError("cannot reach the vLLM model to load weights (no model_runner.model, no "
                               "collective_rpc); is this vLLM >= 0.8?")
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()
        self.syncs += 1
        return len(weights)

    def _seeds(self, generator: Generators, n: int) -> list[int | None]:
        if isinstance(generator, (list, tuple)):
            return [int(torch.randint(2**62, (1,), generator=g)) for g in generator]
        if generator is None:
            return [None] * n
        return [int(s) for s in torch.randint(2**62, (n,), generator=generator)]

    def generate(self, tok, prompts: Sequence[str], G: int, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, stop_strings: Sequence[str] = (), generator: Generators = None,
                 device: torch.device | str = "cpu") -> Rollout:
        prompts = list(prompts)
        greedy = temperature == 0
        n = 1 if greedy else G
        params = [self.vllm.SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k and top_k > 0 else -1,
            max_tokens=max_new_tokens, stop=list(stop_strings) or None, include_stop_str_in_output=True,
            logprobs=0, seed=seed, skip_special_tokens=True) for seed in self._seeds(generator, len(prompts))]
        inputs = [{"prompt_token_ids": ids} for ids in tok(prompts)["input_ids"]]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        if len(outs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(prompts)} prompts")
        seqs, lps, trunc = [], [], []
        for out in outs:
            cands = list(out.outputs)
            if len(cands) != n:
                raise RuntimeError(f"vLLM returned {len(cands)} completions for n={n}")
            for c in (cands * G if greedy else cands):
                ids = [int(t) for t in c.token_ids][:max_new_tokens]
                seqs.append(ids)
                lp = [0.0] * len(ids)
                if c.logprobs is not None:
                    for t, (tid, d) in enumerate(zip(ids, c.logprobs)):
                        x = d[tid]
                        lp[t] = float(getattr(x, "logprob", x))
                lps.append(lp)
                trunc.append(c.finish_reason == "length")
        B, C = len(seqs), max((len(x) for x in seqs), default=0)
        comp = torch.full((B, C), tok.pad_token_id, dtype=torch.long)
        slp = torch.zeros(B, C)
        cmask = torch.zeros(B, C, dtype=torch.long)
        for i, (ids, lp) in enumerate(zip(seqs, lps)):
            comp[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            slp[i, :len(ids)] = torch.tensor(lp)
            cmask[i, :len(ids)] = 1
        rows = [p for p in prompts for _ in range(G)]
        enc = tok(rows, return_tensors="pt", padding=True, padding_side="left")
        texts = tok.batch_decode(comp, skip_special_tokens=True)
        return Rollout(enc["input_ids"].to(device), enc["attention_mask"].to(device), comp.to(device),
                       cmask.to(device), torch.tensor(trunc, dtype=torch.bool, device=device), texts, rows, G,
                       slp.to(device))


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_for(model) -> VLLMEngine:
    """The cached ``VLLMEngine`` of ``model`` (built from its checkpoint directory on first use)."""
    eng = _ENGINES.get(model)
    if eng is None:
        path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        if not path or not Path(path).is_dir():
            raise ValueError(f"engine='vllm' needs the model's local checkpoint directory (config._name_or_path="
                             f"{path!r}); build a VLLMEngine(path) and pass vllm_engine=")
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        eng = VLLMEngine(path, dtype=dtype)
        _ENGINES[model] = eng
    return eng
