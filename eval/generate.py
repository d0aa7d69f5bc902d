"""Deterministic, resumable generation and scoring of model variants.

Every variant (the base model and each LoRA checkpoint) samples the same ``(prompt, seed)`` grid with the
deterministic kernel (Euler ODE for flow models, DDIM eta=0 for epsilon models) through
``flowalign.rollout.sample``. The initial noise of pair ``(prompt, seed)`` is drawn by its own CPU generator,
``adapter.init_noise(1, torch.Generator().manual_seed(seed))``, so it is the same for every variant and every
batch split, and equals what ``pipe(prompt, generator=torch.Generator().manual_seed(seed))`` draws.

Images are quantised to 8 bits before scoring (``round(255 x) / 255``, the hand-off of every alignment repo), so
a score is a function of the saved PNG and a resumed run reproduces it exactly.

On disk (``out_dir``)::

    eval.json            this run's config, variants and fingerprints
    images.jsonl         one record per image of this run (prompt, seed, variant, image, poster, noise/pixel hashes)
    results.jsonl/.csv   tidy rows: prompt, seed, variant, reward, value, image (one per image x reward)
    images/<variant>/    <key>.png, or <key>.mp4 + <key>.poster.png for video; <key>.thumb.jpg when large
    cache/               append-only images.jsonl / scores.jsonl: a crashed run continues where it stopped

An image's ``key`` hashes everything that determines it: the variant's fingerprint (model spec, LoRA weights),
prompt, seed, steps, guidance and negative prompt. A cached image is not generated again, and a cached score not
recomputed; adding a reward scores the saved images (videos are generated again, since mp4 is lossy).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowalign.eval.media import (THUMB_SIZE, Appender, atomic_write, load_png, save_png, save_thumb, save_video,
                                  write_jsonl)
from flowalign.eval.models import Variant, adapter_fingerprint
from flowalign.rollout import sample
from flowalign.schedules import StepPlan

from flowalign.adapter import Adapter, deterministic_kernel
from flowalign.data import PROMPT_SUFFIXES, PromptSpec, load_prompts
from flowalign.rewards.base import Reward, get_reward

ROW_FIELDS = ("prompt", "prompt_idx", "seed", "variant", "reward", "value", "image", "key")


# --------------------------------------------------------------------------------------------- inputs
def parse_seeds(spec: "str | int | Iterable[int]") -> list[int]:
    """``"0-3"`` -> [0, 1, 2, 3]; ``"0,5,7-8"`` -> [0, 5, 7, 8]; an int n or a list passes through."""
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        seeds = [int(s) for s in spec]
    else:
        seeds = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise ValueError(f"seeds range {part!r} is empty: write low-high with low <= high")
                seeds.extend(range(lo, hi + 1))
            elif re.fullmatch(r"\d+", part):
                seeds.append(int(part))
            else:
                raise ValueError(f"seeds={spec!r}: expected non-negative integers and ranges like '0-3,7'")
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"seeds={spec!r} must be a non-empty list of distinct non-negative integers")
    return seeds


def as_prompt_records(prompts: "PromptSpec", key: str = "prompts") -> list[dict]:
    """``{"prompt": str, **metadata}`` records of a list (strings or records) or a .txt/.jsonl/.csv file
    (``flowalign.data.load_prompts``); ConfigError (a ValueError) naming ``key`` when there are none."""
    if isinstance(prompts, str) and Path(prompts).suffix not in PROMPT_SUFFIXES:
        prompts = [prompts]  # one prompt given as a bare string
    texts, meta = load_prompts(prompts, key)
    if not texts:
        raise ValueError("prompts must be a non-empty list of strings or {'prompt': str, ...} records")
    return [{"prompt": p, **m} for p, m in zip(texts, meta)]


# --------------------------------------------------------------------------------------------- noise
def initial_noise(adapter: Adapter, seeds: Sequence[int]) -> Tensor:
    """The initial latent of each seed, each drawn by its own ``torch.Generator().manual_seed(seed)`` (CPU, so it
    is the same on every device), concatenated: independent of batching and identical across variants."""
    return torch.cat([adapter.init_noise(1, torch.Generator().manual_seed(int(s))) for s in seeds])


class _FixedNoise:
    """Delegates to ``adapter`` but hands ``rollout.sample`` pre-drawn per-seed noise (it draws from one
    generator for the whole batch, which would tie an image to its batch position)."""

    def __init__(self, adapter: Adapter, noise: Tensor) -> None:
        self._adapter, self._noise = adapter, noise

    def init_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        if batch != self._noise.shape[0]:
            raise RuntimeError(f"sample asked for {batch} latents, {self._noise.shape[0]} were drawn")
        return self._noise

    def __getattr__(self, name: str):
        return getattr(self._adapter, name)


@torch.no_grad()
def generate_images(adapter: Adapter, prompts: Sequence[str], seeds: Sequence[int], num_steps: int = 40,
                    guidance: float = 1.0, negative_prompt: str = "") -> tuple[Tensor, Tensor]:
    """Deterministic samples for pairs ``(prompts[i], seeds[i])``: returns (images float [0,1], initial noise)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    noise = initial_noise(adapter, seeds)
    try:
        device = adapter.device
    except AttributeError:  # a module without .device (plain torch): its parameters' device
        device = next(adapter.trainable_module().parameters()).device
    noise = noise.to(device)
    none = torch.zeros(num_steps, dtype=torch.bool)  # no SDE step: every transition deterministic
    kernel, level = deterministic_kernel(adapter.prediction_type)
    traj = sample(_FixedNoise(adapter, noise), list(prompts), num_steps=num_steps, kernel=kernel, noise_level=level,
                  plan=StepPlan(sde=none, train=none.clone()), guidance=guidance,
                  negative_prompt=negative_prompt)
    return traj.images.float().clamp(0, 1).cpu(), noise.cpu()


