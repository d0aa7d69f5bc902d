"""Static HTML gallery of an eval folder (``flowalign gallery <eval-dir>``), rendered with jinja2.

The page works offline from ``file://``: no external assets, CSS and JS inline, media by relative path.
Rows are ``(prompt, seed)`` pairs, columns are variants (the same initial noise along a row), each cell shows
its scores and the gain over the base. Plain JS sorts rows by any reward of any variant or by the gain over the
base, filters by prompt text and enlarges an image on click; the state lives in the URL fragment
(``index.html#sort=g:clip_score:lora&dir=desc&q=red``) so a view can be shared or opened directly.
Images load lazily (``loading="lazy"`` with their size set, large ones through a JPEG thumbnail) and videos
with ``preload="none"`` behind a poster frame, so a page of thousands of cells stays usable.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import quote

import jinja2

from flowalign.eval.media import read_jsonl
from flowalign.eval.metrics import summarize
from flowalign.eval.plots import plot_summary, plot_training_curves

TEMPLATES = Path(__file__).parent / "templates"


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                              autoescape=jinja2.select_autoescape(["html", "j2"]),
                              trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)


def _seeds_text(seeds: Sequence[int]) -> str:
    s = sorted(seeds)
    if s and s == list(range(s[0], s[-1] + 1)) and len(s) > 2:
        return f"{s[0]}-{s[-1]}"
    return ", ".join(map(str, s))


def load_eval_dir(eval_dir: str | Path) -> tuple[dict, list[dict], list[dict]]:
    """``(eval.json, image records, tidy rows)`` of an eval folder written by ``run_eval``."""
    d = Path(eval_dir)
    manifest, images = d / "eval.json", d / "images.jsonl"
    if not manifest.is_file() or not images.is_file():
        raise ValueError(f"{str(d)!r} is not an eval folder (no eval.json / images.jsonl); run `flowalign eval` "
                         "with --out pointing there first")
    return json.loads(manifest.read_text()), read_jsonl(images), read_jsonl(d / "results.jsonl")


def build_gallery(eval_dir: str | Path, out: str | Path | None = None, *, logs: Sequence[str | Path] = (),
                  title: str | None = None, summary: Mapping | None = None, thumb_px: int = 192,
                  n_resamples: int = 10_000, plot_format: str = "svg") -> Path:
    """Write the gallery page (default ``<eval_dir>/index.html``) and its plots; return the page's path.

    ``summary`` defaults to ``metrics.summarize`` of the rows (with the manifest's optimised/held-out rewards);
    diversity comes from ``metrics.json`` when ``flowalign eval`` wrote one. ``logs`` are trainer JSONL logs
    whose curves are embedded.
    """
    d = Path(eval_dir).resolve()
    config, records, rows = load_eval_dir(d)
    page = Path(out).resolve() if out else d / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    assets = page.parent / (page.stem + "_files")

    def href(rel: str | None) -> str | None:
        if rel is None:
            return None
        return quote(os.path.relpath(d / rel, page.parent).replace(os.sep, "/"))

    variants = list(config.get("variants") or dict.fromkeys(r["variant"] for r in records))
    rewards = list(config.get("rewards") or dict.fromkeys(r["reward"] for r in rows))
    base = config.get("base") or variants[0]
    metrics_file = d / "metrics.json"
    saved = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    if summary is None:
        summary = summarize(rows, base, optimized=config.get("optimized"), held_out=config.get("held_out"),
                            verifiers=config.get("verifiers"), n_resamples=n_resamples)

    values: dict[tuple, float] = {(r["variant"], r["prompt_idx"], r["seed"], r["reward"]): float(r["value"])
                                  for r in rows}
    by_pair: dict[tuple[int, int], dict[str, dict]] = defaultdict(dict)
    for rec in records:
        by_pair[(rec["prompt_idx"], rec["seed"])][rec["variant"]] = rec
    # sort keys are opaque ids for the JS ("r:<reward>:<variant>", "g:..." for the gain over base); names may
    # contain ":" (module:attr rewards), so the parts are kept alongside instead of parsed back
    sorts = [("r", r, v) for r in rewards for v in variants] + [("g", r, v) for r in rewards for v in variants
                                                                 if v != base]
    sort_keys = [f"{k}:{r}:{v}" for k, r, v in sorts]
    sort_labels = [f"{r} · {v}" if k == "r" else f"{r} gain · {v} − {base}" for k, r, v in sorts]

    table_rows, data_rows = [], []
    for (pidx, seed), cells in sorted(by_pair.items()):
        prompt = next(iter(cells.values()))["prompt"]
        row_cells = []
        for v in variants:
            rec = cells.get(v)
            if rec is None:
                row_cells.append(None)
                continue
            scores = []
            for r in rewards:
                val = values.get((v, pidx, seed, r))
                if val is None:
                    continue
                b = values.get((base, pidx, seed, r))
                scores.append({"reward": r, "value": val, "gain": None if v == base or b is None else val - b})
            size = rec.get("size") or [thumb_px, thumb_px]
            caption = f"{prompt}\n{v} · seed {seed} · " + " · ".join(f"{s['reward']} {s['value']:.4g}" for s in scores)
            row_cells.append({"variant": v, "kind": rec.get("kind", "image"), "src": href(rec["image"]),
                              "thumb": href(rec.get("thumb") or rec["image"]), "poster": href(rec.get("poster")),
                              "w": thumb_px, "h": thumb_px, "pixel": max(size) < thumb_px, "caption": caption,
                              "scores": scores})
        table_rows.append({"prompt": prompt, "prompt_idx": pidx, "seed": seed, "cells": row_cells})
        vals = []
        for kind, r, v in sorts:
            val = values.get((v, pidx, seed, r))
            if kind == "g":
                b = values.get((base, pidx, seed, r))
                val = None if val is None or b is None else val - b
            vals.append(val)
        data_rows.append(vals)

    plots = []
    if summary.get("table"):
        plots += plot_summary(summary, assets, fmt=plot_format)
    if logs:
        plots += plot_training_curves(list(logs), assets, fmt=plot_format)
    diversity = saved.get("diversity") or {}
    html = _env().get_template("gallery.html.j2").render(
        title=title or f"flowalign eval · {d.name}", created=time.strftime("%Y-%m-%d %H:%M"), config=config,
        variants=variants, rewards=rewards, base=base, seeds_text=_seeds_text(config.get("seeds", [])),
        n_prompts=len({p for p, _ in by_pair}), summary=summary, confidence=summary.get("confidence", 0.95),
        diversity=diversity, diversity_features=saved.get("diversity_features", "pixels"),
        plots=[{"src": quote(os.path.relpath(p, page.parent).replace(os.sep, "/")), "title": p.stem} for p in plots],
        sort_options=[{"key": k, "label": lab} for k, lab in zip(sort_keys, sort_labels)],
        rows=table_rows, thumb_px=thumb_px, data={"keys": sort_keys, "rows": data_rows})
    tmp = page.with_name(page.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, page)
    return page
