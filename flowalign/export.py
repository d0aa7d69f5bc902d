"""Exports of trained weights in the ecosystem's own formats, so plain diffusers / peft / transformers load them.

A flowalign checkpoint (``flowalign.checkpoint``) holds the trainable tensors by parameter name plus optimizer,
EMA and RNG state: a resume format, not a model. ``export`` writes next to it (``<checkpoint>/export/`` at every
checkpoint when ``checkpoint.export`` is on, or anywhere with ``flowalign export CKPT --out DIR``):

* LoRA (image): ``pytorch_lora_weights.safetensors`` written by the pipeline class's own ``save_lora_weights``
  (``transformer_lora_layers=`` / ``unet_lora_layers=``, keys from peft's ``get_peft_model_state_dict``) with
  the adapter's ``LoraConfig`` as ``*_lora_adapter_metadata``, so rank and alpha round-trip:
  ``pipe.load_lora_weights(DIR)``. The same folder is a peft adapter: ``adapter_config.json`` (peft's
  ``LoraConfig.save_pretrained``) and ``adapter_model.safetensors`` with the keys ``PeftModel.save_pretrained``
  writes (``base_model.model.<module>.lora_A.weight``): ``PeftModel.from_pretrained(pipe.transformer, DIR)``.
* Full fine-tune (image): a ``save_pretrained`` folder of the denoiser (``config.json`` from the model's own
  ``save_config`` + ``diffusion_pytorch_model*.safetensors``, sharded with an index as diffusers does):
  ``<ModelClass>.from_pretrained(DIR)``.
* LLM: ``flowalign.llm.export`` (``save_pretrained`` + tokenizer; LoRA merged, the adapter in ``adapter/``).

Every export gets a model card ``README.md`` (base model, method, rewards, iterations and samples, the last eval
figures of the run's metrics, the command that reproduces it) and ``recipe.yaml`` (the checkpoint's stored
config, ``resume`` cleared). The EMA weights are exported when the checkpoint has them, unless ``ema=False``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from flowalign.trainer import Trainer

#: subfolder of a checkpoint that holds its exports
EXPORT_DIR = "export"
#: diffusers' own name for a LoRA weights file (``load_lora_weights`` picks it in a folder)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------------------------- LoRA
def lora_config(settings: dict[str, Any], base: str | None = None):
    """The peft ``LoraConfig`` of the trainer's LoRA ``settings`` (``flowalign.lora.lora_settings``: r, lora_alpha,
    target_modules, init_lora_weights, lora_dropout)."""
    from peft import LoraConfig

    return LoraConfig(**settings, base_model_name_or_path=base)


def peft_state_dict(module: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's ``get_peft_model_state_dict(module, state_dict=weights)``: the LoRA tensors of ``weights`` (trainer
    parameter names ``<m>.lora_A.default.weight``) under peft's saved names ``<m>.lora_A.weight``. ``module`` only
    lends its structure (``peft_config``), so FSDP-sharded or live modules are never read."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(module, state_dict=dict(weights), adapter_name="default")
    if not sd:
        raise ValueError("no LoRA tensors among the weights to export (names need 'lora_' and '.default.')")
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def denoiser_role(pipeline_class: type) -> str:
    """``"unet"`` or ``"transformer"``: the pipeline component flowalign trains, read off the keyword arguments of
    the class's ``save_lora_weights`` (``unet_lora_layers`` for SD1.5/SDXL, ``transformer_lora_layers`` else)."""
    params = inspect.signature(pipeline_class.save_lora_weights).parameters
    for role in ("transformer", "unet"):
        if f"{role}_lora_layers" in params:
            return role
    raise ValueError(f"{pipeline_class.__name__}.save_lora_weights takes neither transformer_lora_layers nor "
                     "unet_lora_layers")


def write_diffusers_lora(out: Path, pipeline_class: type, sd: dict[str, torch.Tensor], config) -> Path:
    """``pipeline_class.save_lora_weights(out, <role>_lora_layers=sd, <role>_lora_adapter_metadata=...)``."""
    role = denoiser_role(pipeline_class)
    kwargs: dict[str, Any] = {f"{role}_lora_layers": sd}
    if f"{role}_lora_adapter_metadata" in inspect.signature(pipeline_class.save_lora_weights).parameters:
        # without it load_lora_weights guesses alpha = rank (scale 1, not alpha / r)
        kwargs[f"{role}_lora_adapter_metadata"] = config.to_dict()
    pipeline_class.save_lora_weights(str(out), weight_name=LORA_WEIGHTS, **kwargs)
    return out / LORA_WEIGHTS


