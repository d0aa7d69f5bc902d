"""The vLLM rollout engine (``flowalign.llm.vllm.VLLMEngine``) against a fake ``vllm`` module.

vLLM needs a GPU and is not installed here, so these tests inject a small ``vllm`` module into ``sys.modules`` that
implements exactly the API surface the engine calls: ``vllm.LLM(model=..., dtype=..., seed=..., **kw)``,
``vllm.SamplingParams(n, temperature, top_p, top_k, max_tokens, stop, include_stop_str_in_output, logprobs, seed,
skip_special_tokens)``, ``LLM.generate(prompts, sampling_params, use_tqdm)`` returning request outputs whose
``.outputs[i]`` carry ``.token_ids``, ``.logprobs`` (one ``{token_id: Logprob}`` dict per token) and
``.finish_reason``, ``LLM.reset_prefix_cache()``, and the worker model's ``load_weights(iterable of (name, tensor))``
(in process at ``llm.llm_engine.model_executor.driver_worker.worker.model_runner.model``, or only through
``LLM.collective_rpc`` for the multiprocess variant). It is backed by the embedded tiny HF model with its own
uncached decode loop, so results are checkable: greedy token ids equal HF ``generate``'s, sampled log-probs equal
a teacher-forced pass, and the weights the engine holds equal the policy's after each optimizer step.

This checks the translation and weight-sync logic only; the real vLLM is untested in this repository.
"""

from __future__ import annotations

import copy
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from flowalign.llm.model import WEIGHTS_DIR, load_model
from flowalign.llm.rollout import generate, token_logps
from flowalign.llm.vllm import VLLMEngine, policy_weights_for_vllm


# ----------------------------------------------------------------------------------------------- the fake vllm
class _Logprob:
    def __init__(self, logprob: float) -> None:
        self.logprob, self.rank, self.decoded_token = logprob, None, None


class _SamplingParams:
    def __init__(self, n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=16, stop=None,
                 include_stop_str_in_output=False, logprobs=None, seed=None, skip_special_tokens=True) -> None:
        if not (top_k == -1 or top_k >= 1):  # vLLM 0.8: "top_k must be -1 (disable), or at least 1"
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {top_k}")
        if temperature == 0 and n > 1:  # older vLLM rejects n > 1 under greedy sampling
            raise ValueError("n must be 1 when using greedy sampling")
        self.__dict__.update(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                             stop=stop, include_stop_str_in_output=include_stop_str_in_output, logprobs=logprobs,
                             seed=seed, skip_special_tokens=skip_special_tokens)


class _WorkerModel:
    """The vLLM-side model: strict ``load_weights`` over HF checkpoint names (unknown names raise)."""

    def __init__(self, hf) -> None:
        self.hf = hf
        self.loads = 0

    @torch.no_grad()
    def load_weights(self, weights):
        sd = self.hf.state_dict()
        loaded = set()
        for name, w in weights:
            if name not in sd:
                raise KeyError(f"fake vLLM: unexpected weight {name!r}")
            sd[name].copy_(w)
            loaded.add(name)
        self.loads += 1
        return loaded


class _LLM:
    in_process = True  # False: only collective_rpc reaches the worker (vLLM V1 with multiprocessing)
    instances: list = []

    def __init__(self, model, dtype="auto", seed=0, **kwargs) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.init = dict(model=model, dtype=dtype, seed=seed, **kwargs)
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype), local_files_only=True).eval()
        self.tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(model=_WorkerModel(hf)))
        executor = SimpleNamespace(driver_worker=SimpleNamespace(worker=self.worker)) if self.in_process else None
        self.llm_engine = SimpleNamespace(model_executor=executor)
        self.calls: list = []
        self.prefix_resets = 0
        _LLM.instances.append(self)

    @property
    def model(self):
        return self.worker.model_runner.model.hf

    def collective_rpc(self, method, args=(), kwargs=None):
        return [method(self.worker, *args, **(kwargs or {}))]

    def reset_prefix_cache(self) -> bool:
        self.prefix_resets += 1
        return True

    @torch.no_grad()
    def _one(self, prompt_ids: list[int], sp: _SamplingParams, gen: torch.Generator | None):
        from flowalign.llm.rollout import _filter_logits

        ids, lps, reason = list(prompt_ids), [], "length"
        out_ids: list[int] = []
        for _ in range(sp.max_tokens):
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            raw = logits.log_softmax(-1)  # vLLM V1 default: raw log-probs (before temperature)
            if sp.temperature == 0:
                t = int(logits.argmax())
            else:
                z = _filter_logits((logits / sp.temperature)[None], max(sp.top_k, 0), sp.top_p)[0]
                t = int(torch.multinomial(z.softmax(-1), 1, generator=gen))
            ids.append(t)
            out_ids.append(t)
            lps.append({t: _Logprob(float(raw[t]))})
            if t == self.tok.eos_token_id:
                reason = "stop"
                break
            text = self.tok.decode(out_ids, skip_special_tokens=True)
            if sp.stop and any(text.endswith(s) for s in sp.stop):
                reason = "stop"
                break
        text = self.tok.decode(out_ids, skip_special_tokens=sp.skip_special_tokens)
        return SimpleNamespace(index=0, text=text, token_ids=out_ids, logprobs=lps if sp.logprobs is not None else None,
                               finish_reason=reason, cumulative_logprob=None)

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(sps) == len(prompts)
        self.calls.append((prompts, sps))
        outs = []
        for p, sp in zip(prompts, sps):
            gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
            comps = [self._one(p["prompt_token_ids"], sp, gen) for _ in range(sp.n)]
            for i, c in enumerate(comps):
                c.index = i
            outs.append(SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=comps, finished=True))
        return outs