def quantize(images: Tensor) -> Tensor:
    """float [0,1] -> uint8, ``round(255 x)`` (rewards/_image.py's hand-off)."""
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------- files
def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "variant"


# --------------------------------------------------------------------------------------------- results
@dataclass
class EvalResult:
    """What one evaluation produced: tidy ``rows`` (one per image x reward) and image ``records``."""

    rows: list[dict]
    records: list[dict]
    variants: list[str]
    rewards: list[str]
    out_dir: Path | None = None
    pixels: dict[str, Tensor] = field(default_factory=dict)  # key -> uint8 image/video, when out_dir is None
    timings: dict[str, float] = field(default_factory=dict)

    def means(self) -> dict[str, dict[str, float]]:
        """``{variant: {reward: mean}}``."""
        acc: dict[tuple[str, str], list[float]] = {}
        for r in self.rows:
            acc.setdefault((r["variant"], r["reward"]), []).append(float(r["value"]))
        out: dict[str, dict[str, float]] = {}
        for (v, k), vals in acc.items():
            out.setdefault(v, {})[k] = sum(vals) / len(vals)
        return out

    def log_dict(self, prefix: str = "eval") -> dict[str, float]:
        """Flat scalars for the trainer's JSONL log: ``{prefix}/{reward}`` (``{prefix}/{variant}/{reward}``
        when several variants)."""
        means = self.means()
        single = len(means) == 1
        return {(f"{prefix}/{k}" if single else f"{prefix}/{v}/{k}"): m for v, d in means.items() for k, m in d.items()}

    def images(self, variant: str | None = None) -> Tensor:
        """The uint8 images (in record order) of one variant, from memory or disk."""
        recs = [r for r in self.records if variant is None or r["variant"] == variant]
        return torch.stack([self.pixels[r["key"]] if r["key"] in self.pixels else load_png(self.out_dir / (
            r["poster"] if r.get("poster") else r["image"])) for r in recs])


def build_rewards(specs: "Sequence[str | Reward] | Mapping[str, Reward]",
                  kwargs: Mapping[str, dict] | None = None) -> dict[str, Reward]:
    """``{name: Reward}`` from registry specs (``flowalign.rewards``), ``module:attr`` strings or built rewards."""
    if isinstance(specs, Mapping):
        return dict(specs)
    out = {}
    for s in specs:
        r = get_reward(s, **(kwargs or {}).get(s, {})) if isinstance(s, str) else s
        name = s if isinstance(s, str) else r.name
        if name in out:
            raise ValueError(f"reward {name!r} is listed twice")
        out[name] = r
    return out


def _image_key(fingerprint: str, prompt: str, seed: int, num_steps: int, guidance: float, negative: str) -> str:
    return _sha([fingerprint, prompt, seed, num_steps, float(guidance), negative])[:24]


