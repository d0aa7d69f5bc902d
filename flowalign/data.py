"""Inputs of training and evaluation: prompt lists and files, and the reward-callable contract.

``load_prompts`` is the one prompt loader of the trainer, the methods, eval, the doctor and the labeller
(``flowalign.config.load_prompts`` and ``flowalign.eval.load_prompts`` re-export it). A spec is

* a list of prompts (strings, or ``{"prompt": str, **metadata}`` records);
* a ``.txt`` file: one prompt per line; blank lines and lines starting with ``#`` are skipped;
* a ``.jsonl`` file: one ``{"prompt": str, **metadata}`` object (GenEval style) or one bare JSON string per line;
* a ``.csv`` file with a header row and a ``prompt`` column; the other columns are the metadata (strings);
* a ``datasets.Dataset`` (its ``prompt`` column; the other columns are the metadata);
* a spec ``{"dataset": name_or_path, "split": "train", "column": "prompt"}`` loaded with ``datasets``: a hub
  name or local dataset folder (``load_dataset``), a ``save_to_disk`` folder (``load_from_disk``) or a
  .json/.jsonl/.csv/.parquet file (``load_dataset(<format>, data_files=...)``).

Every problem is a ``ConfigError`` naming the config key (``sample.prompts``, ``eval.prompts``, ``--prompts``):
a missing file, a file without prompts, a CSV without a ``prompt`` column, an unknown suffix, a bad line.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Union

if TYPE_CHECKING:
    from torch import Tensor

#: what ``load_prompts`` accepts: a list of prompts / records, the path of a .txt, .jsonl or .csv file, a
#: ``datasets.Dataset`` or a ``{"dataset": ..., "split": ..., "column": ...}`` spec
PromptSpec = Union[Sequence[Union[str, dict]], str, os.PathLike, dict, Any]
PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv")


class RewardFn(Protocol):
    """What the trainer, the methods and eval call to score samples (``flowalign.rewards.Reward``, ``Compose``
    or a plain function): ``images`` float in [0, 1], ``B,C,H,W`` (video ``B,T,C,H,W``), one prompt and one
    metadata dict per row -> rewards ``[B]``."""

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor: ...


def _error(message: str) -> Exception:
    # imported here: flowalign.config re-exports load_prompts, so a module-level import would be circular
    from flowalign.config import ConfigError

    return ConfigError(message)


def _record(item: Any, where: str) -> tuple[str, dict]:
    """``(prompt, metadata)`` of a string or a ``{"prompt": str, ...}`` record."""
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        meta = dict(item)
        return meta.pop("prompt"), meta
    raise _error(f"{where}: expected a prompt string or an object with a 'prompt' string, got {item!r:.80}")


def _read_jsonl(path: Path, key: str) -> list[tuple[str, dict]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise _error(f"{key}: line {n} of {str(path)!r} is not JSON ({e.msg})") from None
        rows.append(_record(item, f"{key}: line {n} of {str(path)!r}"))
    return rows


def _read_csv(path: Path, key: str) -> list[tuple[str, dict]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "prompt" not in (reader.fieldnames or []):
            raise _error(f"{key}: {str(path)!r} has no 'prompt' column (header: {reader.fieldnames or 'none'})")
        rows = []
        for n, row in enumerate(reader, 2):  # line 1 is the header
            prompt = (row.pop("prompt") or "").strip()
            if not prompt:
                raise _error(f"{key}: line {n} of {str(path)!r} has an empty prompt")
            rows.append((prompt, {k: v for k, v in row.items() if k is not None}))
    return rows


_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_SPEC_KEYS = ("dataset", "split", "column", "name")


def is_hf_dataset(obj: Any) -> bool:
    """A ``datasets.Dataset`` / ``DatasetDict`` (checked by module name: ``datasets`` is imported only when used)."""
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "column_names")


def _from_dataset(ds: Any, column: str, key: str) -> list[tuple[str, dict]]:
    """Rows ``(prompt, metadata)`` of a ``datasets.Dataset``: ``column`` is the prompt, other columns metadata."""
    if not hasattr(ds, "features"):  # a DatasetDict: which split is ambiguous
        raise _error(f"{key}: got a DatasetDict with splits {sorted(ds)}; pick one (dataset['train']) or give "
                     f"{{dataset: ..., split: ...}}")
    if column not in ds.column_names:
        raise _error(f"{key}: the dataset has no {column!r} column (columns: {ds.column_names}); "
                     f"name the prompt column with {{dataset: ..., column: NAME}}")
    rows = []
    for n, row in enumerate(ds):
        prompt = row.pop(column)
        if not isinstance(prompt, str) or not prompt.strip():
            raise _error(f"{key}: row {n} of the dataset has no prompt in column {column!r} (got {prompt!r:.60})")
        rows.append((prompt.strip(), row))
    return rows


def _load_dataset_spec(spec: dict, key: str) -> list[tuple[str, dict]]:
    """Rows of a ``{dataset, split, column, name}`` spec, loaded with ``datasets`` (module docstring)."""
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown or not isinstance(spec.get("dataset"), str):
        raise _error(f"{key}: a dataset spec is {{dataset: name_or_path, split: train, column: prompt}}; "
                     f"got {spec!r:.120}" + (f" (unknown keys {unknown})" if unknown else ""))
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets ships with transformers' extras / trl
        raise _error(f"{key}: a dataset spec needs the `datasets` package (pip install datasets)") from None
    source, split = spec["dataset"], spec.get("split", "train")
    path = Path(source)
    try:
        if path.is_file():
            builder = _DATA_FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise _error(f"{key}: dataset file {source!r} has an unknown suffix {path.suffix!r}; "
                             f"use one of {', '.join(_DATA_FILE_BUILDERS)}")
            ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        elif (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(path))
            if hasattr(ds, "keys") and not hasattr(ds, "features"):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(source, spec.get("name"), split=split)
    except (OSError, ValueError, KeyError) as e:  # missing/offline hub dataset, bad split, unreadable file
        from flowalign.config import ConfigError

        if isinstance(e, ConfigError):
            raise
        raise _error(f"{key}: cannot load dataset {source!r} split {split!r}: {e}") from None
    return _from_dataset(ds, spec.get("column", "prompt"), key)


def load_prompts(spec: PromptSpec, key: str = "sample.prompts") -> tuple[list[str], list[dict]]:
    """``(prompts, metadata)`` (one metadata dict per prompt, ``{}`` when none) from a list, a .txt, .jsonl or
    .csv file, a ``datasets.Dataset`` or a dataset spec dict (module docstring). A list may be empty (offline
    methods sample no prompts); a file or a dataset may not."""
    if is_hf_dataset(spec) or isinstance(spec, dict):
        rows = _from_dataset(spec, "prompt", key) if is_hf_dataset(spec) else _load_dataset_spec(spec, key)
        if not rows:
            raise _error(f"{key}: the dataset holds no prompts")
        return [p for p, _ in rows], [m for _, m in rows]
    if not isinstance(spec, (str, os.PathLike)):
        if not isinstance(spec, Sequence):
            raise _error(f"{key}: give a list of prompts, a .txt/.jsonl/.csv path, a datasets.Dataset or a "
                         f"{{dataset: ..., split: ..., column: ...}} spec, got {type(spec).__name__}")
        rows = [_record(item, f"{key}[{i}]") for i, item in enumerate(spec)]
        return [p for p, _ in rows], [m for _, m in rows]
    path = Path(spec)
    if path.suffix not in PROMPT_SUFFIXES:
        raise _error(f"{key}={str(spec)!r}: unknown prompt file type {path.suffix or '(no suffix)'!r}; "
                     f"use {', '.join(PROMPT_SUFFIXES)} or a list of prompts")
    if not path.is_file():
        raise _error(f"{key}={str(spec)!r}: file not found (give a list of prompts or a .txt/.jsonl/.csv path)")
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path, key)
    elif path.suffix == ".csv":
        rows = _read_csv(path, key)
    else:
        lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        rows = [(line, {}) for line in lines if line and not line.startswith("#")]
    if not rows:
        raise _error(f"{key}={str(spec)!r}: the file holds no prompts")
    return [p for p, _ in rows], [m for _, m in rows]