@pytest.fixture()
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams, mod.__version__ = _LLM, _SamplingParams, "0.0-fake"
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored afterwards; the engine must not override
    _LLM.in_process = True
    _LLM.instances = []
    yield mod
    _LLM.in_process = True


@pytest.fixture(scope="module")
def embedded():
    torch.set_num_threads(1)
    return load_model("embedded")


def _hf_greedy(model, tok, prompt: str, max_new: int) -> list[int]:
    enc = tok([prompt], return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)[0, enc["input_ids"].shape[1]:].tolist()
    return out[:out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out


PROMPTS = ["12+30=", "5+77=", "1+2="]


def _weights_equal(llm: _LLM, model) -> bool:
    mine, theirs = policy_weights_for_vllm(model), llm.model.state_dict()
    return all(torch.equal(mine[k], theirs[k]) for k in theirs)


# ----------------------------------------------------------------------------------------------- tests
def test_vllm_greedy_matches_hf_generate_and_hf_engine(fake_vllm, embedded):
    model, tok = embedded
    eng = VLLMEngine(WEIGHTS_DIR, dtype="float32", seed=3, enforce_eager=True)
    llm = _LLM.instances[-1]
    assert llm.init["gpu_memory_utilization"] == 0.3 and llm.init["enforce_eager"] and llm.init["seed"] == 3
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"  # setdefault: a user's choice is kept
    eng.sync_weights(model)
    for max_new in (8, 2):
        ro = generate(model, tok, PROMPTS, group_size=2, max_new_tokens=max_new, temperature=0, engine="vllm",
                      vllm_engine=eng)
        sps = llm.calls[-1][1]
        assert [sp.n for sp in sps] == [1, 1, 1] and all(sp.temperature == 0 for sp in sps)  # greedy: 1, repeated
        assert [p["prompt_token_ids"] for p in llm.calls[-1][0]] == tok(PROMPTS)["input_ids"]  # BOS included
        assert len(ro) == 6 and ro.group_size == 2 and ro.prompts == [p for p in PROMPTS for _ in range(2)]
        for i, p in enumerate(ro.prompts):
            want = _hf_greedy(model, tok, p, max_new)
            n = int(ro.completion_mask[i].sum())
            assert ro.completion_ids[i, :n].tolist() == want
            assert (ro.completion_ids[i, n:] == tok.pad_token_id).all()
            assert bool(ro.truncated[i]) == (want[-1] != tok.eos_token_id)
        hf = generate(model, tok, PROMPTS, group_size=2, max_new_tokens=max_new, temperature=0, engine="hf")
        for f in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
            assert torch.equal(getattr(ro, f), getattr(hf, f)), f
        assert ro.completions == hf.completions
    assert ro.truncated.all()  # max_new_tokens=2 cuts "<42>"
    assert ro.completions[0] == "<4"


def test_vllm_sampling_params_logprobs_stop_strings_and_seeds(fake_vllm, embedded):
    model, tok = embedded
    eng = VLLMEngine(WEIGHTS_DIR)
    llm = _LLM.instances[-1]
    eng.sync_weights(model)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    ro = generate(model, tok, PROMPTS, group_size=4, max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0,
                  stop_strings=[">"], generator=gens, engine="vllm", vllm_engine=eng)
    sps = llm.calls[-1][1]
    assert all(sp.n == 4 and sp.max_tokens == 8 and sp.stop == [">"] and sp.include_stop_str_in_output
               and sp.logprobs == 0 and sp.top_k == -1 and sp.top_p == 1.0 for sp in sps)
    assert len({sp.seed for sp in sps}) == 3  # one seed per prompt, from that prompt's generator
    assert len(ro) == 12
    for i, text in enumerate(ro.completions):  # a row ends at its first ">" (kept), EOS, or the budget
        n = int(ro.lengths[i])
        ended_eos = int(ro.completion_ids[i, n - 1]) == tok.eos_token_id
        assert ">" not in text[:-1] and (text.endswith(">") or ended_eos or bool(ro.truncated[i]))
        assert bool(ro.truncated[i]) == (not text.endswith(">") and not ended_eos)
    # vLLM's per-token log-probs of the sampled tokens (T = 1: raw == processed) equal a teacher-forced pass
    lp, _ = token_logps(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    m = ro.completion_mask.bool()
    assert (lp - ro.sampler_logps)[m].abs().max() < 1e-5
    assert (ro.sampler_logps[~m] == 0).all()
    again = generate(model, tok, PROMPTS, group_size=4, max_new_tokens=8, stop_strings=[">"], engine="vllm",
                     generator=[torch.Generator().manual_seed(i) for i in range(3)], vllm_engine=eng)
    assert torch.equal(again.completion_ids, ro.completion_ids)  # seeded: reproducible
    one = generate(model, tok, PROMPTS, group_size=4, max_new_tokens=8, engine="vllm", vllm_engine=eng,
                   generator=torch.Generator().manual_seed(0), top_k=5, top_p=0.9)
    assert len(one) == 12 and all(sp.top_k == 5 and sp.top_p == 0.9 for sp in llm.calls[-1][1])


def _cfg(tmp_path, *extra):
    from flowalign.llm.config import load

    return load("recipes/llm_grpo.yaml", [f"output_dir={tmp_path}", "rollout.prompts_per_step=4",
                                          "rollout.group_size=4", "train.batch_size=8", "eval.num_prompts=8",
                                          "train.lr=3e-3", "rollout.engine=vllm",
                                          "rollout.vllm_kwargs={enforce_eager: true}", *extra])


@pytest.mark.parametrize("in_process", [True, False], ids=["model_runner", "collective_rpc"])
def test_trainer_syncs_new_weights_into_vllm_after_each_step(fake_vllm, tmp_path, in_process):
    from flowalign.llm.trainer import LLMTrainer

    _LLM.in_process = in_process
    tr = LLMTrainer(_cfg(tmp_path))
    llm = _LLM.instances[-1]
    assert llm.init["enforce_eager"] and llm.init["dtype"] == "float32"
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    for step in range(2):
        m = tr.train_step()
        assert m["vllm_weight_syncs"] == step + 1  # synced before this step's generation
        assert llm.prefix_resets == step + 1
    after = tr.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the steps changed the policy
    assert not _weights_equal(llm, tr.policy)  # the engine still holds the weights it generated step 2 with
    ev = tr.evaluate(n=6, temperature=0)  # the next generation syncs first: on-policy
    assert tr.vllm.syncs == 3 and _weights_equal(llm, tr.policy)
    assert ev["n"] == 6
    model, tok = tr.policy, tr.tok
    ro = tr._generate(PROMPTS, 1, 0.0, None)
    assert tr.vllm.syncs == 3  # no optimizer step since: no new sync
    for i, p in enumerate(PROMPTS):  # the engine decodes greedily with the *trained* weights
        n = int(ro.completion_mask[i].sum())
        assert ro.completion_ids[i, :n].tolist() == _hf_greedy(model, tok, p, tr.cfg.rollout.max_new_tokens)


def test_trainer_vllm_lora_weights_are_merged(fake_vllm, tmp_path):
    from flowalign.llm.trainer import LLMTrainer

    tr = LLMTrainer(_cfg(tmp_path, "model.lora.enabled=true", "train.lr=1e-2"))
    llm = _LLM.instances[-1]
    tr.train_step()
    tr.train_step()
    tr.evaluate(n=4)  # sync after the last step
    merged = copy.deepcopy(tr.policy).merge_and_unload().state_dict()
    theirs = llm.model.state_dict()
    assert merged.keys() == theirs.keys()  # plain HF names: no lora_* / base_layer keys reached vLLM
    worst = max((merged[k] - theirs[k]).abs().max().item() for k in merged)
    assert worst < 1e-6
    base = load_model("embedded")[0].state_dict()
    assert any(not torch.equal(base[k], theirs[k]) for k in base)  # the adapters' update did reach the engine


def test_vllm_default_engine_and_missing_package(fake_vllm, embedded, monkeypatch):
    model, tok = embedded
    m = copy.deepcopy(model)
    ro = generate(m, tok, PROMPTS[:1], group_size=1, max_new_tokens=8, temperature=0, engine="vllm")
    assert ro.completions == ["<42>"]
    llm = _LLM.instances[-1]
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(0.5)
    generate(m, tok, PROMPTS[:1], group_size=1, max_new_tokens=4, temperature=0, engine="vllm")
    assert _LLM.instances[-1] is llm and _weights_equal(llm, m)  # cached engine, re-synced on every call
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ValueError, match="needs the optional vllm package"):
        VLLMEngine(WEIGHTS_DIR)