def run_eval(variants: "Sequence[Variant] | Mapping[str, Any]", prompts: "Sequence[str | dict] | str",
             seeds: "str | Sequence[int]", rewards: "Sequence[str | Reward] | Mapping[str, Reward]" = (), *,
             num_steps: int = 40, guidance: float = 1.0, negative_prompt: str = "", out_dir: str | Path | None = None,
             batch_size: int = 8, fps: int = 8, fingerprints: Mapping[str, str] | None = None,
             reward_kwargs: Mapping[str, dict] | None = None, progress: bool = True,
             extra_config: Mapping[str, Any] | None = None) -> EvalResult:
    """Generate and score every ``(variant, prompt, seed)``; resumable when ``out_dir`` is given.

    ``variants``: ``Variant`` objects, or a mapping ``name -> Adapter | zero-arg factory``. A ``Variant`` or a
    factory with a given fingerprint is loaded only when something is left to generate, so a finished eval
    reloads no model. ``fingerprints`` names the weights of mapping entries for the cache key; without one the
    trainable module's weights are hashed (which loads the model).
    """
    records_in = as_prompt_records(prompts)
    seeds = parse_seeds(seeds)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    reward_fns = build_rewards(rewards, reward_kwargs)
    if isinstance(variants, Mapping):
        sources = dict(variants)
        specs = {n: {"fingerprint": (fingerprints or {}).get(n)} for n in sources}
    else:
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be distinct, got {names}")
        sources = {v.name: v.load for v in variants}
        specs = {v.name: {"model": v.model, "lora": v.lora, "fingerprint": v.fingerprint()} for v in variants}
    if not sources:
        raise ValueError("variants must name at least one model")

    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        (out / "cache").mkdir(parents=True, exist_ok=True)
        img_cache, score_cache = Appender(out / "cache" / "images.jsonl"), Appender(out / "cache" / "scores.jsonl")
    else:
        img_cache = score_cache = None
    cached_imgs = {r["key"]: r for r in (img_cache.rows if img_cache else [])}
    cached_scores = {(r["key"], r["reward"]): r["value"] for r in (score_cache.rows if score_cache else [])}

    pairs = [(i, rec, s) for i, rec in enumerate(records_in) for s in seeds]
    result = EvalResult(rows=[], records=[], variants=list(sources), rewards=list(reward_fns), out_dir=out)
    t0 = time.perf_counter()
    for vname, source in sources.items():
        adapter = source if not callable(source) or isinstance(source, Adapter) else None
        fp = specs[vname]["fingerprint"]
        if fp is None:
            adapter = adapter if adapter is not None else source()
            fp = specs[vname]["fingerprint"] = adapter_fingerprint(adapter)
        keys = [_image_key(fp, rec["prompt"], s, num_steps, guidance, negative_prompt) for _, rec, s in pairs]

        def complete(key: str) -> bool:
            rec = cached_imgs.get(key)
            return rec is not None and (out / rec["image"]).is_file() and (
                rec["kind"] == "image" or all((key, r) in cached_scores for r in reward_fns))

        todo = [j for j, k in enumerate(keys) if not complete(k)]
        chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        bar = tqdm(chunks, desc=f"eval {vname}", disable=not progress or not chunks, leave=False)
        for chunk in bar:
            if adapter is None:
                adapter = source()
            ps = [pairs[j][1]["prompt"] for j in chunk]
            images, noise = generate_images(adapter, ps, [pairs[j][2] for j in chunk], num_steps, guidance,
                                            negative_prompt)
            u8 = quantize(images)
            new_recs = []
            for b, j in enumerate(chunk):
                idx, rec, seed = pairs[j]
                info = {"key": keys[j], "variant": vname, "prompt": rec["prompt"], "prompt_idx": idx, "seed": seed,
                        "kind": "video" if u8.ndim == 5 else "image",
                        "noise_sha": hashlib.sha256(noise[b].float().contiguous().numpy().tobytes()).hexdigest()[:16],
                        "pixel_sha": hashlib.sha256(u8[b].contiguous().numpy().tobytes()).hexdigest()[:16],
                        "size": list(u8[b].shape[-2:]), "num_steps": num_steps, "guidance": float(guidance)}
                if out is not None:
                    info.update(_save_media(out, vname, keys[j], u8[b], fps))
                else:
                    result.pixels[keys[j]] = u8[b]
                new_recs.append(info)
            _score(reward_fns, u8, [pairs[j][1] for j in chunk], [keys[j] for j in chunk], cached_scores,
                   score_cache)
            for info in new_recs:
                cached_imgs[info["key"]] = info
            if img_cache is not None:
                img_cache.extend(new_recs)
        # saved images lacking a newly added reward: score the PNG (exactly what was scored the first time)
        stale = [j for j, k in enumerate(keys) if any((k, r) not in cached_scores for r in reward_fns)]
        for i in range(0, len(stale), batch_size):
            chunk = stale[i:i + batch_size]
            u8 = torch.stack([load_png(out / cached_imgs[keys[j]]["image"]) for j in chunk])
            _score(reward_fns, u8, [pairs[j][1] for j in chunk], [keys[j] for j in chunk], cached_scores,
                   score_cache)
        for j, k in enumerate(keys):
            rec = dict(cached_imgs[k], variant=vname)
            result.records.append(rec)
            for rname in reward_fns:
                result.rows.append({"prompt": rec["prompt"], "prompt_idx": rec["prompt_idx"], "seed": rec["seed"],
                                    "variant": vname, "reward": rname, "value": float(cached_scores[(k, rname)]),
                                    "image": rec.get("image"), "key": k})
        del adapter
    result.timings["total_s"] = time.perf_counter() - t0
    if out is not None:
        _write_outputs(out, result, specs, seeds, records_in, dict(
            num_steps=num_steps, guidance=float(guidance), negative_prompt=negative_prompt, fps=fps,
            **(extra_config or {})))
    return result


