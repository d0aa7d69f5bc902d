"""Loss and gradient parity with TRL's GRPOTrainer (the installed TRL's own ``compute_loss``).

Same tiny Llama, same prompts/completions/masks/advantages/old and reference log-probs: our
``token_logps`` + ``policy_loss`` must give TRL's loss and every parameter gradient to 1e-5, for each TRL
``loss_type`` we map (grpo, bnpo, dr_grpo, dapo), with and without the k3 KL term, off-policy ratios that hit
both clip bounds, clip-higher, GSPO sequence ratios, and a step split into two accumulated micro-batches.
Log-probs use ``position_ids="arange"`` (TRL passes no position ids). tests/test_llm_trl_e2e.py runs both
trainers end to end.
"""

from __future__ import annotations

import copy

import pytest
import torch

from flowalign.llm.losses import policy_loss
from flowalign.llm.model import build_random_model
from flowalign.llm.rollout import token_logps
from tests.deps import require_module

require_module("trl", "pip install -e '.[dev]' (TRL is a dev/bench extra)", module_level=True)
import trl  # noqa: E402
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL passes the deprecated gradient_checkpointing

B, P, C, G = 8, 7, 6, 4
# TRL loss_type -> our aggregation
AGG = {"grpo": "seq-mean-token-mean", "bnpo": "micro-token-mean", "dr_grpo": "seq-mean-token-sum-norm",
       "dapo": "token-mean"}
POS = "arange"  # TRL's positions


def _batch(tok, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = len(tok)
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    plen = torch.randint(3, P + 1, (B,), generator=g)
    for i in range(B):  # left padding
        prompt_mask[i, : P - plen[i]] = 0
        prompt_ids[i, : P - plen[i]] = tok.pad_token_id
        prompt_ids[i, P - plen[i]] = tok.bos_token_id
    comp = torch.randint(3, V, (B, C), generator=g)
    clen = torch.randint(1, C + 1, (B,), generator=g)
    clen[0] = C  # one truncated row with no EOS
    cmask = (torch.arange(C)[None] < clen[:, None]).long()
    for i in range(1, B):
        comp[i, clen[i] - 1] = tok.eos_token_id
    comp = comp.masked_fill(cmask == 0, tok.pad_token_id)
    adv = torch.randn(B, generator=g)
    return prompt_ids, prompt_mask, comp, cmask, adv, g


def _trainer(model, tok, tmp_path, **kw):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=B, num_generations=G,
                     max_completion_length=C, bf16=False, use_cpu=True, gradient_checkpointing=False,
                     report_to=[], temperature=kw.pop("temperature", 1.0), **kw)
    ds = Dataset.from_dict({"prompt": ["1+2="] * B})
    return GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=cfg,
                       train_dataset=ds, processing_class=tok)


