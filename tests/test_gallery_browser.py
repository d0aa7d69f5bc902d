"""The gallery in a real browser: Debian's headless Chromium, driven by Playwright, loads the page from file://.

Checks what a person would: the page renders (screenshot), every image cell is there, clicking a sort button
reorders rows by that reward (and the URL fragment reproduces a sort), the text filter hides rows, a click
enlarges an image, and the video cell has a playable H.264 source with a non-zero duration.
Chromium comes from `make sysdeps` (apt `chromium`), Playwright from the dev extras.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from flowalign.eval import run_eval
from flowalign.eval.gallery import build_gallery
from flowalign.eval.models import variants_from_args
from flowalign.rewards.base import FunctionReward
try:  # the stand-in model and rewards (tests/ is a package in this repo; plain rootdir imports otherwise)
    from tests.test_eval import PROMPTS, brightness, make_toy, save_lora
except ImportError:  # pragma: no cover
    from test_eval import PROMPTS, brightness, make_toy, save_lora

pytestmark = pytest.mark.slow

from tests.browser import CHROMIUM, FLAGS, require_browser  # noqa: E402


@pytest.fixture(scope="module")
def galleries(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    toy = make_toy(size=32)
    model = toy.save(root / "model")
    lora = save_lora(toy, root / "lora_a")
    res = run_eval(variants_from_args(f"toy_eval:{model}", [str(lora)]), PROMPTS, "0-1", ["toy_bright", "toy_red"],
                   num_steps=4, out_dir=root / "images", progress=False)
    video = run_eval({"video": make_toy(size=24, frames=8)}, PROMPTS[:1], [0],
                     [FunctionReward(brightness, name="bright", modality="video")], num_steps=3,
                     out_dir=root / "video", fps=8, progress=False)
    return {"images": build_gallery(root / "images", n_resamples=500), "rows": res.rows,
            "video": build_gallery(root / "video", n_resamples=500), "video_rows": video.rows, "root": root}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1200, "height": 900})
        yield ctx
        ctx.close()


def _order(page) -> list[tuple[int, int]]:
    return page.eval_on_selector_all(
        "#rows tr:not([hidden])", "trs => trs.map(t => [+t.dataset.promptIdx, +t.dataset.seed])")


def _expected(rows, reward, variant, base=None, descending=True) -> list[list[int]]:
    vals = {(r["prompt_idx"], r["seed"]): r["value"] for r in rows if r["reward"] == reward and r["variant"] == variant}
    if base:
        b = {(r["prompt_idx"], r["seed"]): r["value"] for r in rows if r["reward"] == reward and r["variant"] == base}
        vals = {k: v - b[k] for k, v in vals.items()}
    order = sorted(sorted(vals), key=lambda k: vals[k], reverse=descending)  # stable on (prompt, seed) like JS
    return [list(k) for k in order]


def test_gallery_loads_sorts_filters_and_enlarges(browser, galleries, tmp_path):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    url = galleries["images"].as_uri()
    assert url.startswith("file://")
    page.goto(url)
    page.wait_for_load_state("load")
    shot = tmp_path / "gallery.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("GALLERY_SCREENSHOT"):
        shutil.copy(shot, os.environ["GALLERY_SCREENSHOT"])

    n_cells = 2 * len(PROMPTS) * 2  # variants x prompts x seeds
    assert page.locator("img.thumb").count() == n_cells
    assert page.locator("img.thumb[loading=lazy]").count() == n_cells
    first = page.locator("img.thumb").first
    first.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=first.element_handle())
    assert first.evaluate("img => img.naturalWidth") == 32
    assert page.locator("#count").inner_text() == f"{n_cells // 2} of {n_cells // 2} rows"

    rows = galleries["rows"]
    original = _order(page)
    assert original == sorted(original)
    page.click('button.sort[data-sort="r:toy_bright:lora_a"]')
    by_bright = _expected(rows, "toy_bright", "lora_a")
    assert by_bright != original, "the fixture must make sorting visible"
    assert _order(page) == by_bright
    assert "sort=r%3Atoy_bright%3Alora_a" in page.url or "sort=r:toy_bright:lora_a" in page.url
    page.click('button.sort[data-sort="r:toy_bright:lora_a"]')  # second click flips the direction
    assert _order(page) == _expected(rows, "toy_bright", "lora_a", descending=False)

    # a URL fragment opens a sorted view: gain of lora_a over base on toy_red, ascending
    page.goto(url + "#sort=g:toy_red:lora_a&dir=asc")
    page.wait_for_load_state("load")
    assert _order(page) == _expected(rows, "toy_red", "lora_a", base="base", descending=False)
    assert page.locator("#sort").input_value() == "g:toy_red:lora_a"

    page.fill("#filter", "blue")
    assert _order(page) == [[1, 0], [1, 1]] or sorted(_order(page)) == [[1, 0], [1, 1]]
    assert page.locator("#count").inner_text() == f"2 of {n_cells // 2} rows"
    page.fill("#filter", "")

    page.locator("#rows tr:not([hidden]) img.thumb").first.click()
    box = page.locator("#lightbox")
    assert "open" in box.get_attribute("class")
    assert box.locator("img").get_attribute("src").endswith(".png")
    assert "seed" in box.locator(".caption").inner_text()
    page.keyboard.press("Escape")
    assert "open" not in (box.get_attribute("class") or "")
    assert errors == []


def test_gallery_video_has_playable_source(browser, galleries):
    page = browser.new_page()
    page.goto(galleries["video"].as_uri())
    video = page.locator("video")
    assert video.count() == 1
    assert video.get_attribute("poster").endswith(".poster.png")
    info = video.evaluate("""v => new Promise((resolve) => {
        v.addEventListener('loadedmetadata', () => resolve({duration: v.duration, width: v.videoWidth,
                                                            src: v.currentSrc}), {once: true});
        v.addEventListener('error', () => resolve({error: v.error && v.error.code}), {once: true});
        v.load();
    })""")
    assert "error" not in info, f"the browser could not decode the mp4: {info}"
    assert info["src"].endswith(".mp4") and info["width"] == 24
    assert info["duration"] == pytest.approx(1.0, abs=0.2)  # 8 frames at 8 fps
    played = video.evaluate("""v => v.play().then(() => new Promise(r => setTimeout(() => r(v.currentTime), 300)))""")
    assert played > 0
    # the per-cell score is shown under the video
    score = next(r["value"] for r in galleries["video_rows"])
    assert f"{score:.4g}" in page.locator("td.cell .scores").inner_text()


def test_large_page_loads_images_lazily(tmp_path, browser):
    """A 100-prompt x 4-variant page (the benchmark's format) opens with only the images near the viewport
    fetched, and sorting 100 rows by a gain still works."""
    spec = importlib.util.spec_from_file_location(
        "gallery_build", Path(__file__).resolve().parents[1] / "benchmarks" / "gallery_build.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    page_path = build_gallery(bench.fake_eval_dir(tmp_path / "ev", n_prompts=100, n_variants=4, size=64),
                              n_resamples=200)
    page = browser.new_page()
    page.goto(page_path.as_uri())
    page.wait_for_load_state("load")
    n_img, n_loaded = page.evaluate("""() => { const imgs = [...document.querySelectorAll('img.thumb')];
        return [imgs.length, imgs.filter(i => i.complete && i.naturalWidth > 0).length]; }""")
    assert n_img == 400 and 0 < n_loaded < n_img / 2
    page.click('button.sort[data-sort="g:pickscore:ckpt-300"]')
    gains = page.eval_on_selector_all("#rows tr", """trs => trs.map(t => {
        const d = JSON.parse(document.getElementById('gallery-data').textContent);
        return d.rows[+t.dataset.i][d.keys.indexOf('g:pickscore:ckpt-300')]; })""")
    assert gains == sorted(gains, reverse=True)
