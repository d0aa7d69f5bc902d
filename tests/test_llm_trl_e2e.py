"""End-to-end parity with TRL 1.16's own ``GRPOTrainer``: one whole optimizer step of each trainer.

Both trainers start from the same tiny Llama (built offline from a config, saved once), see the same prompts (the
first draw of flowalign's prompt stream, given to TRL as its dataset in that order) and the same completions:
only sampling is replaced, by fixed token lists (TRL's ``_generate_single_turn`` and flowalign's decode loop
``rollout._generate_cached`` return them). Everything after sampling is each library's own code: rewards
(``arith_answer`` + 0.5 ``arith_format``) -> group advantages -> reference log-probs (beta > 0) -> the loss of
the step (accumulated over 1 or 2 micro-batches) -> gradients. The step loss and every parameter gradient must
agree to 1e-5 for TRL loss types grpo, bnpo, dr_grpo and dapo, beta 0 and 0.04, gradient accumulation 1 and 2.

The policy starts 0.02-Gaussian-perturbed away from the saved weights, which both trainers load as the reference
(TRL from the model path, flowalign as its copy at start), so the KL term and its gradient are not zero.

Conventions set on flowalign's side to TRL's: ``rollout.position_ids=arange``; ``train.batch_size`` = TRL's
per-device batch. TRL shuffles the rows of a generation batch before splitting it into accumulation micro-batches
(``shuffle_sequence_dict``), flowalign keeps groups whole and in order: that shuffle is replaced by the identity,
the one named deviation (it decides which rows share a bnpo normaliser; the other loss types do not depend on it).
"""

from __future__ import annotations

import pytest
import torch

from flowalign.llm.model import build_random_model
from flowalign.rewards.base import REWARDS
from tests.deps import require_module

require_module("trl", "pip install -e '.[dev]' (TRL is a dev/bench extra)", module_level=True)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NP, G, C = 4, 4, 6  # prompts per step, group size, max new tokens
B = NP * G
TRL_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "micro-token-mean", "dr_grpo": "seq-mean-token-sum-norm",
           "dapo": "token-mean"}


def _completions(answer: int, k: int) -> list[str]:
    """G completion texts for a prompt: group k mixes right/wrong/unformatted/truncated answers, group 1 is all
    equally rewarded (zero advantage), so the loss sees both, and lengths differ between groups."""
    s = answer
    trunc = (f"<{s}" + "99999")[:C]  # no EOS within C tokens: truncated
    return [
        [f"<{s}>", f"<{s + 1}>", f"{s}", trunc],
        [f"<{s + 1}>", f"<{s + 2}>", f"<{s + 3}>", f"<{s + 11}>"],
        [f"<{s}>", f"<{s}>", "<", f"<{s + 1}>"],
        [f"{s}", f"<{s}>", trunc, f"<{s}>"],
    ][k % 4]


def _token_lists(tok, answer: int, k: int) -> list[list[int]]:
    out = []
    for text in _completions(answer, k):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out.append(ids[:C] if len(ids) >= C else ids + [tok.eos_token_id])
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The saved tiny model and flowalign's first NP prompts (prompt, answer), drawn by a throwaway trainer."""
    from flowalign.llm.config import load
    from flowalign.llm.trainer import LLMTrainer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trl_e2e")
    model, tok = build_random_model(seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    probe = LLMTrainer(load(None, [f"model.path={root / 'model'}", f"output_dir={root / 'probe'}",
                                   f"rollout.prompts_per_step={NP}"]))
    exs, _ = probe._next_prompts(NP)
    return root, [(e.prompt, e.answer) for e in exs], tok


@torch.no_grad()
def _perturb(model) -> None:
    """The same deterministic weight noise on both trainers' policies (by parameter name)."""
    for i, (_, p) in enumerate(sorted(model.named_parameters(), key=lambda kv: kv[0])):
        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.02)


def _answer_reward(completions, answer, **_):
    return REWARDS.get("arith_answer")()(completions=completions, answers=list(answer)).tolist()


def _format_reward(completions, **_):
    return REWARDS.get("arith_format")()(completions=completions).tolist()


