"""Batched LLM rollouts (G completions per prompt) and token log-probs by teacher forcing.

``generate`` samples ``G`` completions for each prompt, group-major (prompt 0's G rows, then prompt 1's, ...):

* ``engine="cached"`` (default): our decode loop over the model's own forward with a KV cache. Each *unique*
  prompt is prefilled once and its cache is repeated ``G`` times (prefix sharing); decoding stops as soon as
  every row has finished. Sampling uses the given ``torch.Generator`` (reproducible, independent of global RNG).
* ``engine="hf"``: ``model.generate`` (left padding, KV cache, ``stop_strings``), one row per completion as TRL
  does; seeded from the generator through a forked global RNG.
* ``engine="vllm"``: the optional vLLM extra (``pip install flowalign[vllm]``; ``VLLMEngine``): vLLM's offline
  ``LLM.generate`` with ``SamplingParams(n=G, ...)`` per prompt, converted to the same ``Rollout``. The policy's
  current weights are pushed into the engine with ``VLLMEngine.sync_weights`` (the trainer does it before each
  generation that follows an optimizer step; a bare ``generate(engine="vllm")`` call syncs every time).

``generator`` is one ``torch.Generator`` for the whole batch, or one per prompt (``len(prompts)`` of them): then
each group's samples depend only on its own generator, not on which other prompts share the batch, so a batch
split over several processes samples exactly what one process sampling the whole batch does.

A completion ends at the first EOS (kept and counted in the mask, as TRL does) or at the end of the first stop
string (kept); ``truncated`` marks rows that hit ``max_new_tokens`` without either.

``token_logps`` computes log softmax(z / T)[token] of the completion tokens for concat(prompt, completion),
only projecting the completion positions (``logits_to_keep``), micro-batched, optionally with the entropy. Each
micro-batch drops the prompt columns that are padding in all its rows and the completion columns past its longest
completion (those positions get log-prob 0; they are masked everywhere), so its values depend on its own rows only.
Position ids follow the attention mask (left padding), the same positions the decode loop used (RoPE is
relative, so TRL's arange positions give the same values; the parity tests check it).
``token_logps_grouped`` is the same computation with prefix sharing for rows that come in groups of G: each
prompt runs once and its KV cache (with autograd) is repeated G times, so the training forward/backward covers
``N_prompts * P + B * C`` positions instead of ``B * (P + C)``; the trainer uses it by default.
"""

from __future__ import annotations

import os
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import Tensor

from transformers import StoppingCriteria

from flowalign.registry import check_choice

ENGINES = ("cached", "hf", "vllm")
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


@dataclass
class Rollout:
    """``B = len(prompts) * G`` completions, group-major. Token tensors are on the model's device."""

    prompt_ids: Tensor  # [B, P] left padded
    prompt_mask: Tensor  # [B, P]
    completion_ids: Tensor  # [B, C] right padded with pad id
    completion_mask: Tensor  # [B, C] 1 up to and including EOS / stop string
    truncated: Tensor  # bool [B]
    completions: list[str]  # decoded text without special tokens
    prompts: list[str]  # per row
    group_size: int
    sampler_logps: Tensor | None = None  # [B, C] log-probs at sampling time (cached engine)
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(1)

    def index(self, idx: Tensor) -> "Rollout":
        """Rows ``idx`` (group structure is the caller's business)."""
        il = idx.tolist()
        return replace(
            self, prompt_ids=self.prompt_ids[idx], prompt_mask=self.prompt_mask[idx],
            completion_ids=self.completion_ids[idx], completion_mask=self.completion_mask[idx],
            truncated=self.truncated[idx], completions=[self.completions[i] for i in il],
            prompts=[self.prompts[i] for i in il],
            sampler_logps=None if self.sampler_logps is None else self.sampler_logps[idx],
        )


