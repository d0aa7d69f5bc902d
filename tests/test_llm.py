"""LLM RLVR pieces: task/tokenizer, rollouts (left padding, groups, EOS/stop strings, log-prob consistency),
config validation, trainer mechanics (exact resume, LoRA reference, dynamic sampling, MC-GRPO pivots), CLI."""

from __future__ import annotations

import json

import pytest
import torch

from flowalign.llm.config import PRESETS, load
from flowalign.llm.model import load_model
from flowalign.llm.rollout import generate, token_logps
from flowalign.llm.task import ArithmeticTask, build_tokenizer, parse_answer
from flowalign.rewards.base import REWARDS


@pytest.fixture(scope="module")
def embedded():
    torch.set_num_threads(1)
    return load_model("embedded")


def test_task_splits_tokenizer_and_rewards():
    task = ArithmeticTask(seed=0)
    train, held = task.split("train"), task.split("heldout")
    assert len(held) == 1000 and len(train) == 9000
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    assert all(eval(e.prompt[:-1]) == e.answer for e in held[:50])  # noqa: S307 - "a+b" of digits only
    tok = build_tokenizer()
    enc = tok(["7+15=", "1+2="], padding=True)
    assert enc["input_ids"][1][:2] == [tok.pad_token_id] * 1 + [tok.bos_token_id]  # left padded, BOS first
    assert tok.decode(tok("37+45=<82>", add_special_tokens=False)["input_ids"]) == "37+45=<82>"
    ans, fmt = REWARDS.get("arith_answer")(), REWARDS.get("arith_format")()
    comps = ["<82>", "<83>", "82>", "<8 2>", ""]
    assert ans(completions=comps, answers=[82] * 5).tolist() == [1, 0, 1, 0, 0]
    assert fmt(completions=comps).tolist() == [1, 1, 0, 0, 0]
    assert parse_answer("<-3>") == -3 and parse_answer("x") is None
    with pytest.raises(ValueError, match="split='test' is not allowed"):
        task.split("test")