def write_peft_adapter(out: Path, sd: dict[str, torch.Tensor], config) -> Path:
    """A peft adapter folder: ``adapter_config.json`` (``LoraConfig.save_pretrained``) and
    ``adapter_model.safetensors`` keyed as ``PeftModel.save_pretrained`` keys them (``base_model.model.`` + the
    ``get_peft_model_state_dict`` name), so ``PeftModel.from_pretrained(module, out)`` loads it."""
    from safetensors.torch import save_file

    config.save_pretrained(str(out))
    save_file({f"base_model.model.{k}": v for k, v in sd.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return out / "adapter_config.json"


# ----------------------------------------------------------------------------------------------- full weights
def write_full(out: Path, module: nn.Module, weights: dict[str, torch.Tensor], max_shard_size: str = "10GB") -> Path:
    """A ``save_pretrained`` folder of ``module`` with its parameters taken from ``weights`` (whole tensors): the
    model's ``save_config`` (config.json) and its state dict (persistent buffers from ``module``) through
    huggingface_hub's ``save_torch_state_dict`` with diffusers' file names (``diffusion_pytorch_model.safetensors``,
    sharded with ``.index.json`` above ``max_shard_size``, as ``ModelMixin.save_pretrained``)."""
    from huggingface_hub import save_torch_state_dict

    missing = [n for n, _ in module.named_parameters() if n not in weights]
    if missing:
        raise ValueError(f"a full export needs every parameter in the weights; missing e.g. {missing[:3]}")
    sd = {k: v for k, v in module.state_dict().items() if k not in weights}  # persistent buffers
    sd.update(weights)
    sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}
    module.save_config(str(out))
    save_torch_state_dict(sd, str(out), filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size=max_shard_size)
    return out / "config.json"


# ----------------------------------------------------------------------------------------------- model card
def eval_figures(config: dict, upto: int, key: str = "iteration") -> dict[str, float]:
    """The last eval record at or before ``upto`` in the run's metrics JSONL (``log.jsonl`` or
    ``<output_dir>/metrics.jsonl``): image records without ``global_step``, LLM records' ``eval`` dict."""
    log = (config.get("log") or {}).get("jsonl") or str(Path(config.get("output_dir", ".")) / "metrics.jsonl")
    path, found = Path(log), {}
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get(key), int) or rec[key] > upto:
            continue
        ev = rec.get("eval") if isinstance(rec.get("eval"), dict) else (None if "global_step" in rec else rec)
        if ev:
            found = {k: v for k, v in ev.items() if isinstance(v, (int, float)) and k != key}
    return found


def write_card(out: Path, *, config: dict, base: str, kind: str, method: str, formats: list[str], progress: str,
               upto: int, usage: str, ema: bool | None) -> Path:
    """``README.md`` (Hugging Face model card with YAML front matter) and ``recipe.yaml`` (the stored config with
    ``resume`` cleared: ``flowalign train recipe.yaml`` reproduces the run)."""
    import yaml

    recipe = {k: v for k, v in config.items() if k != "resume"}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    rewards = (config.get("reward") or {}).get("weights") or {}
    upto_key = "step" if kind == "llm" else "iteration"
    figures = eval_figures(config, upto, upto_key)
    lib = "transformers" if kind == "llm" else "diffusers"
    # the hub's base_model field names a hub id; a local folder is named in the text only
    hub_id = not Path(base).exists() and not base.startswith((".", "/", "~"))
    lines = ["---", f"library_name: {lib}", *([f"base_model: {base}"] if hub_id else []), "tags:", "- flowalign",
             f"- {method}",
             *([f"- {f}" for f in formats]), "---", "",
             f"# {method} on {base}", "",
             f"Trained with flowalign ({kind} trainer).", "",
             f"- **Base model:** `{base}`",
             f"- **Method:** `{method}`",
             "- **Rewards (weight):** " + (", ".join(f"`{k}` ({v})" for k, v in rewards.items()) or "none"),
             f"- **Progress:** {progress}",
             f"- **Formats:** {', '.join(formats)}"]
    if ema is not None:
        lines.append(f"- **Weights:** {'EMA' if ema else 'raw (not the EMA)'}")
    lines += ["", "## Eval", ""]
    if figures:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.6g} |" for k, v in figures.items())]
    else:
        lines.append("No eval record in the run's metrics up to this checkpoint.")
    lines += ["", "## Use", "", "```python", usage.strip(), "```", "",
              "## Reproduce", "", "`recipe.yaml` is this run's config:", "", "```bash",
              "flowalign train recipe.yaml", "```", ""]
    (out / "README.md").write_text("\n".join(lines))
    return out / "README.md"


