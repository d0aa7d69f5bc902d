"""The guides in ``docs/`` stay true to the code.

* every ```python block compiles and its top-level imports resolve (only the import statements run, via ``ast``);
* every ```yaml block parses to a mapping;
* ``docs/config_reference.md`` equals ``scripts/gen_config_reference.py``'s output (it cannot drift from the
  help text);
* every override in the flow_grpo migration table loads (validated, on the SD3.5 recipe) and sets its key, and
  every flow_grpo key the page promises is in the table;
* repository paths and relative links the guides name exist.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)

#: flow_grpo keys (config/base.py, config/grpo.py) the migration table must map
FLOW_GRPO_KEYS = [
    "sample.num_steps", "sample.eval_num_steps", "sample.guidance_scale", "sample.train_batch_size",
    "sample.num_image_per_prompt", "sample.num_batches_per_epoch", "sample.global_std", "sample.noise_level",
    "sample.sde_window_size", "sample.sde_window_range", "train.learning_rate", "train.clip_range",
    "train.adv_clip_max", "train.beta", "train.ema", "train.lora_path", "train.num_inner_epochs",
    "train.gradient_accumulation_steps", "train.timestep_fraction", "prompt_fn", "reward_fn", "resolution",
    "use_lora", "mixed_precision", "train.cfg", "num_epochs", "save_freq", "pretrained.model",
]
#: repository paths a guide names as hypothetical examples (a user's new file), not as files of this repository
EXAMPLE_PATHS = {"recipes/shapes_is_pg.yaml"}
#: files of flow_grpo's repository the migration page names (not files of this one)
FLOW_GRPO_PATHS = {"scripts/train_sd3.py"}


def blocks(lang: str) -> list[tuple[str, int, str]]:
    """``(file name, index, source)`` of every fenced block of ``lang`` in ``docs/*.md``."""
    out = []
    for path in GUIDES:
        found = [src for tag, src in FENCE.findall(path.read_text()) if tag == lang]
        out += [(path.name, i, src) for i, src in enumerate(found)]
    return out


def _ids(items: list[tuple[str, int, str]]) -> list[str]:
    return [f"{name}#{i}" for name, i, _ in items]


PYTHON, YAML = blocks("python"), blocks("yaml")


def test_the_guides_exist_and_hold_code():
    names = {p.name for p in GUIDES}
    assert {"adding_a_model.md", "adding_a_method.md", "adding_a_reward.md", "config_reference.md",
            "migration_from_flow_grpo.md"} <= names
    per_file = {n for n, _, _ in PYTHON}
    assert {"adding_a_model.md", "adding_a_method.md", "adding_a_reward.md"} <= per_file
    assert len(PYTHON) >= 10 and len(YAML) >= 6


@pytest.mark.parametrize("name,index,src", PYTHON, ids=_ids(PYTHON))
def test_python_block_compiles_and_its_imports_resolve(name, index, src):
    """The block is valid Python, and each top-level ``import`` / ``from ... import`` runs (a renamed module or
    attribute fails here). Only the import statements are executed: the rest may need a GPU or a checkpoint."""
    where = f"{name} python block {index}"
    code = compile(src, where, "exec")
    assert code is not None
    tree = ast.parse(src, where)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    namespace: dict = {}
    for node in imports:
        module = ast.Module(body=[node], type_ignores=[])
        exec(compile(module, f"{where}, line {node.lineno}", "exec"), namespace)  # noqa: S102 - our own docs
    for node in imports:  # every imported name is bound (``from m import x`` raised above if x is missing)
        for alias in node.names:
            assert (alias.asname or alias.name).split(".")[0] in namespace


@pytest.mark.parametrize("name,index,src", YAML, ids=_ids(YAML))
def test_yaml_block_parses(name, index, src):
    data = yaml.safe_load(src)
    assert isinstance(data, dict) and data, f"{name} yaml block {index} is not a mapping"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "scripts" / "gen_config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_reference_is_generated_from_the_help_text():
    """The committed page equals the generator's output: after changing a ``help_field``, run
    ``python scripts/gen_config_reference.py``."""
    from flowalign.config import describe
    from flowalign.methods import METHODS

    gen = _generator()
    text = gen.render()
    assert (DOCS / "config_reference.md").read_text() == text, \
        "docs/config_reference.md is stale: run python scripts/gen_config_reference.py"
    assert describe() in text  # the page holds the help text itself, every key of it
    for name in METHODS.names():
        assert f"### `{name}`" in text and METHODS.get(name).describe_options().strip() in text
    assert gen.main(["--check"]) == 0


def migration_rows() -> list[tuple[str, list[str]]]:
    """``(flow_grpo cell, [override, ...])`` of the config-key table of the migration page."""
    text = (DOCS / "migration_from_flow_grpo.md").read_text()
    section = text.split("## Config keys", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not line.startswith("|") or set(cells[0]) <= {"-"} or cells[0] == "flow_grpo key":
            continue
        rows.append((cells[0], re.findall(r"`([^`]+=[^`]*)`", cells[1])))
    return rows


def _lookup(cfg, key: str):
    """The value at dotted ``key`` of a Config: dataclass attributes, then dict items (``model.kwargs.height``)."""
    node = cfg
    for part in key.split("."):
        if isinstance(node, dict):
            assert part in node, f"{key}: {part!r} not set"
            node = node[part]
        else:
            assert hasattr(node, part), f"{key}: no config key {part!r}"
            node = getattr(node, part)
    return node


def test_migration_table_maps_every_flow_grpo_key_to_keys_that_load(monkeypatch):
    """Every override in the table loads and validates on top of the SD3.5 recipe (an unknown key, a wrong type or
    an option the schedule does not take raises ``ConfigError``) and ends up in the config; adapter kwargs are
    arguments of the adapter's ``__init__``."""
    from flowalign.adapter import get_adapter
    from flowalign.config import load_config, parse_overrides

    monkeypatch.chdir(ROOT)  # override paths are relative to the working directory
    rows = migration_rows()
    cells = " ".join(c for c, _ in rows)
    missing = [k for k in FLOW_GRPO_KEYS if f"`{k}`" not in cells]
    assert not missing, f"migration table lacks flow_grpo keys {missing}"
    assert len(rows) >= 30
    for flow_key, overrides in rows:
        assert overrides, f"row {flow_key}: no flowalign override"
        cfg = load_config("recipes/sd35_pickscore.yaml", overrides)
        for key, value in parse_overrides(overrides):
            got = _lookup(cfg, key)
            if isinstance(value, dict) and isinstance(got, dict):
                assert {k: got.get(k) for k in value} == value, (flow_key, key)
            else:
                assert got == value, (flow_key, key, got, value)
        for key in cfg.model.kwargs:
            params = inspect.signature(get_adapter(cfg.model.adapter).__init__).parameters
            assert key in params, f"model.kwargs.{key} is not an argument of the {cfg.model.adapter} adapter"


REPO_PATH = re.compile(r"`((?:flowalign|pipelines|rewards|recipes|scripts|tests|eval)/[\w./-]+\.(?:py|yaml|txt))`")
LINK = re.compile(r"\]\(([\w./-]+\.md)\)")


@pytest.mark.parametrize("path", GUIDES, ids=[p.name for p in GUIDES])
def test_paths_and_links_in_the_guides_exist(path):
    text = path.read_text()
    named = set(REPO_PATH.findall(text)) - EXAMPLE_PATHS - FLOW_GRPO_PATHS
    assert [p for p in sorted(named) if not (ROOT / p).is_file()] == []
    assert [ln for ln in LINK.findall(text) if not (path.parent / ln).is_file()] == []