def test_generate_groups_padding_and_logprob_consistency(embedded):
    model, tok = embedded
    prompts = ["1+2=", "37+45=", "99+9="]
    ro = generate(model, tok, prompts, group_size=3, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert len(ro) == 9 and ro.prompts == [p for p in prompts for _ in range(3)]
    assert (ro.prompt_ids[:3, 0] == tok.pad_token_id).all() and (ro.prompt_mask[:3, :2] == 0).all()  # left pad
    assert (ro.prompt_ids[:, -1] == tok.convert_tokens_to_ids("=")).all()
    for i in range(9):  # a finished row ends with EOS inside its mask, nothing after it
        n = int(ro.completion_mask[i].sum())
        assert (ro.completion_ids[i, n:] == tok.pad_token_id).all()
        assert bool(ro.truncated[i]) == (ro.completion_ids[i, n - 1] != tok.eos_token_id)
    # the decode loop's KV-cached log-probs equal a teacher-forced pass (positions follow the left padding)
    lp, ent = token_logps(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask, entropy=True)
    m = ro.completion_mask.bool()
    assert (lp - ro.sampler_logps)[m].abs().max() < 1e-5
    assert (ent[m] > 0).all()
    lp3, _ = token_logps(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask, micro_batch=2)
    # micro-batches drop their own padding columns (other shapes than the full batch): float rounding only
    assert (lp3 - lp)[m].abs().max() < 1e-5
    again = generate(model, tok, prompts, group_size=3, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.completion_ids, ro.completion_ids)  # seeded: reproducible


def test_generate_engines_stop_strings_and_truncation(embedded):
    model, tok = embedded
    for engine in ("cached", "hf"):
        ro = generate(model, tok, ["12+30=", "5+77="], group_size=8, max_new_tokens=8, engine=engine,
                      stop_strings=[">"], generator=torch.Generator().manual_seed(1))
        stopped = 0
        for i, text in enumerate(ro.completions):  # every row ends at its first ">" (kept) or at EOS
            n = int(ro.lengths[i])
            ended_eos = int(ro.completion_ids[i, n - 1]) == tok.eos_token_id
            assert ">" not in text[:-1] and (text.endswith(">") or ended_eos or bool(ro.truncated[i]))
            stopped += text.endswith(">") and not ended_eos
        assert stopped >= 12  # most rows are "<sum>" and stop at ">" instead of emitting EOS
        short = generate(model, tok, ["12+30="], group_size=4, max_new_tokens=2, engine=engine,
                         generator=torch.Generator().manual_seed(1))
        assert short.truncated.all() and short.completion_mask.sum().item() == 8
        greedy = generate(model, tok, ["12+30="], group_size=1, max_new_tokens=8, temperature=0, engine=engine)
        assert greedy.completions == ["<42>"]  # the pretrained model knows the sum (its mode), T=1 is weak
    with pytest.raises(ValueError, match="engine='vlm' is not allowed"):
        generate(model, tok, ["1+1="], engine="vlm")


def test_config_presets_overrides_and_errors(tmp_path):
    from flowalign.config import ConfigError

    cfg = load("recipes/llm_dapo.yaml", ["algo.eps_high=0.3", "train.lr=1e-3"])
    assert cfg.algo.loss_agg_mode == "token-mean" and cfg.algo.dynamic_sampling and cfg.algo.eps_high == 0.3
    assert cfg.train.lr == 1e-3
    assert load(None, ["algo.preset=dr_grpo"]).algo.advantage == "no_std"
    assert set(PRESETS) == {"grpo", "dapo", "dr_grpo", "rloo", "reinforce_pp", "mc_grpo", "gdpo"}
    for bad, msg in [(["algo.loss_agg_mode=mean"], "algo.loss_agg_mode='mean' is not allowed"),
                     (["rollout.groupsize=4"], "unknown config key 'rollout.groupsize'"),
                     (["train.lr=fast"], "train.lr: expected float"),
                     (["algo.advantage=gdpo", "reward.weights={arith_answer: 1}"], "gdpo' needs at least two rewards")]:
        with pytest.raises(ConfigError, match=msg):
            load(None, bad)


def _cfg(tmp_path, *extra):
    return load("recipes/llm_grpo.yaml", [f"output_dir={tmp_path}", "rollout.prompts_per_step=4",
                                          "rollout.group_size=4", "train.batch_size=6", "eval.num_prompts=16",
                                          *extra])


def _grads(tr) -> dict:
    """The last step's (clipped) gradients, still held after the optimizer step."""
    return {n: p.grad.clone() for n, p in tr.policy.named_parameters() if p.grad is not None}


def _assert_close_grads(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    scale = max(g.abs().max().item() for g in a.values())
    assert scale > 0
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= rtol * scale, (worst, scale)


def test_exact_resume(tmp_path):
    from flowalign.llm.trainer import LLMTrainer

    a = LLMTrainer(_cfg(tmp_path / "a", "algo.num_iterations=2", "algo.mini_batches=2"))
    for _ in range(4):
        a.train_step()
    b = LLMTrainer(_cfg(tmp_path / "b", "algo.num_iterations=2", "algo.mini_batches=2"))
    b.train_step(), b.train_step()
    ck = b.save()
    b.train_step()  # logged past the checkpoint, then "killed"
    c = LLMTrainer(_cfg(tmp_path / "b", "algo.num_iterations=2", "algo.mini_batches=2"))
    c.resume(ck)
    c.train_step(), c.train_step()
    pa, pc = a.policy.state_dict(), c.policy.state_dict()
    assert c.step == 4 and all(torch.equal(pa[k], pc[k]) for k in pa)
    # resuming dropped step 3 of the killed run: each step is logged once, with the straight run's values
    logs = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"}
    assert [r["step"] for r in logs["b"]] == [r["step"] for r in logs["a"]] == [1, 2, 3, 4]
    assert [r["loss"] for r in logs["b"]] == [r["loss"] for r in logs["a"]]
    changed = LLMTrainer(_cfg(tmp_path / "d")).policy.state_dict()
    assert any(not torch.equal(pa[k], changed[k]) for k in pa)  # the 4 steps did change the weights


def test_lora_reference_and_trained_params(tmp_path):
    from flowalign.llm.trainer import LLMTrainer

    tr = LLMTrainer(_cfg(tmp_path, "model.lora.enabled=true", "algo.beta=0.04"))
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    m = tr.train_step()
    assert m["kl"] == pytest.approx(0.0, abs=1e-7)  # LoRA B starts at 0: policy == reference (adapters off)
    after = tr.policy.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all("lora_" in k for k in moved)
    m2 = tr.train_step()
    assert m2["kl"] > 0


def test_dynamic_sampling_and_mc_grpo_pivots(tmp_path):
    from flowalign.llm.trainer import LLMTrainer

    tr = LLMTrainer(_cfg(tmp_path / "dapo", "algo.preset=dapo"))
    ro, R, info = tr._collect()
    G = 4
    total = R @ torch.tensor(tr.weights)
    assert info["groups_kept"] == len(ro) // G >= 1
    assert (total.reshape(-1, G).std(1) > 0).all()  # every kept group is informative
    mc = LLMTrainer(_cfg(tmp_path / "mc", "algo.preset=mc_grpo", "algo.advantage_kwargs={scale: none}"))
    m = mc.train_step()
    assert m["tokens"] > 0
    ro, R, _ = mc._collect()
    assert len(ro) == 4 * 5  # G + 1 sampled per prompt


def test_cli_dispatches_llm_recipes(capsys):
    from flowalign.cli import main

    assert main(["train", "recipes/llm_grpo.yaml", "rollout.group_size=4", "--dry-run"]) == 0
    assert "group_size: 4" in capsys.readouterr().out
    assert main(["train", "recipes/llm_grpo.yaml", "algo.preset=ppo", "--dry-run"]) == 2


def test_prefix_shared_logps_match_full_pass(embedded):
    import copy

    from flowalign.llm.rollout import token_logps_grouped

    model, tok = embedded
    ro = generate(model, tok, ["1+2=", "37+45=", "99+9=", "5+50="], group_size=4, max_new_tokens=8,
                  generator=torch.Generator().manual_seed(3))
    a, b = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    args = (ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    lp, ent = token_logps(a, *args, entropy=True)
    lp2, ent2 = token_logps_grouped(b, *args, group_size=4, micro_batch=8, entropy=True)
    m = ro.completion_mask.bool()
    assert (lp - lp2)[m].abs().max() < 1e-5 and (ent - ent2)[m].abs().max() < 1e-5
    w = torch.randn(lp.shape, generator=torch.Generator().manual_seed(0)) * ro.completion_mask
    (lp * w).sum().backward()
    (lp2 * w).sum().backward()
    ga, gb = dict(a.named_parameters()), dict(b.named_parameters())
    worst = max((ga[n].grad - gb[n].grad).abs().max().item() for n in ga)
    assert worst < 1e-5 * max(ga[n].grad.abs().max().item() for n in ga)
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        token_logps_grouped(b, *args, group_size=4, micro_batch=6)


def test_zero_advantage_skip_is_exact(tmp_path, monkeypatch):
    from flowalign.llm.trainer import LLMTrainer

    def fake_score(self, ro, answers):  # groups 0 and 2 all-equal (A == 0), groups 1 and 3 mixed
        r = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 1]]).reshape(-1)
        return torch.stack([r, torch.zeros_like(r)], 1)

    monkeypatch.setattr(LLMTrainer, "score", fake_score)
    grads = []
    for skip in (True, False):
        tr = LLMTrainer(_cfg(tmp_path / str(skip), "algo.beta=0.0", f"train.skip_zero_advantage={skip}",
                             "train.batch_size=8"))
        m = tr.train_step()
        assert m["zero_adv_groups_skipped"] == (2 if skip else 0)
        grads.append(_grads(tr))
    _assert_close_grads(*grads)


