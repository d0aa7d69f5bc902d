"""Typed config: recipes load, overrides parse, and bad configs fail at load with the key path."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from flowalign.config import Config, ConfigError, describe, load_config, load_prompts, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
IMAGE_RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if not p.name.startswith("llm_"))
# the shipped recipes read prompt files users download (flow_grpo's dataset/); tests give prompts inline
PROMPTS = ["sample.prompts=[a red cat, a blue dog]", "eval.prompts=[a cat]"]


def base(**sections) -> dict:
    d = {"model": {"adapter": "sd3", "path": "unused"},
         "sample": {"prompts": ["a", "b"], "prompts_per_round": 2, "group_size": 4, "batch_size": 4},
         "reward": {"weights": {"redness": 1.0}}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    return d


def test_shipped_image_recipes_exist():
    names = {p.name for p in IMAGE_RECIPES}
    assert {"sd35_pickscore.yaml", "sd35_ocr.yaml", "flux_pickscore.yaml", "wan_ocr.yaml"} <= names


@pytest.mark.parametrize("recipe", IMAGE_RECIPES, ids=lambda p: p.name)
def test_recipe_loads(recipe):
    overrides = PROMPTS if not recipe.name.startswith("shapes") else []
    cfg = load_config(recipe, overrides)
    assert cfg.global_batch % cfg.sample.batch_size == 0
    from flowalign.methods import METHODS

    assert cfg.train.method in METHODS


def test_paper_defaults_in_recipes():
    sd = load_config(ROOT / "recipes/sd35_pickscore.yaml", PROMPTS)
    assert (sd.sample.num_steps, sd.sample.group_size, sd.sample.prompts_per_round) == (10, 24, 48)
    assert (sd.sample.noise_level, sd.sample.guidance, sd.train.clip_range, sd.train.beta) == (0.7, 4.5, 1e-4, 0.01)
    assert sd.train.advantage.std == "global" and sd.ema.enabled and sd.ema.interval == 8
    ocr = load_config(ROOT / "recipes/sd35_ocr.yaml", PROMPTS)
    assert ocr.train.beta == 0.04
    flux = load_config(ROOT / "recipes/flux_pickscore.yaml", PROMPTS)
    assert (flux.sample.kernel, flux.sample.schedule, flux.train.clip_range) == ("cps", "window", 1e-5)
    assert flux.sample.schedule_options == {"size": 3, "lo": 0, "hi": 3}
    wan = load_config(ROOT / "recipes/wan_ocr.yaml", PROMPTS)
    assert (wan.train.lr, wan.train.clip_range, wan.train.beta, wan.sample.num_steps) == (1e-4, 1e-3, 0.004, 20)


def test_defaults_and_every_field_documented():
    cfg = load_config(base())
    assert (cfg.train.lr, cfg.train.clip_range, cfg.train.adv_clip_max, cfg.ema.decay) == (3e-4, 1e-4, 5.0, 0.9)

    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help string"
            if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Section")):
                walk(getattr(cfg_types, f.type) if isinstance(f.type, str) else f.type)

    import flowalign.config as cfg_types

    walk(Config)
    text = describe()
    assert "train.clip_range (float, default 0.0001)" in text and "sample.group_size" in text


def test_overrides_are_yaml_typed():
    assert parse_overrides(["train.lr=1e-4", "sample.prompts=[a, b]", "train.max_grad_norm=null",
                            "train.train_cfg=false"]) == [
        ("train.lr", 1e-4), ("sample.prompts", ["a", "b"]), ("train.max_grad_norm", None),
        ("train.train_cfg", False)]
    cfg = load_config(base(), ["train.lr=1e-4", "sample.group_size=2", "reward.weights.brightness=0.5",
                               "train.advantage.std=global"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.sample.group_size == 2
    assert cfg.reward.weights == {"redness": 1.0, "brightness": 0.5}
    assert cfg.train.advantage.std == "global"


def test_unknown_key_names_path_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.clip_rnage'.*Did you mean 'train\.clip_range'"):
        load_config(base(), ["train.clip_rnage=0.1"])
    with pytest.raises(ConfigError, match=r"'sampel'.*Did you mean 'sample'"):
        load_config(base(sampel={"group_size": 2}))
    with pytest.raises(ConfigError, match=r"'train\.advantage\.baselin'.*'train\.advantage\.baseline'"):
        load_config(base(), ["train.advantage.baselin=median"])


def test_wrong_type_names_path_and_type():
    with pytest.raises(ConfigError, match=r"sample\.group_size: expected int, got str 'eight'"):
        load_config(base(), ["sample.group_size=eight"])
    with pytest.raises(ConfigError, match=r"train\.train_cfg: expected bool"):
        load_config(base(), ["train.train_cfg=1"])
    with pytest.raises(ConfigError, match=r"train\.kl='gaussian' is not allowed.*Allowed: flow_grpo, exact"):
        load_config(base(), ["train.kl=gaussian"])
    with pytest.raises(ConfigError, match=r"model: expected a mapping"):
        load_config(base(model="sd3"))


def test_batch_geometry_errors():
    with pytest.raises(ConfigError, match=r"2 \* 3 = 6 rows per round must be a multiple of sample\.batch_size=4"):
        load_config(base(), ["sample.group_size=3"])
    with pytest.raises(ConfigError, match=r"same_noise needs sample\.batch_size \(4\).*group_size \(8\)"):
        load_config(base(), ["sample.group_size=8", "sample.same_noise=true"])
    with pytest.raises(ConfigError, match=r"sample\.group_size must be > 0"):
        load_config(base(), ["sample.group_size=0"])


def test_window_larger_than_steps():
    with pytest.raises(ConfigError, match=r"sample\.schedule='window'.*window size=6 must fit"):
        load_config(base(), ["sample.schedule=window", "sample.num_steps=4", "sample.schedule_options={size: 6}"])


def test_cross_field_errors():
    with pytest.raises(ConfigError, match=r"train_cfg=false .* set sample\.guidance=1\.0"):
        load_config(base(), ["train.train_cfg=false", "sample.guidance=4.5"])
    with pytest.raises(ConfigError, match=r"flow_grpo needs a stochastic kernel"):
        load_config(base(), ["sample.kernel=ode"])
    with pytest.raises(ConfigError, match=r"reward\.weights\.rednes: unknown reward 'rednes'.*'redness'"):
        load_config(base(reward={"weights": {"rednes": 1.0}}))
    with pytest.raises(ConfigError, match=r"reward\.kwargs names \['pickscore'\]"):
        load_config(base(reward={"kwargs": {"pickscore": {}}}))
    with pytest.raises(ConfigError, match=r"train\.method: unknown method 'flow_grp'"):
        load_config(base(), ["train.method=flow_grp"])
    with pytest.raises(ConfigError, match=r"model\.adapter: unknown adapter 'sd35'"):
        load_config(base(), ["model.adapter=sd35"])
    with pytest.raises(ConfigError, match=r"baseline='median' with std='global' is not supported"):
        load_config(base(), ["train.advantage.baseline=median", "train.advantage.std=global"])
    with pytest.raises(ConfigError, match=r"eval\.every > 0 needs eval\.prompts"):
        load_config(base(), ["eval.every=5"])
    with pytest.raises(ConfigError, match=r"sample\.prompts='missing\.txt': file not found"):
        load_config(base(), ["sample.prompts=missing.txt"])
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.method_options\.clip'"):
        load_config(base(), ["train.method_options={clip: 1}"])


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n a dog \n")
    assert load_prompts(str(txt)) == (["a cat", "a dog"], [{}, {}])
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "two cats", "tag": "counting"}) + "\n")
    assert load_prompts(str(jl)) == (["two cats"], [{"tag": "counting"}])
    cfg = load_config(base(), [f"sample.prompts={jl}"])
    assert cfg.sample.prompts == str(jl)


def test_help_config_lists_method_options(capsys):
    """``flowalign train --help-config [recipe]``: the schema plus method options (the recipe's method, or every
    method under its own heading); every method option has a help string; a typo'd option names a suggestion."""
    from flowalign.cli import train_main
    from flowalign.methods import METHODS

    for name in METHODS.names():
        opts = METHODS.get(name).Options
        missing = [f.name for f in dataclasses.fields(opts) if not f.metadata.get("help")]
        assert not missing, f"{name}: train.method_options without help: {missing}"
    assert train_main(["--help-config", str(ROOT / "recipes/shapes_refl.yaml")]) == 0
    out = capsys.readouterr().out
    assert "train.clip_range (float" in out and "# train.method_options of train.method=refl" in out
    assert "train.method_options.step_range (list[float], default [0.75, 1.0]): [lo, hi] fractions" in out
    assert "train.method_options.objective (" in out and "nested_scale" not in out  # refl's own, not leapalign's
    assert train_main(["--help-config"]) == 0
    out = capsys.readouterr().out
    for name in METHODS.names():
        assert f"# train.method_options of train.method={name}\n" in out
    assert "train.method_options.nested_scale (float, default 0.3): Scale a of the nested gradient" in out
    assert "train.method_options.label_app (str, default 'flowalign.labeling:LabelServer')" in out
    # a typo in method_options: ConfigError with the key path and a suggestion, at load and in --help-config
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.method_options\.step_rnge'.*Did you mean "
                                          r"'train\.method_options\.step_range'"):
        load_config(ROOT / "recipes/shapes_refl.yaml", ["train.method_options.step_rnge=[0.5, 1.0]"])
    assert train_main(["--help-config", str(ROOT / "recipes/shapes_refl.yaml"),
                       "train.method_options.step_rnge=[0.5, 1.0]"]) == 2
    assert "Did you mean 'train.method_options.step_range'" in capsys.readouterr().err
    # an LLM recipe gets the LLM trainer's schema, not the image one
    assert train_main(["--help-config", str(ROOT / "recipes/llm_grpo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "model.lora.enabled (bool" in out and "sample.group_size" not in out and "train.method_options" not in out
