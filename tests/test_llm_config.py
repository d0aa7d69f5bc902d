"""The LLM config runs on the image trainer's config machinery: help on every key, image-side key names, renamed
keys that name their successor, unknown keys with a suggestion, and ``--help-config`` on an LLM recipe."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from flowalign import config as shared
from flowalign.llm import config as llm


def _fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f"{prefix}{f.name}", f
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], f"{prefix}{f.name}.")


def test_every_llm_key_has_help_and_the_shared_error_type():
    keys = dict(_fields(llm.LLMConfig))
    missing = [k for k, f in keys.items() if len(f.metadata.get("help", "")) < 10]
    assert not missing, missing
    assert len(keys) > 60
    for key in ("seed", "output_dir", "model.lora.rank", "model.lora.alpha", "reward.weights", "reward.kwargs",
                "train.lr", "train.betas", "train.max_grad_norm", "train.batch_size", "checkpoint.every",
                "checkpoint.keep_last", "eval.every"):  # the image trainer's names for the same things
        assert key in keys
    assert llm.ConfigError is shared.ConfigError
    from flowalign.llm.losses import KL_ESTIMATORS
    from flowalign.llm.rollout import ENGINES, POSITION_IDS

    hints = typing.get_type_hints(llm.RolloutCfg)
    assert typing.get_args(hints["engine"]) == ENGINES and typing.get_args(hints["position_ids"]) == POSITION_IDS
    assert typing.get_args(typing.get_type_hints(llm.AlgoCfg)["kl_estimator"]) == KL_ESTIMATORS


@pytest.mark.parametrize("override, new", [
    ("model.lora.r=4", "model.lora.rank"), ("optim.lr=1e-3", "train.lr"),
    ("optim.max_grad_norm=0", "train.max_grad_norm"), ("train.micro_batch=4", "train.batch_size"),
    ("train.save_every=5", "checkpoint.every"), ("train.eval_every=5", "eval.every"),
    ("train.eval_prompts=8", "eval.num_prompts"), ("rewards=[arith_answer]", "reward.weights"),
])
def test_renamed_keys_name_the_new_key(override, new):
    old = override.split("=")[0]
    with pytest.raises(shared.ConfigError, match=rf"^{old} was renamed: use {new}"):
        llm.load("recipes/llm_grpo.yaml", [override])


def test_old_recipe_layout_fails_naming_the_new_keys(tmp_path):
    data = yaml.safe_load(open("recipes/llm_grpo.yaml"))
    data.pop("reward")
    data["rewards"] = [{"name": "arith_answer", "weight": 1.0}]
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(shared.ConfigError, match=r"rewards was renamed: use reward\.weights \(a \{name: weight\}"):
        llm.load(path)


def test_unknown_keys_bad_values_and_reward_maps():
    with pytest.raises(shared.ConfigError, match=r"unknown config key 'train\.batchsize'\. Did you mean "
                                                 r"'train\.batch_size'\?"):
        llm.load(None, ["train.batchsize=4"])
    with pytest.raises(shared.ConfigError, match=r"rollout\.position_ids='arang' is not allowed\. Did you mean "
                                                 r"'arange'\?"):
        llm.load(None, ["rollout.position_ids=arang"])
    with pytest.raises(shared.ConfigError, match=r"algo\.preset='grp' is not allowed\. Did you mean 'grpo'\?"):
        llm.load(None, ["algo.preset=grp"])
    with pytest.raises(shared.ConfigError, match=r"algo\.advantage='gdpoo' is not allowed\. Did you mean 'gdpo'\?"):
        llm.load(None, ["algo.advantage=gdpoo"])
    with pytest.raises(shared.ConfigError, match=r"reward\.kwargs names \['x'\] that are not in reward\.weights"):
        llm.load(None, ["reward.kwargs={x: {a: 1}}"])
    with pytest.raises(shared.ConfigError, match=r"model\.lora\.rank: expected int, got str 'big'"):
        llm.load(None, ["model.lora.rank=big"])
    cfg = llm.load(None, ["reward.weights={arith_answer: 2, arith_format: 0.25}",
                          "reward.kwargs={arith_answer: {}}", "model.lora.rank=4", "train.max_grad_norm=null"])
    assert cfg.reward.weights == {"arith_answer": 2.0, "arith_format": 0.25} and cfg.model.lora.rank == 4
    assert cfg.train.max_grad_norm is None
    assert cfg.algo.loss_agg_mode == "seq-mean-token-mean" and cfg.algo.beta == 0.04  # the grpo preset


def test_help_config_on_an_llm_recipe_prints_the_llm_schema(capsys):
    from flowalign.cli import main

    assert main(["train", "--help-config", "recipes/llm_grpo.yaml"]) == 0
    out = capsys.readouterr().out
    assert "model.lora.rank (int, default 8): LoRA rank r" in out
    assert "reward.weights (dict[str, float]" in out and "rollout.position_ids ('mask' | 'arange'" in out
    assert "model.lora.r -> model.lora.rank" in out and "dapo: advantage='grpo'" in out
    assert "sample.kernel" not in out  # not the image schema