# ----------------------------------------------------------------------------------------------- image exports
def export_image(out: str | Path, *, module: nn.Module, weights: dict[str, torch.Tensor], config: dict,
                 state: dict, lora: dict[str, Any] | None, ema: bool | None = None,
                 pipeline_class: type | None = None) -> Path:
    """Write the exports of one image checkpoint into ``out`` (created; emptied first).

    ``module``: the denoiser (LoRA layers injected when ``lora``; only its structure and buffers are read);
    ``weights``: the trainable tensors to export by parameter name (raw or EMA); ``config``/``state``: the
    checkpoint's stored config and counters; ``ema``: which weights these are (for the card);
    ``pipeline_class``: the diffusers pipeline (default: that of the config's ``model.adapter``)."""
    from flowalign.adapter import get_adapter

    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    m = config["model"]
    pipeline_class = pipeline_class or get_adapter(m["adapter"]).pipeline_class
    if pipeline_class is None or not hasattr(pipeline_class, "save_lora_weights"):
        raise ValueError(f"adapter {m['adapter']!r} wraps no diffusers pipeline with LoRA support: nothing to "
                         "export to")
    role = denoiser_role(pipeline_class)
    progress = f"iteration {state.get('iteration')}, {state.get('samples')} samples, " \
               f"{state.get('global_step')} optimizer steps"
    if lora:
        cfg = lora_config(lora, base=m["path"])
        sd = peft_state_dict(module, weights)
        write_diffusers_lora(out, pipeline_class, sd, cfg)
        write_peft_adapter(out, sd, cfg)
        formats = ["diffusers-lora", "peft-lora"]
        usage = (f"from diffusers import {pipeline_class.__name__}\n\n"
                 f"pipe = {pipeline_class.__name__}.from_pretrained({m['path']!r})\n"
                 f"pipe.load_lora_weights(\"path/to/this/folder\")\n"
                 f"# or, with peft: PeftModel.from_pretrained(pipe.{role}, \"path/to/this/folder\")")
    else:
        write_full(out, module, weights)
        formats = ["diffusers-model"]
        cls = type(module).__name__
        usage = (f"from diffusers import {cls}, {pipeline_class.__name__}\n\n"
                 f"{role} = {cls}.from_pretrained(\"path/to/this/folder\")\n"
                 f"pipe = {pipeline_class.__name__}.from_pretrained({m['path']!r}, {role}={role})")
    write_card(out, config=config, base=m["path"], kind="image", method=config["train"]["method"],
               formats=formats, progress=progress, upto=int(state.get("iteration") or 0), usage=usage, ema=ema)
    return out


def load_denoiser(config: dict) -> nn.Module:
    """The denoiser of the checkpoint's base pipeline (``model.path``), alone: the ``transformer`` / ``unet``
    component loaded with its own class's ``from_pretrained(path, subfolder=role)`` in ``model.dtype``."""
    import importlib

    from diffusers import DiffusionPipeline

    from flowalign.adapter import DTYPES, get_adapter

    m = config["model"]
    role = denoiser_role(get_adapter(m["adapter"]).pipeline_class)
    index = DiffusionPipeline.load_config(m["path"])
    lib, cls = index[role]
    kw = {k: v for k, v in (m.get("kwargs") or {}).items() if k in ("variant", "revision")}
    module = getattr(importlib.import_module(lib), cls).from_pretrained(m["path"], subfolder=role, **kw)
    dtype = DTYPES[m.get("dtype", "float32")]  # buffers as the trainer held them (parameters come from weights)
    return module if dtype == torch.float32 else module.to(dtype)


