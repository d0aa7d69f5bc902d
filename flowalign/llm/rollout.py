"""Batched LLM rollouts (G completions per prompt) and token log-probs by teacher forcing.

``generate`` samples ``G`` completions for each prompt, group-major (prompt 0's G rows, then prompt 1's, ...):

* ``engine="cached"`` (default): our decode loop over the model's own forward with a KV cache. Each *unique*
  prompt is prefilled once and its cache is repeated ``G`` times (prefix sharing); decoding stops as soon as
  every row has finished. Sampling uses the given ``torch.Generator`` (reproducible, independent of global RNG).
* ``engine="hf"``: ``model.generate`` (left padding, KV cache, ``stop_strings``), one row per completion as TRL
  does; seeded from the generator through a forked global RNG.
* ``engine="vllm"``: the optional vLLM extra (``pip install flowalign[vllm]``; ``flowalign.llm.vllm.VLLMEngine``):
  vLLM's offline ``LLM.generate`` with ``SamplingParams(n=G, ...)`` per prompt, converted to the same
  ``Rollout``. The policy's current weights are pushed into the engine with ``VLLMEngine.sync_weights`` (the
  trainer does it before each generation that follows an optimizer step; a bare ``generate(engine="vllm")`` call
  syncs every time).

``generator`` is one ``torch.Generator`` for the whole batch, or one per prompt (``len(prompts)`` of them): then
each group's samples depend only on its own generator, not on which other prompts share the batch, so a batch
split over several processes samples exactly what one process sampling the whole batch does.

A completion ends at the first EOS (kept and counted in the mask, as TRL does) or at the end of the first stop
string (kept); ``truncated`` marks rows that hit ``max_new_tokens`` without either.

``token_logps`` computes log softmax(z / T)[token] of the completion tokens for concat(prompt, completion),
only projecting the completion positions (``logits_to_keep``), micro-batched, optionally with the entropy. Each
micro-batch drops the prompt columns that are padding in all its rows and the completion columns past its longest
completion (those positions get log-prob 0; they are masked everywhere), so its values depend on its own rows only.
Position ids (``position_ids=``, config ``rollout.position_ids``): ``"mask"`` (default) numbers the real tokens
from 0 (a left-padded row starts at 0 at its first real token), the positions the decode loop and HF ``generate``
use while sampling; ``"arange"`` is what TRL's ``GRPOTrainer`` passes (no ``position_ids``, so the model numbers
every column of the padded batch, and a left-padded row starts at its padding width). RoPE is relative, so the two
differ only by float rounding (~1e-6 in the log-probs); TRL-parity tests use ``"arange"``. Dropped all-padding
columns keep their place in the ``"arange"`` numbering, so trimming never changes a value.
``token_logps_grouped`` is the same computation with prefix sharing for rows that come in groups of G: each
prompt runs once and its KV cache (with autograd) is repeated G times, so the training forward/backward covers
``N_prompts * P + B * C`` positions instead of ``B * (P + C)``; the trainer uses it by default.
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Sequence, Union

import torch
from torch import Tensor

from transformers import StoppingCriteria

from flowalign.registry import check_choice

if TYPE_CHECKING:
    from flowalign.llm.vllm import VLLMEngine

ENGINES = ("cached", "hf", "vllm")
POSITION_IDS = ("mask", "arange")
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


@functools.cache
def _cache_kw() -> str:
    """Name of the KV-cache argument of a causal LM's ``forward`` and of its output field: ``cache`` in
    transformers >= 5.2x (``past_key_values`` is deprecated there: a FutureWarning on the argument, a logged warning
    on the output field), ``past_key_values`` before. Read off the output dataclass: cheap, no model module import."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def _cache_of(out):
    """The ``transformers.Cache`` (a ``DynamicCache``) of a forward output, under its current field name."""
    return out[_cache_kw()]


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
    cache = _cache_of(out)
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
                nxt = torch.searchsorted(cdf, uniforms[:, t:t + 1].contiguous(), right=True).squeeze(1).to(dev)
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
        out = model(input_ids=nxt[:, None], attention_mask=att, position_ids=pos, use_cache=True,
                    **{_cache_kw(): cache})
        cache, logits = _cache_of(out), out.logits[:, -1].float()
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
        from flowalign.llm.vllm import engine_for

        eng = vllm_engine
        if eng is None:
            eng = engine_for(model)
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


