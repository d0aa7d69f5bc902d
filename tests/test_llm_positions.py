"""Position ids of the teacher-forced log-prob passes (``mask`` vs TRL's ``arange``) and the KV-cache API.

RoPE is relative, so the two conventions move log-probs by float rounding only (~1e-7 here): a tolerance on the
values cannot tell them apart. The tests therefore read the position ids the model receives (a forward pre-hook)
and compare them with each convention's definition on the *untrimmed* padded batch: ``arange`` = what the model
uses when no position ids are passed (TRL), column ``j`` of ``concat(prompt, completion)`` at position ``j``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from flowalign.llm.model import build_random_model
from flowalign.llm.rollout import generate, token_logps, token_logps_grouped

P, C, G = 7, 5, 2


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model, tok = build_random_model(seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    return model.eval(), tok


def _batch(tok):
    """4 rows (2 groups of G) whose prompts all carry >= 2 pad columns (so micro-batches trim them)."""
    g = torch.Generator().manual_seed(0)
    plen = torch.tensor([3, 3, 5, 5])
    ids = torch.randint(3, len(tok), (4, P), generator=g)[::G].repeat_interleave(G, 0)  # a group shares its prompt
    mask = (torch.arange(P)[None] >= P - plen[:, None]).long()
    ids = ids.masked_fill(mask == 0, tok.pad_token_id)
    comp = torch.randint(3, len(tok), (4, C), generator=g)
    cmask = (torch.arange(C)[None] < torch.tensor([5, 3, 4, 2])[:, None]).long()
    return ids, mask, comp.masked_fill(cmask == 0, tok.pad_token_id), cmask


def _capture(model):
    seen: list[torch.Tensor] = []

    def hook(_mod, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    return seen, model.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_arange_positions_are_trls_and_mask_positions_count_real_tokens(tiny):
    model, tok = tiny
    ids, mask, comp, cmask = _batch(tok)
    full = torch.cat([mask, cmask], 1)
    expect = {"arange": torch.arange(P + C).expand(4, -1), "mask": (full.cumsum(-1) - 1).clamp(min=0)}
    out = {}
    for kind in ("arange", "mask"):
        seen, h = _capture(model)
        try:
            with torch.no_grad():
                out[kind] = token_logps(model, ids, mask, comp, cmask, position_ids=kind)[0]
                grouped = token_logps_grouped(model, ids, mask, comp, cmask, group_size=G, position_ids=kind)[0]
        finally:
            h.remove()
        pos, prompt_pass, comp_pass = seen
        off = P - 5  # columns that are padding in every row: trimmed, their numbering kept
        real = full[:, off:].bool()
        assert pos.shape[1] == P + C - off
        assert torch.equal(pos[real], expect[kind][:, off:][real])
        # prefix sharing: the prompt once per group, then completion tokens 0..C-2 after the cache
        assert torch.equal(prompt_pass[mask[::G, off:].bool()], expect[kind][::G, off:P][mask[::G, off:].bool()])
        exp_comp = expect[kind][:, P:P + C - 1]
        assert torch.equal(comp_pass[cmask[:, :-1].bool()], exp_comp[cmask[:, :-1].bool()])
        m = cmask.bool()
        assert (grouped - out[kind])[m].abs().max() < 1e-5
    m = cmask.bool()
    assert not torch.equal(expect["arange"][:, P:][m], expect["mask"][:, P:][m])  # the conventions differ here
    # TRL's own forward (no position ids, untrimmed batch) gives the arange values
    with torch.no_grad():
        logits = model(input_ids=torch.cat([ids, comp], 1), attention_mask=full).logits[:, P - 1:-1]
    ref = logits.float().log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1)
    assert (out["arange"] - ref)[m].abs().max() < 1e-6
    assert (out["mask"] - out["arange"])[m].abs().max() < 1e-5  # RoPE is relative: rounding only
    with pytest.raises(ValueError, match="position_ids='left' is not allowed"):
        token_logps(model, ids, mask, comp, cmask, position_ids="left")


def test_kv_cache_goes_through_the_current_cache_api(tiny, monkeypatch):
    """No ``past_key_values`` deprecation (FutureWarning on the argument, logger warning on the output field)."""
    from transformers.utils import generic

    model, tok = tiny
    logged: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: logged.append(str(msg)))
    ids, mask, comp, cmask = _batch(tok)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        token_logps_grouped(model, ids, mask, comp, cmask, group_size=G)
        ro = generate(model, tok, ["1+2=", "37+45="], group_size=2, max_new_tokens=4,
                      generator=torch.Generator().manual_seed(0))
    assert len(ro) == 4 and int(ro.completion_mask.sum()) > 4  # the cached decode loop ran several steps
    bad = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not bad, bad
    assert not [m for m in logged if "past_key_values" in m], logged