def _save_media(out: Path, variant: str, key: str, u8: Tensor, fps: int) -> dict:
    d = out / "images" / _slug(variant)
    d.mkdir(parents=True, exist_ok=True)
    rel = lambda p: p.relative_to(out).as_posix()  # noqa: E731
    if u8.ndim == 4:  # video T,C,H,W
        video, poster = d / f"{key}.mp4", d / f"{key}.poster.png"
        save_video(video, u8, fps)
        save_png(poster, u8[0])
        info = {"image": rel(video), "poster": rel(poster)}
        frame = u8[0]
    else:
        img = d / f"{key}.png"
        save_png(img, u8)
        info = {"image": rel(img)}
        frame = u8
    if max(frame.shape[-2:]) > THUMB_SIZE * 3 // 2:
        thumb = d / f"{key}.thumb.jpg"
        save_thumb(thumb, frame)
        info["thumb"] = rel(thumb)
    return info


def _score(reward_fns: Mapping[str, Reward], u8: Tensor, prompt_recs: Sequence[dict], keys: Sequence[str],
           cache: dict, appender: Appender | None) -> None:
    """Score the 8-bit images with every reward still missing for them; record and persist the values."""
    images = u8.float() / 255.0
    prompts = [r["prompt"] for r in prompt_recs]
    metadata = [{k: v for k, v in r.items() if k != "prompt"} for r in prompt_recs]
    new = []
    for name, fn in reward_fns.items():
        missing = [b for b, k in enumerate(keys) if (k, name) not in cache]
        if not missing:
            continue
        vals = fn(images[missing], [prompts[b] for b in missing], [metadata[b] for b in missing])
        for b, v in zip(missing, vals.detach().float().cpu().tolist()):
            cache[(keys[b], name)] = v
            new.append({"key": keys[b], "reward": name, "value": v})
    if appender is not None:
        appender.extend(new)


def _write_outputs(out: Path, result: EvalResult, specs: dict, seeds: list[int], prompts: list[dict],
                   config: dict) -> None:
    write_jsonl(out / "images.jsonl", result.records)
    write_jsonl(out / "results.jsonl", result.rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROW_FIELDS), extrasaction="ignore")
    w.writeheader()
    w.writerows(result.rows)
    atomic_write(out / "results.csv", buf.getvalue().encode())
    manifest = {"variants": specs, "base": result.variants[0], "rewards": result.rewards, "seeds": seeds,
                "prompts": prompts, **config, "timings": result.timings}
    atomic_write(out / "eval.json", json.dumps(manifest, indent=2, default=str).encode())


def evaluate(adapter: Adapter, prompts: "Sequence[str | dict] | str", seeds: "str | Sequence[int]",
             rewards: "Sequence[str | Reward] | Mapping[str, Reward]", num_steps: int = 40, guidance: float = 1.0,
             out_dir: str | Path | None = None, *, variant: str = "current", fingerprint: str | None = None,
             negative_prompt: str = "", batch_size: int = 8, progress: bool = False) -> EvalResult:
    """The trainer's periodic eval: deterministic samples of one adapter (its current weights) scored by
    ``rewards``. ``result.log_dict()`` gives ``{"eval/<reward>": mean}``; with ``out_dir`` the images and tidy
    rows land there (pass ``fingerprint=f"step{step}"`` to skip hashing the weights)."""
    was_training = adapter.trainable_module().training
    adapter.trainable_module().eval()
    try:
        return run_eval({variant: adapter}, prompts, seeds, rewards, num_steps=num_steps, guidance=guidance,
                        negative_prompt=negative_prompt, out_dir=out_dir, batch_size=batch_size,
                        fingerprints={variant: fingerprint} if fingerprint else None, progress=progress)
    finally:
        adapter.trainable_module().train(was_training)
