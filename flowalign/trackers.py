"""Experiment trackers (TensorBoard, W&B, ...) through accelerate, for both trainers.

Config (``log`` section of image and LLM recipes): ``trackers`` (accelerate ``LoggerType`` names), ``project``,
``run_name`` and ``init_kwargs`` (``{tracker: kwargs}``, passed to ``accelerator.init_trackers(project, config,
init_kwargs)``). ``check_installed`` runs at config load: a requested tracker whose package is missing stops the
run there with the ``pip install 'flowalign[<extra>]'`` to run (accelerate itself would only warn and drop it).

Besides scalars (``accelerator.log``), images go to each tracker's own API through ``accelerator.get_tracker(name,
unwrap=True)``: TensorBoard ``SummaryWriter.add_image`` (one grid ``[3, H, W]``, captions as a markdown table under
``<tag>/captions`` since TensorBoard images carry none), W&B ``wandb.Image(img, caption=...)`` per sample; texts
(LLM completions) as ``add_text`` / ``wandb.Table``.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence

import torch

# tracker -> (module that must import, pyproject extra that installs it)
PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "comet_ml": ("comet_ml", "comet_ml"),
    "aim": ("aim", "aim"), "mlflow": ("mlflow", "mlflow"), "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"), "swanlab": ("swanlab", "swanlab"), "trackio": ("trackio", "trackio"),
}
EXTRAS = {"tensorboard", "wandb"}  # the extras flowalign's pyproject declares


def check_installed(trackers: Sequence[str], key: str = "log.trackers") -> None:
    """Raise ``ConfigError`` for a requested tracker whose package does not import (names the package + extra)."""
    from flowalign.config import ConfigError

    for i, name in enumerate(trackers):
        module, extra = PACKAGES.get(str(name), (str(name), str(name)))
        if importlib.util.find_spec(module) is None:
            how = f"pip install 'flowalign[{extra}]'" if extra in EXTRAS else f"pip install {module}"
            raise ConfigError(f"{key}[{i}]={name!r} needs the {module!r} package, which is not installed: {how} "
                              f"(or drop {name!r} from {key})")


def log_with(log: Any, output_dir: str | os.PathLike) -> list | None:
    """``Accelerator(log_with=...)``: tracker names; TensorBoard with a ``run_name`` writes under
    ``<output_dir>/<project>/<run_name>`` (accelerate's default is ``<output_dir>/<project>``)."""
    if not log.trackers:
        return None
    from accelerate.tracking import TensorBoardTracker

    out: list = []
    for name in log.trackers:
        if name == "tensorboard" and log.run_name:
            out.append(TensorBoardTracker(f"{log.project}/{log.run_name}", str(output_dir),
                                          **dict(log.init_kwargs.get("tensorboard", {}))))
        else:
            out.append(name)
    return out


def start(acc: Any, log: Any, config: dict) -> None:
    """``acc.init_trackers(project, flat config, init_kwargs)``; ``run_name`` becomes W&B's ``name`` (and
    ``run_name`` of mlflow/aim ...) unless ``init_kwargs`` sets one."""
    if not log.trackers:
        return
    kwargs = copy.deepcopy(dict(log.init_kwargs))
    if log.run_name:
        for name in log.trackers:
            if name == "wandb":
                kwargs.setdefault("wandb", {}).setdefault("name", log.run_name)
            elif name in ("mlflow", "aim", "clearml"):
                kwargs.setdefault(name, {}).setdefault("run_name" if name != "clearml" else "task_name", log.run_name)
    kwargs.pop("tensorboard", None)  # already given to the TensorBoardTracker built in ``log_with`` (when run_name)
    if "tensorboard" in log.trackers and not log.run_name:
        kwargs["tensorboard"] = dict(log.init_kwargs.get("tensorboard", {}))
    acc.init_trackers(log.project, config=flat(config), init_kwargs=kwargs)


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": v}`` with str/int/float/bool/None values (what tracker hparams accept)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
        else:
            out[key] = str(v)
    return out


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) metrics record, ``/``-joined keys (``{"eval": {"accuracy": x}}`` ->
    ``eval/accuracy``); bools and strings are dropped."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def captions(prompts: Sequence[str], rewards: Sequence[float] | torch.Tensor | None) -> list[str]:
    """``"<prompt> | reward 0.1234"`` per sample (``rewards`` None: the prompt alone)."""
    if rewards is None:
        return [str(p) for p in prompts]
    r = rewards.tolist() if isinstance(rewards, torch.Tensor) else list(rewards)
    return [f"{p} | reward {float(v):.4f}" for p, v in zip(prompts, r)]


