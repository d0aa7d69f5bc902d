"""Every shipped recipe runs as shipped: `--dry-run` validates each one offline from any directory, the prompt
sets are ours (scripts/make_prompts.py, reproducible), paths resolve relative to the recipe, names resolve."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from flowalign.cli import main as cli_main
from flowalign.config import ConfigError, load_config
from flowalign.data import load_prompts
from flowalign.recipe_paths import find_recipe, list_recipes, model_status, recipes_dir, resolve_path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _make_prompts():
    spec = importlib.util.spec_from_file_location("make_prompts", ROOT / "scripts" / "make_prompts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_dry_run_every_recipe_as_shipped(recipe, tmp_path, monkeypatch, capsys):
    """`flowalign train NAME --dry-run` from an unrelated directory: valid, prompts found, model not loaded."""
    monkeypatch.chdir(tmp_path)  # paths must not depend on the working directory
    assert cli_main(["train", recipe.stem, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.strip(), "the resolved config is printed"
    if "kind: llm" in recipe.read_text():
        return
    cfg = load_config(recipe.stem)
    for key in ("sample.prompts", "eval.prompts"):
        value = getattr(getattr(cfg, key.split(".")[0]), "prompts")
        if isinstance(value, str):  # a shipped file, resolved to an absolute path inside recipes/prompts
            assert Path(value).is_file() and Path(value).parent == ROOT / "recipes" / "prompts", (key, value)
    if Path(cfg.model.path).exists():
        assert "local, found (not loaded by --dry-run)" in err
    else:
        assert "is a hub id: the model was NOT loaded" in err, err


def test_recipes_are_listed_and_resolve_by_name(capsys):
    assert recipes_dir().resolve() == (ROOT / "recipes").resolve()
    assert [p.name for p in list_recipes()] == [p.name for p in RECIPES] and len(RECIPES) >= 30
    assert find_recipe("sd35_pickscore") == find_recipe("sd35_pickscore.yaml") == recipes_dir() / "sd35_pickscore.yaml"
    assert cli_main(["recipes", "list"]) == 0
    out = capsys.readouterr().out
    assert all(re.search(rf"^{p.stem}\s", out, re.M) for p in RECIPES)
    with pytest.raises(ConfigError, match=r"Did you mean sd35_pickscore"):
        load_config("sd35_pickscor")
    assert cli_main(["train", "sd35_pickscor", "--dry-run"]) == 2


def test_paths_resolve_relative_to_the_recipe(tmp_path, monkeypatch):
    """Recipe-relative first; else kept when it exists relative to the cwd; absolute paths and overrides as given."""
    (tmp_path / "r" / "p").mkdir(parents=True)
    (tmp_path / "r" / "p" / "train.txt").write_text("a red cat\na blue dog\n")
    (tmp_path / "cwd_prompts.txt").write_text("a green cow\n")
    recipe = tmp_path / "r" / "x.yaml"
    recipe.write_text("model: {adapter: shapes, path: ../w}\nsample: {prompts: p/train.txt, prompts_per_round: 2, "
                      "group_size: 2, batch_size: 4}\neval: {prompts: cwd_prompts.txt}\n"
                      "reward: {weights: {redness: 1.0}}\n")
    (tmp_path / "w").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(recipe)
    assert cfg.sample.prompts == str(tmp_path / "r" / "p" / "train.txt")
    assert cfg.model.path == str(tmp_path / "w")
    assert cfg.eval.prompts == "cwd_prompts.txt"  # not next to the recipe, but in the working directory
    over = load_config(recipe, ["sample.prompts=cwd_prompts.txt"])  # overrides are relative to the cwd
    assert over.sample.prompts == "cwd_prompts.txt"
    # a datasets spec's local path resolves the same way
    recipe.write_text(recipe.read_text().replace("eval: {prompts: cwd_prompts.txt}",
                                                 "eval: {prompts: {dataset: p/data.csv, column: text}}"))
    (tmp_path / "r" / "p" / "data.csv").write_text("text,tag\na red cat,x\n")
    cfg = load_config(recipe)
    assert cfg.eval.prompts == {"dataset": str(tmp_path / "r" / "p" / "data.csv"), "column": "text"}
    assert load_prompts(cfg.eval.prompts) == (["a red cat"], [{"tag": "x"}])
    assert resolve_path(str(tmp_path / "w"), Path("/elsewhere")) == str(tmp_path / "w")
    assert resolve_path("org/model", tmp_path) == "org/model"


def test_model_status_for_dry_run(tmp_path):
    assert model_status(str(tmp_path))[0]
    ok, msg = model_status("stabilityai/stable-diffusion-3.5-medium")
    assert ok and "NOT loaded" in msg
    ok, msg = model_status("no/such/local/folder")
    assert not ok and "no such local folder" in msg


def test_prompt_sets_are_generated_by_our_script(tmp_path):
    """The shipped files are byte-equal to a fresh run of scripts/make_prompts.py; train and test are disjoint."""
    mp = _make_prompts()
    assert mp.main(["--out", str(tmp_path)]) == 0
    made = sorted(p.name for p in tmp_path.iterdir())
    for name in made:
        assert (tmp_path / name).read_bytes() == (ROOT / "recipes" / "prompts" / name).read_bytes(), name
    assert mp.main(["--check"]) == 0
    counts = {}
    for name in made:
        lines = (tmp_path / name).read_text().splitlines()
        counts[name] = len(lines)
        assert len(set(lines)) == len(lines), f"{name} has duplicates"
    assert counts["aesthetic_train.txt"] == counts["ocr_train.jsonl"] == counts["geneval_train.jsonl"] == 1000
    assert counts["styles_test.txt"] == counts["ocr_test.jsonl"] == 128 and counts["animals_simple.txt"] == 45
    for stem in ("aesthetic", "styles", "animals"):
        train = set((tmp_path / f"{stem}_train.txt").read_text().splitlines())
        test = set((tmp_path / f"{stem}_test.txt").read_text().splitlines())
        assert not train & test, stem
    for row in map(json.loads, (tmp_path / "ocr_train.jsonl").read_text().splitlines()):
        assert f'"{row["text"]}"' in row["prompt"]  # the OCR target is the quoted text
    tags = {json.loads(r)["tag"] for r in (tmp_path / "geneval_train.jsonl").read_text().splitlines()}
    assert tags == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}


def test_recipe_comments_cite_only_files_in_the_project():
    """A project path in a recipe comment (recipes/, flowalign/, scripts/, prompts/, ...) must exist."""
    prefixes = ("recipes/", "flowalign/", "scripts/", "prompts/", "pipelines/", "tests/", "docs/", "dataset/",
                "assets/", "../")
    for recipe in RECIPES:
        for n, line in enumerate(recipe.read_text().splitlines(), 1):
            comment = line.split("#", 1)[1] if "#" in line else ""
            for token in re.findall(r"[\w./+-]+\.(?:yaml|txt|jsonl|csv|py|md)\b", comment):
                if token.startswith(prefixes):
                    where = ROOT / "recipes" if token.startswith(("prompts/", "../")) else ROOT
                    assert (where / token).exists(), f"{recipe.name}:{n} cites {token}, not in the project"