def _run_trl(root, prompts, tok, loss_type: str, beta: float, ga: int, monkeypatch) -> tuple[float, dict]:
    """One TRL optimizer step; returns the step loss (sum of its micro-batch losses) and the gradients."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer import grpo_trainer

    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    _perturb(model)  # TRL's reference is loaded from root / "model" (config._name_or_path)
    fixed = {p: _token_lists(tok, a, k) for k, (p, a) in enumerate(prompts)}
    seen: dict[str, int] = {}

    def fake_generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        out = []
        for ids in prompt_ids:  # one row per completion, prompts repeated G times (group-major)
            p = tok.decode(ids, skip_special_tokens=True)
            out.append(list(fixed[p][seen.get(p, 0)]))
            seen[p] = seen.get(p, 0) + 1
        return out, None

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", fake_generate)
    monkeypatch.setattr(grpo_trainer, "shuffle_sequence_dict", lambda d: d)
    cfg = GRPOConfig(output_dir=str(root / f"trl-{loss_type}-{beta}-{ga}"), per_device_train_batch_size=B // ga,
                     gradient_accumulation_steps=ga, num_generations=G, max_completion_length=C, bf16=False,
                     use_cpu=True, gradient_checkpointing=False, report_to=[], loss_type=loss_type, beta=beta,
                     max_steps=1, max_grad_norm=0.0, shuffle_dataset=False, save_strategy="no", logging_steps=1,
                     reward_weights=[1.0, 0.5], learning_rate=1e-6, disable_tqdm=True)
    ds = Dataset.from_dict({"prompt": [p for p, _ in prompts], "answer": [a for _, a in prompts]})
    grads: dict = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    tr = GRPOTrainer(model=model, reward_funcs=[_answer_reward, _format_reward], args=cfg, train_dataset=ds,
                     processing_class=tok, callbacks=[Grab()])
    losses: list[float] = []
    inner = tr.compute_loss

    def record(*a, **k):
        loss = inner(*a, **k)
        losses.append(loss.item())
        return loss

    tr.compute_loss = record
    tr.train()
    assert len(losses) == ga and sum(seen.values()) == B
    return sum(losses), grads


def _run_ours(root, prompts, tok, agg: str, beta: float, ga: int, monkeypatch) -> tuple[float, dict, dict]:
    from flowalign.llm import rollout
    from flowalign.llm.config import load
    from flowalign.llm.trainer import LLMTrainer

    fixed = {p: _token_lists(tok, a, k) for k, (p, a) in enumerate(prompts)}

    def fake_cached(model, tok_, prompts_, G_, max_new_tokens, *_):
        dev = next(model.parameters()).device
        enc = tok_(list(prompts_), return_tensors="pt", padding=True, padding_side="left")
        ids, mask = enc["input_ids"].repeat_interleave(G_, 0), enc["attention_mask"].repeat_interleave(G_, 0)
        rows = [fixed[p][j] for p in prompts_ for j in range(G_)]
        comp = torch.full((len(rows), max_new_tokens), tok_.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            comp[i, :len(r)] = torch.tensor(r)
        return rollout._postprocess(tok_, ids.to(dev), mask.to(dev), comp.to(dev),
                                    [p for p in prompts_ for _ in range(G_)], G_)

    monkeypatch.setattr(rollout, "_generate_cached", fake_cached)
    cfg = load(None, [f"model.path={root / 'model'}", f"output_dir={root / f'ours-{agg}-{beta}-{ga}'}",
                      f"rollout.prompts_per_step={NP}", f"rollout.group_size={G}", f"rollout.max_new_tokens={C}",
                      "rollout.position_ids=arange", f"train.batch_size={B // ga}", f"algo.loss_agg_mode={agg}",
                      f"algo.beta={beta}", "train.max_grad_norm=null"])
    tr = LLMTrainer(cfg)
    _perturb(tr.policy)  # the reference stays the copy of the saved weights made at start
    m = tr.train_step()
    assert m["tokens"] > 0
    grads = {n: p.grad.detach().clone() for n, p in tr.policy.named_parameters() if p.grad is not None}
    return m["loss"], grads, m


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_one_step_matches_trl_grpo_trainer(world, loss_type, beta, ga, monkeypatch):
    root, prompts, tok = world
    trl_loss, trl_grads = _run_trl(root, prompts, tok, loss_type, beta, ga, monkeypatch)
    # flowalign after TRL: accelerate's GradientState is a process-wide singleton, and the Accelerator built last
    # sets the accumulation steps that Accelerator.backward divides by (flowalign's: 1)
    loss, grads, m = _run_ours(root, prompts, tok, TRL_AGG[loss_type], beta, ga, monkeypatch)
    if beta:
        assert m["kl"] > 1e-3  # policy != reference: the KL term and its gradient are live
    assert m["zero_adv_groups_skipped"] == (0 if beta else 1)  # group 1 is all-equal: skipped when exact
    assert abs(loss - trl_loss) <= 1e-5, (loss, trl_loss)
    assert grads.keys() == trl_grads.keys() and grads
    scale = max(g.abs().max().item() for g in trl_grads.values())
    worst = max((grads[n] - trl_grads[n]).abs().max().item() for n in grads)
    print(f"e2e {loss_type} beta={beta} ga={ga}: loss {loss:.6f} vs {trl_loss:.6f}, max |dgrad| {worst:.1e} "
          f"(scale {scale:.1e})")
    assert scale > 1e-4 and worst <= 1e-5