def _trackers(acc: Any) -> list[str]:
    return [t.name for t in getattr(acc, "trackers", [])] if acc.is_main_process else []


def log_images(acc: Any, tag: str, images: torch.Tensor, caps: Sequence[str] | None, step: int,
               limit: int = 16) -> None:
    """``images`` ``[B, C, H, W]`` (video ``[B, T, C, H, W]``: first frame) in [0, 1] to every image-capable tracker,
    one caption per image (default ``"sample i"``); main process only."""
    names = _trackers(acc)
    if not names or images is None:
        return
    x = (images[:, 0] if images.ndim == 5 else images)[:limit].detach().float().clamp(0, 1).cpu()
    caps = [str(c) for c in caps][: len(x)] if caps else []
    caps += [f"sample {i}" for i in range(len(caps), len(x))]
    if "tensorboard" in names:
        from torchvision.utils import make_grid

        w = acc.get_tracker("tensorboard", unwrap=True)
        w.add_image(tag, make_grid(x, nrow=min(8, len(x))), step)  # [3, H', W'] CHW grid
        w.add_text(f"{tag}/captions", "| # | caption |\n|---|---|\n" +
                   "\n".join(f"| {i} | {c} |" for i, c in enumerate(caps)), step)
        w.flush()
    if "wandb" in names:
        import wandb

        run = acc.get_tracker("wandb", unwrap=True)
        run.log({tag: [wandb.Image(img.permute(1, 2, 0).numpy(), caption=c) for img, c in zip(x, caps)]}, step=step)


def log_texts(acc: Any, tag: str, rows: Sequence[tuple[str, str, float]], step: int, limit: int = 8) -> None:
    """(prompt, completion, reward) rows (LLM samples): TensorBoard ``add_text`` markdown, W&B ``Table``."""
    names = _trackers(acc)
    rows = list(rows)[:limit]
    if not names or not rows:
        return
    if "tensorboard" in names:
        def cell(s: str) -> str:
            return str(s).replace("|", "\\|").replace("\n", " ")

        w = acc.get_tracker("tensorboard", unwrap=True)
        w.add_text(tag, "| prompt | completion | reward |\n|---|---|---|\n" +
                   "\n".join(f"| {cell(p)} | {cell(c)} | {r:.4f} |" for p, c, r in rows), step)
        w.flush()
    if "wandb" in names:
        import wandb

        acc.get_tracker("wandb", unwrap=True).log(
            {tag: wandb.Table(columns=["prompt", "completion", "reward"], data=[list(r) for r in rows])}, step=step)


def log_eval_grid(acc: Any, eval_dir: str | os.PathLike, step: int, limit: int = 16) -> None:
    """The eval images of one evaluation (``flowalign.eval``'s ``results.csv`` + PNGs under ``eval_dir``), captioned
    ``"<prompt> | <reward> <value>"`` (components joined), as the ``eval/images`` grid."""
    path = Path(eval_dir) / "results.csv"
    if not _trackers(acc) or not path.is_file():
        return
    import numpy as np
    from PIL import Image

    by_image: dict[str, list] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            img = row.get("image") or ""
            if img.endswith(".png") and (Path(eval_dir) / img).is_file():
                by_image.setdefault(img, [row["prompt"], []])[1].append(f"{row['reward']} {float(row['value']):.4f}")
    items = list(by_image.items())[:limit]
    if not items:
        return
    imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(Path(eval_dir) / k).convert("RGB"))).permute(2, 0, 1)
                        .float() / 255 for k, _ in items])  # [B, 3, H, W]
    log_images(acc, "eval/images", imgs, [f"{p} | {', '.join(r)}" for _, (p, r) in items], step, limit)
