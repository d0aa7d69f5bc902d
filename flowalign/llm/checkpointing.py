"""LLM trainer checkpoints through ``flowalign.checkpoint`` (the image trainer's crash-safe writer).

``<checkpoint.dir or output_dir/checkpoints>/checkpoint-<step:08d>/`` holds ``weights.safetensors`` (the trainable
weights: LoRA adapters or the whole model), ``optimizer.pt``, ``scheduler.pt``, ``rng_<rank>.pt`` (python /
numpy / torch RNGs of each process) and ``state.json``: the step, the prompt stream (its permutation, cursor and
epoch) and the prompt / group-shuffle generator states (base64, so the file stays readable), written last, and
``export/`` when ``checkpoint.export`` is on (``flowalign.llm.export``: save_pretrained + tokenizer + card). A
checkpoint is written to a temp dir and renamed into place; older ones (``checkpoint.keep_last``) and a re-saved
step are renamed aside before they are deleted, so a kill at any point leaves the previous complete checkpoint
(tests/test_llm_checkpoints.py). ``load`` continues the run bit-for-bit on CPU.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flowalign import checkpoint as ckpt

if TYPE_CHECKING:
    from flowalign.llm.trainer import LLMTrainer


def checkpoint_root(tr: "LLMTrainer") -> Path:
    """Where ``tr``'s checkpoints live: ``checkpoint.dir``, else ``<output_dir>/checkpoints``."""
    c = tr.cfg.checkpoint
    return Path(c.dir) if c.dir else Path(tr.cfg.output_dir) / "checkpoints"


def _pack(t: torch.Tensor) -> str:
    """A 1-D CPU tensor (generator state uint8, permutation int64) as base64 text."""
    return base64.b64encode(t.contiguous().cpu().numpy().tobytes()).decode("ascii")


def _unpack(s: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=dtype).clone()


def save(tr: "LLMTrainer") -> Path:
    """Write ``checkpoint-<step>`` collectively (every process calls it); returns its path."""
    state = {"step": tr.step, "world_size": tr.acc.num_processes, "lora": tr.lora, "pos": tr._pos,
             "epoch": tr._epoch, "perm": _pack(tr._perm.to(torch.int64)),
             "gen_prompts": _pack(tr.gen_prompts.get_state()), "gen_sample": _pack(tr.gen_sample.get_state()),
             "config": tr.cfg.to_dict()}
    weights = tr.trainable_state()
    return ckpt.save(checkpoint_root(tr), tr.step, weights=weights, optimizer=tr.opt.state_dict(),
                     scheduler=tr.sched.state_dict(), state=state, rank=tr.acc.process_index,
                     is_main=tr.acc.is_main_process, barrier=tr.acc.wait_for_everyone,
                     keep_last=tr.cfg.checkpoint.keep_last, extra=_exporter(tr, weights, state))


def _exporter(tr: "LLMTrainer", weights: dict[str, torch.Tensor], state: dict):
    """The ``extra`` writer of ``ckpt.save``: ``flowalign.llm.export.export_llm`` into ``<tmp>/export`` (RNGs
    left as they were), or None when ``checkpoint.export`` is off."""
    if not tr.cfg.checkpoint.export:
        return None
    from flowalign.export import EXPORT_DIR, export_failure_warns, rng_preserved
    from flowalign.llm.export import export_llm

    def write(tmp: Path) -> None:
        with rng_preserved(), export_failure_warns(tmp / EXPORT_DIR):
            export_llm(tmp / EXPORT_DIR, weights=weights, config=state["config"], state=state)

    return write


def load(tr: "LLMTrainer", path: str | Path) -> None:
    """Restore a checkpoint written by ``save`` into ``tr`` (weights, optimizer, scheduler, RNGs, prompt stream)."""
    data = ckpt.load(path, rank=tr.acc.process_index)
    st = data["state"]
    if bool(st["lora"]) != tr.lora:
        raise ValueError(f"checkpoint {path} has lora={st['lora']} but the config has lora={tr.lora}")
    tr.load_trainable_state(data["weights"])
    tr.opt.load_state_dict(data["optimizer"])
    tr.sched.load_state_dict(data["scheduler"])
    tr.step, tr._pos, tr._epoch = int(st["step"]), int(st["pos"]), int(st["epoch"])
    tr._perm = _unpack(st["perm"], torch.int64)
    tr.gen_prompts.set_state(_unpack(st["gen_prompts"], torch.uint8))
    tr.gen_sample.set_state(_unpack(st["gen_sample"], torch.uint8))
    if "rng" in data:
        ckpt.set_rng_state(data["rng"])
    if tr.acc.is_main_process:  # steps logged after this checkpoint are about to run again
        ckpt.truncate_log(tr.out / "metrics.jsonl", tr.step, key="step")


def resolve(resume: str, tr: "LLMTrainer") -> Path:
    """``"latest"`` -> the newest complete checkpoint of ``tr``'s run, else a checkpoint directory."""
    return ckpt.resolve(resume, checkpoint_root(tr))