def _copies(base, tmp_path):
    """Two identical copies; TRL's copy is loaded from disk so that it can build its reference model."""
    from transformers import AutoModelForCausalLM

    base.save_pretrained(tmp_path / "model")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    return copy.deepcopy(base), theirs


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="bnpo"),
    dict(loss_type="dr_grpo"),
    dict(loss_type="dapo"),
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="dapo", beta=0.04, epsilon=0.2, epsilon_high=0.28),
    dict(loss_type="dr_grpo", beta=0.1, temperature=0.7),
    dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False, delta=1.1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_and_grad_parity_with_trl(case, tmp_path):
    torch.manual_seed(0)
    base, tok = build_random_model(seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    ours, theirs = _copies(base, tmp_path)
    case = dict(case)
    beta = case.get("beta", 0.0)
    temp = case.get("temperature", 1.0)
    tr = _trainer(theirs, tok, tmp_path, **case)
    tr.current_gradient_accumulation_steps = 1
    prompt_ids, prompt_mask, comp, cmask, adv, g = _batch(tok)

    with torch.no_grad():
        cur, _ = token_logps(base, prompt_ids, prompt_mask, comp, cmask, temperature=temp, position_ids=POS)
    # off-policy old log-probs: ratios spread over [e^-0.4, e^0.4] so both clip bounds are active
    old = cur + (torch.rand(B, C, generator=g) - 0.5) * 0.8
    ref = cur + torch.randn(B, C, generator=g) * 0.3

    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": comp,
              "completion_mask": cmask, "advantages": adv, "old_per_token_logps": old,
              "num_items_in_batch": cmask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    theirs.train()
    trl_loss = tr.compute_loss(theirs, inputs)
    trl_loss.backward()

    ours.train()
    logp, _ = token_logps(ours, prompt_ids, prompt_mask, comp, cmask, temperature=temp, position_ids=POS)
    out = policy_loss(
        logp, old, adv, cmask, agg=AGG[case["loss_type"]], eps_low=case.get("epsilon", 0.2),
        eps_high=case.get("epsilon_high"), delta=case.get("delta"),
        importance_sampling_level=case.get("importance_sampling_level", "token"),
        ref_logp=ref if beta else None, beta=beta, kl_ratio_correction=case.get("use_bias_correction_kl", True),
        norm=C,
    )
    out.loss.backward()

    assert out.metrics["clip_frac_low"] + out.metrics["clip_frac_high"] > 0 or "sequence" in str(case)
    assert abs(out.loss.item() - trl_loss.item()) <= 1e-5, (out.loss.item(), trl_loss.item())
    g_ours, g_trl = _grads(ours), _grads(theirs)
    assert g_ours.keys() == g_trl.keys() and len(g_ours) > 0
    worst = max((g_ours[n] - g_trl[n]).abs().max().item() for n in g_ours)
    scale = max(g.abs().max().item() for g in g_trl.values())
    assert scale > 1e-4  # a real gradient, not an all-zero one
    print(f"parity {case}: |dloss| {abs(out.loss.item() - trl_loss.item()):.1e}, max |dgrad| {worst:.1e}, "
          f"grad scale {scale:.1e}")
    assert worst <= 1e-5, f"max grad diff {worst:.2e} (grad scale {scale:.2e})"


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_accumulated_micro_batches_match_trl(loss_type, tmp_path):
    """A step of two micro-batches (TRL gradient_accumulation_steps=2) equals our step loss: step-level normalisers
    (grpo, dapo, dr_grpo), or each micro-batch's own token count over 2 windows (bnpo)."""
    base, tok = build_random_model(seed=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    ours, theirs = _copies(base, tmp_path)
    tr = _trainer(theirs, tok, tmp_path, loss_type=loss_type, gradient_accumulation_steps=2)
    tr.current_gradient_accumulation_steps = 2
    prompt_ids, prompt_mask, comp, cmask, adv, g = _batch(tok, seed=3)
    with torch.no_grad():
        cur, _ = token_logps(base, prompt_ids, prompt_mask, comp, cmask, position_ids=POS)
    old = cur + (torch.rand(B, C, generator=g) - 0.5) * 0.8
    theirs.train()
    total = 0.0
    for half in (slice(0, B // 2), slice(B // 2, B)):
        inputs = {"prompt_ids": prompt_ids[half], "prompt_mask": prompt_mask[half], "completion_ids": comp[half],
                  "completion_mask": cmask[half], "advantages": adv[half], "old_per_token_logps": old[half],
                  "num_items_in_batch": cmask.sum()}  # dapo: tokens of the whole generation batch
        loss = tr.compute_loss(theirs, inputs)
        loss.backward()
        total += loss.item()
    ours.train()
    ours_total = 0.0
    for half in (slice(0, B // 2), slice(B // 2, B)):  # our micro-batches with step-level normalisers
        logp, _ = token_logps(ours, prompt_ids[half], prompt_mask[half], comp[half], cmask[half], position_ids=POS)
        n_tok = float(cmask[half].sum()) if loss_type == "bnpo" else float(cmask.sum())
        out = policy_loss(logp, old[half], adv[half], cmask[half], agg=AGG[loss_type], norm=C,
                          num_seqs=B, num_tokens=n_tok, num_windows=2)
        out.loss.backward()
        ours_total += out.loss.item()
    assert abs(ours_total - total) <= 1e-5, (ours_total, total)
    g_ours, g_trl = _grads(ours), _grads(theirs)
    worst = max((g_ours[n] - g_trl[n]).abs().max().item() for n in g_ours)
    assert worst <= 1e-5
    if loss_type == "bnpo":  # the two halves hold different token counts: the step-level token mean (dapo) differs
        assert cmask[: B // 2].sum() != cmask[B // 2:].sum()
        assert abs(total - _step_token_mean(ours, prompt_ids, prompt_mask, comp, cmask, old, adv)) > 1e-4


def _step_token_mean(model, prompt_ids, prompt_mask, comp, cmask, old, adv) -> float:
    with torch.no_grad():
        logp, _ = token_logps(model, prompt_ids, prompt_mask, comp, cmask, position_ids=POS)
        return policy_loss(logp, old, adv, cmask, agg="token-mean").loss.item()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_prefix_shared_training_pass_matches_trl(loss_type, tmp_path):
    """The trainer's default path (each prompt run once per group) gives TRL's loss and gradients."""
    from flowalign.llm.rollout import token_logps_grouped

    base, tok = build_random_model(seed=2, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    ours, theirs = _copies(base, tmp_path)
    tr = _trainer(theirs, tok, tmp_path, loss_type=loss_type)
    tr.current_gradient_accumulation_steps = 1
    prompt_ids, prompt_mask, comp, cmask, adv, g = _batch(tok, seed=5)
    prompt_ids = prompt_ids[::G].repeat_interleave(G, 0)  # groups of G rows share one prompt
    prompt_mask = prompt_mask[::G].repeat_interleave(G, 0)
    with torch.no_grad():
        cur, _ = token_logps(base, prompt_ids, prompt_mask, comp, cmask, position_ids=POS)
    old = cur + (torch.rand(B, C, generator=g) - 0.5) * 0.8
    theirs.train()
    loss = tr.compute_loss(theirs, {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": comp,
                                    "completion_mask": cmask, "advantages": adv, "old_per_token_logps": old,
                                    "num_items_in_batch": cmask.sum()})
    loss.backward()
    ours.train()
    logp, _ = token_logps_grouped(ours, prompt_ids, prompt_mask, comp, cmask, group_size=G, position_ids=POS)
    out = policy_loss(logp, old, adv, cmask, agg=AGG[loss_type])
    out.loss.backward()
    assert abs(out.loss.item() - loss.item()) <= 1e-5
    g_ours, g_trl = _grads(ours), _grads(theirs)
    assert max((g_ours[n] - g_trl[n]).abs().max().item() for n in g_ours) <= 1e-5