def export_checkpoint(ckpt_dir: str | Path, out: str | Path, ema: bool | None = None) -> Path:
    """``flowalign export``: the exports of a checkpoint folder (image or LLM, told apart by the stored config's
    ``kind``). ``ema``: None = the EMA weights when the checkpoint has them; True requires them; False = raw."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "state.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a flowalign checkpoint (no state.json)")
    state = json.loads((ckpt_dir / "state.json").read_text())
    config = state.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{ckpt_dir}/state.json holds no config: written by a flowalign too old to export")
    has_ema = (ckpt_dir / "ema.safetensors").is_file()
    if ema and not has_ema:
        raise ValueError(f"--ema: {ckpt_dir} has no ema.safetensors (ema.enabled was off)")
    use_ema = has_ema if ema is None else bool(ema)
    out = Path(out)
    earlier = (out / "recipe.yaml").is_file() and (out / "README.md").is_file()  # an earlier export: replaced
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not earlier) \
            or out.resolve() in (ckpt_dir.resolve(), *ckpt_dir.resolve().parents):
        raise ValueError(f"--out {out} exists and is not an earlier export (or holds the checkpoint): choose a new "
                         "folder")
    weights = load_file(str(ckpt_dir / ("ema.safetensors" if use_ema else "weights.safetensors")))
    if config.get("kind") == "llm":
        from flowalign.llm.export import export_llm

        return export_llm(out, weights=weights, config=config, state=state)
    module = load_denoiser(config)
    lora = state.get("lora")
    if lora:
        from flowalign.lora import apply_lora

        apply_lora(module, lora)
    return export_image(out, module=module, weights=weights, config=config, state=state, lora=lora,
                        ema=use_ema if has_ema else None)


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Global RNGs (python, numpy, torch, cuda) as they were: an export inside a checkpoint must not shift the
    run's random stream (checkpoints are saved with the RNG state after it)."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


@contextlib.contextmanager
def export_failure_warns(out: Path) -> Iterator[None]:
    """An export that fails inside a checkpoint save warns on stderr and is removed; the checkpoint (the resume
    state) is still written, and ``flowalign export`` can retry from it."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - a training run must not die for want of an export
        shutil.rmtree(out, ignore_errors=True)
        print(f"flowalign: warning: checkpoint export to {out} failed ({type(e).__name__}: {e}); the checkpoint "
              "is saved without it (retry with `flowalign export CKPT --out DIR`)", file=sys.stderr)


def image_checkpoint_export(trainer: "Trainer", weights: dict[str, torch.Tensor],
                            ema: dict[str, torch.Tensor] | None, state: dict) -> Callable[[Path], None] | None:
    """The ``extra`` writer ``flowalign.checkpoint.save`` runs in the temp dir: ``export_image`` of the trainer's
    module into ``<tmp>/export`` with the EMA weights when EMA is on (whole tensors, already gathered under FSDP).
    None when ``checkpoint.export`` is off or the adapter wraps no diffusers pipeline (the shapes toy)."""
    pipeline_class = getattr(trainer.adapter, "pipeline_class", None)
    if not trainer.cfg.checkpoint.export or pipeline_class is None or not hasattr(pipeline_class, "save_lora_weights"):
        return None
    chosen = weights if ema is None else ema

    def write(tmp: Path) -> None:
        with rng_preserved(), torch.no_grad(), export_failure_warns(tmp / EXPORT_DIR):
            export_image(tmp / EXPORT_DIR, module=trainer.module, weights=chosen, config=state["config"], state=state,
                         lora=trainer.lora, ema=None if ema is None else True, pipeline_class=pipeline_class)

    return write


def export_main(argv: Sequence[str] | None = None) -> int:
    """``flowalign export CKPT --out DIR [--ema|--no-ema]``."""
    p = argparse.ArgumentParser(prog="flowalign export", description=(
        "Write a checkpoint's weights in diffusers / peft / transformers formats with a model card."))
    p.add_argument("checkpoint", help="a checkpoint-<N> folder")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier export (replaced)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ema", dest="ema", action="store_true", default=None,
                   help="export the EMA weights (the default when the checkpoint has them)")
    g.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw (non-EMA) weights")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, ema=args.ema)
    except (FileNotFoundError, ValueError) as e:
        print(f"flowalign export: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0