def concat(rollouts: Sequence[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts row-wise, re-padding prompts on the left and completions on the right."""
    def pad(ts: list[Tensor], left: bool, value) -> Tensor:
        n = max(t.shape[1] for t in ts)
        out = []
        for t in ts:
            fill = t.new_full((t.shape[0], n - t.shape[1]), value)
            out.append(torch.cat([fill, t] if left else [t, fill], 1))
        return torch.cat(out)

    rs = list(rollouts)
    sl = None
    if all(r.sampler_logps is not None for r in rs):
        sl = pad([r.sampler_logps for r in rs], False, 0.0)
    return Rollout(
        prompt_ids=pad([r.prompt_ids for r in rs], True, pad_id),
        prompt_mask=pad([r.prompt_mask for r in rs], True, 0),
        completion_ids=pad([r.completion_ids for r in rs], False, pad_id),
        completion_mask=pad([r.completion_mask for r in rs], False, 0),
        truncated=torch.cat([r.truncated for r in rs]),
        completions=[c for r in rs for c in r.completions], prompts=[p for r in rs for p in r.prompts],
        group_size=rs[0].group_size, sampler_logps=sl,
    )


def _positions(mask: Tensor) -> Tensor:
    """Position ids for a left-padded mask: 0 at the first real token (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then nucleus (top-p) filtering, as the HF warpers (tokens outside get -inf)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, order = logits.sort(-1, descending=False)
        cum = sorted_l.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def _finish(tok, prompt_ids, prompt_mask, comp: Tensor, comp_mask: Tensor, finished: Tensor, prompts, G,
            sampler_logps=None) -> Rollout:
    texts = tok.batch_decode(comp.masked_fill(comp_mask == 0, tok.pad_token_id), skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, comp, comp_mask, ~finished, texts, prompts, G, sampler_logps)


def _stop_hit(tok, comp: Tensor, lengths: Tensor, rows: Tensor, stop_strings: Sequence[str]) -> Tensor:
    """Which of ``rows`` now end with one of ``stop_strings`` (decodes a short tail only)."""
    hit = torch.zeros(len(rows), dtype=torch.bool)
    tail = max(len(s) for s in stop_strings) + 2
    for j, r in enumerate(rows.tolist()):
        n = int(lengths[r])
        text = tok.decode(comp[r, max(0, n - tail):n], skip_special_tokens=True)
        hit[j] = any(text.endswith(s) for s in stop_strings)
    return hit


@torch.no_grad()
def _generate_cached(model, tok, prompts, G, max_new_tokens, temperature, top_k, top_p, stop_strings, generator):
    dev = next(model.parameters()).device
    enc = tok(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    logits = out.logits[:, -1].float()
    if G > 1:  # prefix sharing: one prefill per unique prompt, its KV cache repeated for the G samples
        cache.batch_repeat_interleave(G)
        logits = logits.repeat_interleave(G, 0)
        ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    B = ids.shape[0]
    uniforms = None
    if isinstance(generator, (list, tuple)) and temperature > 0:  # [B, T] uniforms, G rows from each generator
        uniforms = torch.cat([torch.rand(G, max_new_tokens, generator=g) for g in generator])  # in [0, 1)
    eos = tok.eos_token_id
    comp = torch.full((B, max_new_tokens), tok.pad_token_id, dtype=torch.long, device=dev)
    slp = torch.zeros(B, max_new_tokens, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    pos = _positions(mask)[:, -1:]
    att = mask
    for t in range(max_new_tokens):
        z = logits / temperature if temperature > 0 else logits
        z = _filter_logits(z, top_k, top_p)
        logp = z.log_softmax(-1)
        if temperature > 0:
            probs = logp.exp().cpu()
            if uniforms is not None:  # inverse CDF with the group's own uniforms: batch-composition independent
                cdf = probs.cumsum(-1)
                cdf = cdf / cdf[:, -1:]  # last entry exactly 1; zero-probability tokens are never picked
                nxt = torch.searchsorted(cdf, uniforms[:, t:t + 1], right=True).squeeze(1).to(dev)
            else:
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(dev)
        else:
            nxt = z.argmax(-1)
        alive = ~finished
        nxt = torch.where(alive, nxt, torch.full_like(nxt, tok.pad_token_id))
        comp[:, t] = nxt
        slp[:, t] = torch.where(alive, logp.gather(1, nxt[:, None]).squeeze(1), torch.zeros_like(slp[:, t]))
        lengths += alive.long()
        done_now = alive & (nxt == eos)
        if stop_strings:
            rows = (alive & ~done_now).nonzero().flatten()
            if len(rows):
                done_now[rows] |= _stop_hit(tok, comp, lengths, rows.cpu(), stop_strings).to(dev)
        finished |= done_now
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        att = torch.cat([att, alive.long()[:, None]], 1)
        pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=att, position_ids=pos, past_key_values=cache,
                    use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
    C = int(lengths.max()) if B else 0
    comp, slp = comp[:, :C], slp[:, :C]
    cmask = (torch.arange(C, device=dev)[None] < lengths[:, None]).long()
    rows = [p for p in prompts for _ in range(G)]
    return _finish(tok, ids, mask, comp, cmask, finished, rows, G, slp)


class _StopOnStrings(StoppingCriteria):
    """HF ``StoppingCriteria`` that ends a row once its completion ends with a stop string.

    (``generate(stop_strings=...)`` relies on tokenizer vocab surgery that fails on some tokenizers, e.g. a
    character-level one; decoding the short tail is simple and exact.)
    """

    def __init__(self, tok, stop_strings, prompt_len: int) -> None:
        self.tok, self.stop, self.p = tok, list(stop_strings), prompt_len

    def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
        comp = input_ids[:, self.p:]
        rows = torch.arange(comp.shape[0])
        n = torch.full((comp.shape[0],), comp.shape[1])
        return _stop_hit(self.tok, comp.cpu(), n, rows, self.stop).to(input_ids.device)


def _generate_hf(model, tok, prompts, G, max_new_tokens, temperature, top_k, top_p, stop_strings, generator):
    if isinstance(generator, (list, tuple)):  # one generator per group: one generate call per prompt
        parts = [_generate_hf(model, tok, [p], G, max_new_tokens, temperature, top_k, top_p, stop_strings, g)
                 for p, g in zip(prompts, generator)]
        return concat(parts, tok.pad_token_id)
    dev = next(model.parameters()).device
    rows = [p for p in prompts for _ in range(G)]
    enc = tok(rows, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    seed = int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else None
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p)
    else:
        kw.update(do_sample=False)
    if stop_strings:
        from transformers import StoppingCriteriaList

        kw.update(stopping_criteria=StoppingCriteriaList([_StopOnStrings(tok, stop_strings, ids.shape[1])]))
    ctx = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with ctx, torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    comp = out[:, ids.shape[1]:]
    return _postprocess(tok, ids, mask, comp, rows, G, stop_strings)


def _postprocess(tok, ids, mask, comp, rows, G, stop_strings=None) -> Rollout:
    """Cut after the first EOS (kept) or stop string (kept); right-pad; mark truncation."""
    B, C = comp.shape
    is_eos = comp == tok.eos_token_id
    has = is_eos.any(1)
    first = torch.where(has, is_eos.int().argmax(1), torch.full((B,), C, device=comp.device))
    ends = torch.where(has, first + 1, torch.full_like(first, C))
    finished = has.clone()
    if stop_strings:
        for r in range(B):
            if has[r]:
                continue
            for n in range(1, C + 1):
                if _stop_hit(tok, comp, torch.tensor([n]).expand(B), torch.tensor([r]), stop_strings)[0]:
                    ends[r], finished[r] = n, True
                    break
    cmask = (torch.arange(C, device=comp.device)[None] < ends[:, None]).long()
    comp = comp.masked_fill(cmask == 0, tok.pad_token_id)
    Cm = int(ends.max()) if B else 0
    return _finish(tok, ids, mask, comp[:, :Cm], cmask[:, :Cm], finished, rows, G)


def generate(model, tok, prompts: Sequence[str], group_size: int = 8, max_new_tokens: int = 16,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_strings: Sequence[str] | None = None, generator: Generators = None,
             engine: str = "cached", vllm_engine: "VLLMEngine | None" = None) -> Rollout:
    """Sample ``group_size`` completions per prompt (group-major); see the module docstring.

    ``engine="vllm"``: ``vllm_engine`` is used as is (its owner keeps its weights in sync); without one, a
    ``VLLMEngine`` for ``model``'s checkpoint directory is created once (cached per model) and ``model``'s current
    weights are loaded into it before sampling.
    """
    check_choice("engine", engine, ENGINES)
    if group_size < 1 or max_new_tokens < 1:
        raise ValueError(f"group_size and max_new_tokens must be >= 1, got {group_size}, {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    prompts = list(prompts)
    if isinstance(generator, (list, tuple)) and len(generator) != len(prompts):
        raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts (need one per prompt)")
    dev = next(model.parameters()).device
    if engine == "vllm":
        eng = vllm_engine
        if eng is None:
            eng = _engine_for(model)
            eng.sync_weights(model)
        return eng.generate(tok, prompts, group_size, max_new_tokens, temperature, top_k, top_p,
                            list(stop_strings or []), generator, device=dev)
    was_training = model.training
    model.eval()
    try:
        fn = _generate_cached if engine == "cached" else _generate_hf
        return fn(model, tok, prompts, group_size, max_new_tokens, temperature, top_k, top_p,
                  list(stop_strings or []), generator)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------- vLLM engine
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


def _engine_for(model) -> VLLMEngine:
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


def _trim_left(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the leading columns that are padding in every row of this micro-batch (left padding).

    Same values (positions follow the mask), less work, and a micro-batch's numbers no longer depend on how long
    the prompts of *other* rows in the batch are (so one process and several agree to float rounding of the sums).
    """
    real = mask.bool().any(0)
    if not bool(real.any()) or bool(real[0]):
        return ids, mask
    first = int(real.int().argmax())
    return ids[:, first:], mask[:, first:]


def token_logps(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                temperature: float = 1.0, micro_batch: int | None = None, entropy: bool = False,
                ) -> tuple[Tensor, Tensor | None]:
    """``log softmax(z_t / T)[o_t]`` for each completion token (``[B, C]``, fp32) and optionally the entropy.

    Teacher forcing over concat(prompt, completion); only the ``C`` completion positions are projected through
    the LM head (``logits_to_keep = C + 1``, last one dropped). Gradients flow when called under grad mode.
    """
    B, C = completion_ids.shape
    T = temperature if temperature > 0 else 1.0
    bs = micro_batch or B
    lps, ents = [], []
    for s in range(0, B, bs):
        pi, pm = _trim_left(prompt_ids[s:s + bs], prompt_mask[s:s + bs])
        Cm = _used_len(completion_mask[s:s + bs])
        if Cm == 0:
            lps.append(completion_ids.new_zeros((len(pi), C), dtype=torch.float32))
            ents.append(lps[-1] if entropy else None)
            continue
        i = torch.cat([pi, completion_ids[s:s + bs, :Cm]], 1)
        a = torch.cat([pm, completion_mask[s:s + bs, :Cm]], 1)
        logits = model(input_ids=i, attention_mask=a, position_ids=_positions(a), logits_to_keep=Cm + 1).logits
        lp, ent = _head_logps(logits[:, :-1], i[:, -Cm:], T, entropy)
        lps.append(_pad_right(lp, C))
        ents.append(_pad_right(ent, C) if entropy else None)
    return torch.cat(lps), (torch.cat(ents) if entropy else None)


def _used_len(mask: Tensor) -> int:
    """Completion columns any row of this micro-batch uses (right padding beyond is dropped)."""
    return int(mask.sum(1).max()) if mask.numel() else 0


def _pad_right(x: Tensor, C: int) -> Tensor:
    return x if x.shape[1] == C else torch.nn.functional.pad(x, (0, C - x.shape[1]))


def _head_logps(logits: Tensor, targets: Tensor, T: float, entropy: bool) -> tuple[Tensor, Tensor | None]:
    logp_all = (logits.float() / T).log_softmax(-1)
    lp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    return lp, (-(logp_all.exp() * logp_all).sum(-1) if entropy else None)


def token_logps_grouped(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, group_size: int, temperature: float = 1.0,
                        micro_batch: int | None = None, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """``token_logps`` with prefix sharing: rows come in groups of ``group_size`` sharing one prompt.

    Each prompt is run once (with a KV cache), the cache is repeated ``G`` times (``repeat_interleave``, so
    gradients from all G completions flow back into the shared prompt activations), then only the completion
    tokens are run. Same values and gradients as the full teacher-forced pass (up to float rounding), with
    ``N_prompt * P + B * C`` instead of ``B * (P + C)`` token positions. Needs a KV cache in training mode, so not
    with gradient checkpointing. ``micro_batch`` counts rows and must be a multiple of ``group_size``.
    """
    G = group_size
    B, C = completion_ids.shape
    if B % G:
        raise ValueError(f"{B} rows are not whole groups of group_size={G}")
    bs = micro_batch or B
    if bs % G:
        raise ValueError(f"micro_batch={bs} must be a multiple of group_size={G}")
    T = temperature if temperature > 0 else 1.0
    lps, ents = [], []
    for s in range(0, B, bs):
        pi, pm = _trim_left(prompt_ids[s:s + bs:G], prompt_mask[s:s + bs:G])
        Cm = _used_len(completion_mask[s:s + bs])
        if Cm == 0:
            lps.append(completion_ids.new_zeros((len(completion_mask[s:s + bs]), C), dtype=torch.float32))
            ents.append(lps[-1] if entropy else None)
            continue
        ci, cm = completion_ids[s:s + bs, :Cm], completion_mask[s:s + bs, :Cm]
        out = model(input_ids=pi, attention_mask=pm, position_ids=_positions(pm), use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1:].repeat_interleave(G, 0)  # predicts completion token 0
        logits = first
        if Cm > 1:
            cache = out.past_key_values
            cache.batch_repeat_interleave(G)
            pmr = pm.repeat_interleave(G, 0)
            start = pmr.sum(-1, keepdim=True)
            pos = start + torch.arange(Cm - 1, device=ci.device)[None]
            att = torch.cat([pmr, cm[:, :-1]], 1)
            rest = model(input_ids=ci[:, :-1], attention_mask=att, position_ids=pos, past_key_values=cache,
                         use_cache=True).logits
            logits = torch.cat([first, rest], 1)
        lp, ent = _head_logps(logits, ci, T, entropy)
        lps.append(_pad_right(lp, C))
        ents.append(_pad_right(ent, C) if entropy else None)
    return torch.cat(lps), (torch.cat(ents) if entropy else None)