def test_mask_truncated_and_gradient_checkpointing(tmp_path):
    from flowalign.llm.trainer import LLMTrainer

    # max_new_tokens=4 truncates most completions ("<82>" needs EOS as a 5th token); DAPO overlong filtering
    # removes exactly the truncated rows from the loss
    for mask in (True, False):
        tr = LLMTrainer(_cfg(tmp_path / str(mask), "rollout.max_new_tokens=4", f"algo.mask_truncated={mask}"))
        ro, R, _ = tr._collect()
        assert 0 < int(ro.truncated.sum()) < len(ro)
        tr.gen_sample.manual_seed(tr.cfg.seed * 1_000_003 + 7919)  # replay the same rollout inside train_step
        tr._pos = 0
        m = tr.train_step()
        finished = int(ro.completion_mask[~ro.truncated].sum())
        assert m["loss_tokens"] == (finished if mask else m["tokens"]) and m["tokens"] == int(ro.lengths.sum())
    # gradient checkpointing (full teacher-forced pass, no prefix sharing) trains to the same weights
    grads = []
    for gc in (False, True):
        tr = LLMTrainer(_cfg(tmp_path / f"gc{gc}", f"model.gradient_checkpointing={gc}", "algo.beta=0.0"))
        tr.train_step()
        grads.append(_grads(tr))
    _assert_close_grads(*grads)
