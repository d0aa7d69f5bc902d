"""Where recipes live and how the paths inside them resolve.

* **Shipped recipes** are the package ``flowalign.recipes`` (the repository's ``recipes/`` folder, installed with
  its ``*.yaml`` and ``prompts/*``); ``list_recipes()`` lists them and ``find_recipe("sd35_pickscore")`` turns a
  bare name into the file, so ``flowalign train sd35_pickscore`` works from any directory.
* **Paths inside a recipe** (``model.path``, ``model.lora.path``, ``sample.prompts``, ``eval.prompts``, and the
  ``dataset`` of a prompts spec ``{dataset: ..., split: ...}``) resolve
  relative to the recipe file: a relative ``prompts/aesthetic_train.txt`` in ``recipes/sd35_pickscore.yaml`` means
  ``recipes/prompts/aesthetic_train.txt`` whatever the working directory. For compatibility a relative path that
  does not exist next to the recipe but exists relative to the working directory is kept as written, and
  absolute paths, hub ids (``org/name``) and ``key=value`` overrides are never rewritten (overrides are relative
  to the working directory). Outputs (``output_dir``, ``train.method_options.pairs`` folders made by
  ``flowalign label sample``) are relative to the working directory.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

#: dotted keys of a recipe whose string value is an input path, resolved against the recipe's folder
PATH_KEYS = ("model.path", "model.lora.path", "sample.prompts", "eval.prompts")


def recipes_dir() -> Path:
    """The shipped recipes: package ``flowalign.recipes`` when installed, else the source tree's ``recipes/``."""
    try:
        from importlib.resources import files

        d = Path(str(files("flowalign.recipes")))
        if d.is_dir():
            return d
    except (ImportError, TypeError, ValueError):  # not installed as a package (an old editable install)
        pass
    import flowalign

    here = Path(flowalign.__file__).resolve().parent
    for d in (here / "recipes", here.parent / "recipes"):
        if d.is_dir():
            return d
    return here.parent / "recipes"


def list_recipes() -> list[Path]:
    """Every shipped ``*.yaml`` recipe, sorted by name."""
    return sorted(recipes_dir().glob("*.yaml"))


def find_recipe(source: str | os.PathLike) -> Path:
    """The recipe file ``source`` names: an existing path as given, else a shipped recipe by name (with or
    without ``.yaml``). Raises ``FileNotFoundError`` naming the closest shipped recipes."""
    path = Path(source)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent == Path("."):  # a bare name, not a path into some folder
        shipped = recipes_dir() / f"{name}.yaml"
        if shipped.is_file():
            return shipped
    names = [p.stem for p in list_recipes()]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise FileNotFoundError(f"recipe {str(source)!r} does not exist (neither a file nor a shipped recipe name).{hint} "
                            f"`flowalign recipes list` lists the {len(names)} shipped recipes")


def resolve_path(value: str, base: Path) -> str:
    """``value`` as the recipe in folder ``base`` means it (module docstring): next to the recipe if it exists
    there, else unchanged (absolute, relative to the working directory, a hub id, or missing)."""
    if not value or os.path.isabs(value) or value == "embedded":
        return value
    candidate = base / value
    if candidate.exists():
        return str(candidate.resolve())
    return value


def resolve_recipe_paths(data: dict, base: Path) -> dict:
    """Rewrite the ``PATH_KEYS`` string values of the recipe mapping ``data`` (in place) against ``base``."""
    for dotted in PATH_KEYS:
        node: Any = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            node[leaf] = resolve_path(node[leaf], base)
        elif isinstance(node, dict) and isinstance(node.get(leaf), dict) and isinstance(node[leaf].get("dataset"), str):
            node[leaf]["dataset"] = resolve_path(node[leaf]["dataset"], base)  # {dataset: ./local, split: ...}
    return data


def model_status(path: str) -> tuple[bool, str]:
    """``(ok, message)`` about ``model.path`` for ``flowalign train --dry-run``, without loading anything:
    a local folder is found (ok), a hub id ``org/name`` is reported as not loaded (ok; with whether the local
    Hugging Face cache holds it), anything else is a missing local path (not ok)."""
    import re

    if not path:
        return True, "model.path is empty: the adapter's default weights (not loaded by --dry-run)"
    if Path(path).exists():
        return True, f"model.path {path!r}: local, found (not loaded by --dry-run)"
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = isinstance(try_to_load_from_cache(path, "model_index.json"), str)
        except Exception:  # an old huggingface_hub or an odd cache: the note below is only informative
            cached = False
        where = ("found in the local Hugging Face cache" if cached else
                 "not in the local Hugging Face cache; from_pretrained downloads it at train time")
        return True, (f"model.path {path!r} is a hub id: the model was NOT loaded (--dry-run validates offline; "
                      f"{where})")
    return False, f"model.path {path!r}: no such local folder, and not a hub id (org/name)"
