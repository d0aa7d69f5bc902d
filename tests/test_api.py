"""The TRL-style Python API: ``train(cfg, rewards=[fn, "name", Reward], prompts=...)``, ``Trainer`` likewise,
every prompt input (list, .txt, .jsonl, .csv, datasets.Dataset, {dataset, split, column}), and the README
example run exactly as written."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from flowalign.api import build_rewards, prepare, reward_items
from flowalign.config import ConfigError, load_config
from flowalign.data import load_prompts
from flowalign.rewards.base import Compose, FunctionReward, Reward, as_reward

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["max_iterations=1", "sample.prompts_per_round=2", "sample.group_size=4", "sample.batch_size=8",
         "train.updates_per_iteration=1", "checkpoint.every=0", "checkpoint.save_final=false"]


def brightness(images, prompts, metadata):
    """Mean pixel per image: [B, C, H, W] -> [B] (returned as a plain list, as a user's function may)."""
    return images.mean(dim=(1, 2, 3)).tolist()


class Darkness(Reward):
    name = "darkness"

    def score(self, inputs, prompts, metadata):
        return 1 - inputs.mean(dim=(1, 2, 3))


def test_as_reward_adapts_callables_names_and_objects():
    r = as_reward(brightness)
    assert isinstance(r, FunctionReward) and r.name == "brightness"
    x = torch.full((3, 3, 4, 4), 0.25)
    assert torch.allclose(r(x, ["a"] * 3), torch.full((3,), 0.25))
    assert as_reward(lambda i, p, m: i.mean(dim=(1, 2, 3))).name == "lambda"
    d = Darkness()
    assert as_reward(d) is d and as_reward("redness").name == "redness"
    with pytest.raises(ValueError, match="cannot use 3 as a reward"):
        as_reward(3)


def test_rewards_list_becomes_named_weighted_compose(tmp_path):
    def twin(images, prompts, metadata):
        return brightness(images, prompts, metadata)

    twin.__name__ = "brightness"  # a second reward of the same name is numbered, as Compose numbers it
    cfg, inline = prepare("shapes_flow_grpo", rewards={brightness: 2.0, "redness": 1.0, Darkness(): 0.5, twin: 1.0},
                          overrides=[f"output_dir={tmp_path}"])
    assert cfg.reward.weights == {"brightness": 2.0, "redness": 1.0, "darkness": 0.5, "brightness_2": 1.0}
    assert sorted(inline) == ["brightness", "brightness_2", "darkness"]
    reward = build_rewards(cfg, "cpu", inline)
    assert isinstance(reward, Compose) and list(reward.weights) == list(cfg.reward.weights)
    x = torch.rand(2, 3, 8, 8)
    total, parts = reward(x, ["a", "b"], [{}, {}], return_components=True)
    m = x.mean(dim=(1, 2, 3))
    red = (x[:, 0] - (x[:, 1] + x[:, 2]) / 2).mean(dim=(1, 2))
    assert torch.allclose(parts["darkness"], 1 - m) and torch.allclose(parts["redness"], red, atol=1e-6)
    assert torch.allclose(total, 2 * m + red + 0.5 * (1 - m) + m, atol=1e-6)
    assert [n for n, _, _ in reward_items(["pickscore", "pickscore"])] == ["pickscore", "pickscore_2"]


def test_reward_fn_without_weights_no_longer_fails(tmp_path):
    """Issue 18: Trainer(cfg, reward_fn=fn) failed with "reward.weights is empty"."""
    data = load_config("shapes_flow_grpo", validate=False).to_dict()
    data["reward"] = {"weights": {}, "kwargs": {}}
    cfg, inline = prepare(data, reward_fn=brightness)
    assert cfg.reward.weights == {"brightness": 1.0} and inline == {"brightness": brightness}
    with pytest.raises(ConfigError, match="reward.weights is empty"):
        prepare(data)


def test_prompt_inputs_every_form(tmp_path):
    import datasets  # a core dependency (pyproject)

    (tmp_path / "p.txt").write_text("# comment\na red circle\n\na blue square\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle", "tag": "x"}\n"a blue square"\n')
    (tmp_path / "p.csv").write_text("prompt,tag,count\na red circle,x,1\n\"a blue square, big\",y,2\n")
    want = ["a red circle", "a blue square"]
    assert load_prompts(["a red circle", {"prompt": "a blue square", "k": 1}]) == (want, [{}, {"k": 1}])
    assert load_prompts(str(tmp_path / "p.txt"))[0] == want
    assert load_prompts(tmp_path / "p.jsonl") == (want, [{"tag": "x"}, {}])
    assert load_prompts(tmp_path / "p.csv") == (["a red circle", "a blue square, big"],
                                               [{"tag": "x", "count": "1"}, {"tag": "y", "count": "2"}])
    ds = datasets.Dataset.from_dict({"text": ["a red circle", "a blue square"], "tag": ["x", "y"]})
    with pytest.raises(ConfigError, match="no 'prompt' column"):
        load_prompts(ds)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_prompts({"dataset": str(tmp_path / "saved"), "column": "text"}) == (want, [{"tag": "x"}, {"tag": "y"}])
    assert load_prompts({"dataset": str(tmp_path / "p.csv"), "split": "train"})[0][1] == "a blue square, big"
    with pytest.raises(ConfigError, match="unknown prompt file type '.parquet'"):
        load_prompts(tmp_path / "p.parquet")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_prompts({"dataset": "x", "colum": "text"})
    # through the API: a Dataset becomes records, a spec stays a spec, a bad suffix fails before any model loads
    cfg, _ = prepare("shapes_flow_grpo", prompts=datasets.Dataset.from_dict({"prompt": want, "tag": ["x", "y"]}))
    assert cfg.sample.prompts == [{"prompt": "a red circle", "tag": "x"}, {"prompt": "a blue square", "tag": "y"}]
    spec = {"dataset": str(tmp_path / "saved"), "column": "text"}
    assert prepare("shapes_flow_grpo", prompts=spec)[0].sample.prompts == spec
    with pytest.raises(ConfigError, match="unknown prompt file type"):
        prepare("shapes_flow_grpo", prompts="prompts.tsv")


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The <= 20-line README example, exec'd verbatim: one iteration on the shipped shapes model."""
    code = _readme_example()
    assert len(code.strip().splitlines()) <= 20
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the documented example itself
    history = scope["history"]
    assert len(history) == 1 and history[0]["iteration"] == 1 and history[0]["samples"] == 8
    rec = history[0]
    assert -1 <= rec["reward_red_minus_blue_mean"] <= 1 and 0 <= rec["reward_shapes_geneval_mean"] <= 2
    assert math.isclose(rec["reward_mean"], rec["reward_red_minus_blue_mean"] + rec["reward_shapes_geneval_mean"],
                        rel_tol=1e-5, abs_tol=1e-6)
    saved = (tmp_path / "outputs" / "api_example" / "config.yaml").read_text()
    assert "red_minus_blue: 1.0" in saved and "a red circle" in saved
    out = capsys.readouterr()
    printed = out.err + out.out
    assert "red_minus_blue x 1, shapes_geneval x 1" in printed and "kernel flow_sde, noise level 0.7" in printed
    assert "checkpoint saved to outputs/api_example/checkpoints/checkpoint-00000001" in printed
    assert "/10.0 min" in printed and "it=1/1" in printed  # the recipe's max_minutes: 10 is the bar's total
    logged = [json.loads(line) for line in (tmp_path / "outputs" / "api_example" / "metrics.jsonl").open()]
    assert logged[0]["reward_mean"] == rec["reward_mean"]


def test_trainer_takes_the_same_arguments(tmp_path):
    """``Trainer(recipe, rewards=..., prompts=..., overrides=...)``, and the issue's ``Trainer(cfg, reward_fn=fn)``
    with no reward.weights: both build a named Compose; the caller's Config is not modified."""
    from flowalign.trainer import Trainer

    tr = Trainer("shapes_flow_grpo", rewards={brightness: 0.5, Darkness(): 2.0}, prompts=["a red circle"] * 2,
                 overrides=[*SMALL, f"output_dir={tmp_path / 'a'}"])
    assert tr.cfg.reward.weights == {"brightness": 0.5, "darkness": 2.0}
    assert tr.method.round.prompts == ["a red circle"] * 2
    x = torch.rand(2, 3, 8, 8)
    total, parts = tr.reward_fn(x, ["a", "b"], [{}, {}], return_components=True)
    assert torch.allclose(total, 0.5 * x.mean(dim=(1, 2, 3)) + 2 * (1 - x.mean(dim=(1, 2, 3))), atol=1e-6)
    cfg = load_config("shapes_flow_grpo", [*SMALL, f"output_dir={tmp_path / 'b'}"], validate=False)
    cfg.reward.weights, cfg.reward.kwargs = {}, {}
    tr = Trainer(cfg, reward_fn=brightness)
    assert list(tr.reward_fn.weights) == ["brightness"] and cfg.reward.weights == {}
    assert "brightness x 1" in tr.summary()


def test_recipes_and_prompts_are_package_data():
    """pyproject installs recipes/ as flowalign.recipes with every recipe and prompt file as package data."""
    import fnmatch
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"]["flowalign.recipes"] == "recipes" and "flowalign.recipes" in tool["packages"]
    globs = tool["package-data"]["flowalign.recipes"]
    files = [p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".py"]
    assert len(files) >= 40
    for f in files:
        assert any(fnmatch.fnmatch(f, g) for g in globs), f"{f} is not installed"