def _trim_left(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """Drop the leading columns that are padding in every row of this micro-batch (left padding); returns the
    trimmed ids and mask and the number of columns dropped.

    Same values (positions are computed as if nothing had been dropped), less work, and with ``"mask"`` positions
    a micro-batch's numbers no longer depend on how long the prompts of *other* rows in the batch are (so one
    process and several agree to float rounding of the sums).
    """
    real = mask.bool().any(0)
    if not bool(real.any()) or bool(real[0]):
        return ids, mask, 0
    first = int(real.int().argmax())
    return ids[:, first:], mask[:, first:], first


def _position_ids(mask: Tensor, kind: str, offset: int) -> Tensor:
    """``[B, L]`` positions of a (trimmed) left-padded batch: ``"mask"`` counts real tokens; ``"arange"`` numbers
    columns of the untrimmed batch (``offset`` = columns dropped on the left), as a forward without position ids."""
    if kind == "mask":
        return _positions(mask)
    check_choice("position_ids", kind, POSITION_IDS)
    return (offset + torch.arange(mask.shape[1], device=mask.device))[None].expand(mask.shape[0], -1)


def token_logps(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                temperature: float = 1.0, micro_batch: int | None = None, entropy: bool = False,
                position_ids: str = "mask") -> tuple[Tensor, Tensor | None]:
    """``log softmax(z_t / T)[o_t]`` for each completion token (``[B, C]``, fp32) and optionally the entropy.

    Teacher forcing over concat(prompt ``[B, P]``, completion ``[B, C]``); only the ``C`` completion positions are
    projected through the LM head (``logits_to_keep = C + 1``, last one dropped). Gradients flow when called under
    grad mode. ``position_ids``: ``"mask"`` or ``"arange"`` (TRL), see the module docstring.
    """
    B, C = completion_ids.shape
    T = temperature if temperature > 0 else 1.0
    bs = micro_batch or B
    lps, ents = [], []
    for s in range(0, B, bs):
        pi, pm, off = _trim_left(prompt_ids[s:s + bs], prompt_mask[s:s + bs])
        Cm = _used_len(completion_mask[s:s + bs])
        if Cm == 0:
            lps.append(completion_ids.new_zeros((len(pi), C), dtype=torch.float32))
            ents.append(lps[-1] if entropy else None)
            continue
        i = torch.cat([pi, completion_ids[s:s + bs, :Cm]], 1)
        a = torch.cat([pm, completion_mask[s:s + bs, :Cm]], 1)
        logits = model(input_ids=i, attention_mask=a, position_ids=_position_ids(a, position_ids, off),
                       logits_to_keep=Cm + 1).logits
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
                        micro_batch: int | None = None, entropy: bool = False,
                        position_ids: str = "mask") -> tuple[Tensor, Tensor | None]:
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
        pi, pm, off = _trim_left(prompt_ids[s:s + bs:G], prompt_mask[s:s + bs:G])
        Cm = _used_len(completion_mask[s:s + bs])
        if Cm == 0:
            lps.append(completion_ids.new_zeros((len(completion_mask[s:s + bs]), C), dtype=torch.float32))
            ents.append(lps[-1] if entropy else None)
            continue
        ci, cm = completion_ids[s:s + bs, :Cm], completion_mask[s:s + bs, :Cm]
        out = model(input_ids=pi, attention_mask=pm, position_ids=_position_ids(pm, position_ids, off),
                    use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1:].repeat_interleave(G, 0)  # predicts completion token 0
        logits = first
        if Cm > 1:
            cache = _cache_of(out)  # a transformers DynamicCache, with autograd
            cache.batch_repeat_interleave(G)
            pmr = pm.repeat_interleave(G, 0)
            # completion token t sits at prompt length + t ("mask") or untrimmed prompt width + t ("arange")
            start = pmr.sum(-1, keepdim=True) if position_ids == "mask" else torch.full_like(
                pmr[:, :1], off + pmr.shape[1])
            pos = start + torch.arange(Cm - 1, device=ci.device)[None]
            att = torch.cat([pmr, cm[:, :-1]], 1)
            rest = model(input_ids=ci[:, :-1], attention_mask=att, position_ids=pos, use_cache=True,
                         **{_cache_kw(): cache}).logits
            logits = torch.cat([first, rest], 1)
        lp, ent = _head_logps(logits, ci, T, entropy)
        lps.append(_pad_right(lp, C))
        ents.append(_pad_right(ent, C) if entropy else None)
    return torch.cat(lps), (torch.cat(ents) if entropy else None)
