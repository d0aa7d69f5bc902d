"""Gallery build time for 200 prompts x 4 variants from cached eval results (target: under 30 s on CPU).

    python benchmarks/gallery_build.py [--prompts 200] [--variants 4] [--size 512] [--repeats 3]

Writes an eval folder in the on-disk format of ``flowalign.eval.generate`` (PNGs with JPEG thumbnails,
images.jsonl, results.jsonl with three rewards, eval.json) -- not timed -- then times ``build_gallery`` (metrics
with 10,000 bootstrap resamples, summary plots, HTML) and, when Debian's chromium and Playwright are installed,
opens the page from file:// and records how long it takes to load and how many images it fetched up front
(lazy loading keeps that to the ones near the viewport). Results go to benchmarks/results/gallery_build.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flowalign.eval.gallery import build_gallery
from flowalign.eval.media import THUMB_SIZE, atomic_write, save_png, save_thumb, write_jsonl

REWARDS = ("pickscore", "clip_score", "shapes")
WORDS = ("red", "blue", "green", "yellow", "circle", "square", "triangle", "two", "three", "left of", "above",
         "a photo of", "a painting of", "cat", "dog", "city at night", "mountain lake", "robot")


def _image(rng: np.random.Generator, size: int) -> torch.Tensor:
    """A smooth random image (gradients + a blob), so PNG sizes are realistic rather than noise-sized."""
    y, x = np.mgrid[0:size, 0:size] / size
    c = rng.random((3, 3))
    cx, cy, r = rng.random(3) * [1, 1, 0.3] + [0, 0, 0.1]
    blob = ((x - cx) ** 2 + (y - cy) ** 2 < r**2)
    img = np.stack([c[i, 0] * x + c[i, 1] * y + c[i, 2] * blob for i in range(3)]) / 2
    return torch.from_numpy((np.clip(img, 0, 1) * 255).round().astype(np.uint8))


def fake_eval_dir(out: str | Path, n_prompts: int = 200, n_variants: int = 4, seeds: int = 1, size: int = 512,
                  seed: int = 0) -> Path:
    """An eval folder as ``run_eval`` writes it, with synthetic images and scores (later variants score higher)."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    variants = ["base"] + [f"ckpt-{(i + 1) * 100}" for i in range(n_variants - 1)]
    prompts = [" ".join(rng.choice(WORDS, size=4)) + f" #{i}" for i in range(n_prompts)]
    records, rows = [], []
    for v_i, variant in enumerate(variants):
        d = out / "images" / variant
        d.mkdir(parents=True, exist_ok=True)
        for p_i, prompt in enumerate(prompts):
            for s in range(seeds):
                key = f"{v_i:02d}{p_i:05d}{s:03d}".ljust(24, "0")
                img = _image(rng, size)
                save_png(d / f"{key}.png", img)
                rec = {"key": key, "variant": variant, "prompt": prompt, "prompt_idx": p_i, "seed": s,
                       "kind": "image", "image": f"images/{variant}/{key}.png", "size": [size, size]}
                if size > THUMB_SIZE * 3 // 2:
                    save_thumb(d / f"{key}.thumb.jpg", img)
                    rec["thumb"] = f"images/{variant}/{key}.thumb.jpg"
                records.append(rec)
                for r_i, reward in enumerate(REWARDS):
                    value = (float(rng.random() < 0.4 + 0.1 * v_i) if reward == "shapes"
                             else float(rng.normal(0.2 + 0.02 * v_i, 0.05)))
                    rows.append({"prompt": prompt, "prompt_idx": p_i, "seed": s, "variant": variant,
                                 "reward": reward, "value": value, "image": rec["image"], "key": key})
    write_jsonl(out / "images.jsonl", records)
    write_jsonl(out / "results.jsonl", rows)
    manifest = {"variants": {v: {"fingerprint": v} for v in variants}, "base": "base", "rewards": list(REWARDS),
                "seeds": list(range(seeds)), "prompts": [{"prompt": p} for p in prompts], "num_steps": 40,
                "guidance": 4.5, "optimized": "pickscore", "held_out": "clip_score"}
    atomic_write(out / "eval.json", json.dumps(manifest).encode())
    return out


def browser_load(page_path: Path) -> dict | None:
    """Open the page in headless Debian chromium (Playwright); None when either is missing."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if chromium is None:
        return None
    import tempfile

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, viewport={"width": 1400, "height": 900},
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"])
        page = ctx.new_page()
        t0 = time.perf_counter()
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        page.locator("button.sort[data-sort^='g:pickscore:']").last.click()  # sort by the last variant's gain
        sort_s = time.perf_counter() - t0
        n_img, n_loaded = page.evaluate("""() => { const imgs = [...document.querySelectorAll('img.thumb')];
            return [imgs.length, imgs.filter(i => i.complete && i.naturalWidth > 0).length]; }""")
        ctx.close()
    return {"load_s": round(load_s, 3), "sort_click_s": round(sort_s, 3), "images": n_img,
            "images_loaded_at_open": n_loaded}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where the eval folder is written (default: a temp dir)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gallery_build.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import tempfile

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="gallery_bench_"))
    t0 = time.perf_counter()
    d = fake_eval_dir(tmp / "eval", args.prompts, args.variants, size=args.size)
    setup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        page = build_gallery(d)
        times.append(time.perf_counter() - t0)
    result = {
        "benchmark": "gallery_build", "prompts": args.prompts, "variants": args.variants,
        "images": args.prompts * args.variants, "image_size": args.size, "rewards": len(REWARDS),
        "bootstrap_resamples": 10_000, "build_s_median": round(statistics.median(times), 3),
        "build_s_all": [round(t, 3) for t in times], "target_s": 30.0,
        "html_bytes": page.stat().st_size, "setup_s_untimed": round(setup_s, 1),
        "browser": browser_load(page), "python": sys.version.split()[0], "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.workdir:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if result["build_s_median"] < result["target_s"] else 1


if __name__ == "__main__":
    sys.exit(main())
