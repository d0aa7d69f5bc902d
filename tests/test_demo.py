"""``make demo`` = ``python -m flowalign.cli demo``: train the shapes recipe, evaluate base vs aligned, print the
before/after table, write the HTML gallery and the PNG grid.

The end-to-end test runs the real command path shortened through the demo's own options (``--out``, ``--seeds``)
and recipe overrides (1 iteration, 3 + 3 prompts, 2 seeds); every number of the printed table is recomputed
from the per-image verifier scores the eval wrote, and the grid's tiles are the eval's images.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowalign.demo import before_after_table

ROOT = Path(__file__).resolve().parents[1]
RL = ["a red circle", "two red squares", "a red square left of a red circle"]
HELD = ["a red triangle", "a yellow circle", "a red circle left of a blue circle"]
ROW = re.compile(r"^\| (RL prompts|held-out) \| (base|aligned) \| ([\d.]+)% \[([\d.]+)%, ([\d.]+)%\] \| "
                 r"([\d.]+)% \[([\d.]+)%, ([\d.]+)%\] \| ([\d.]+) \|(?:[^|]*\|)*$")  # extra columns allowed
HEADER = "| prompts | model | strict accuracy | partial accuracy | mean reward |"


def test_before_after_table_format():
    ci = lambda m, lo, hi: {"mean": m, "lo": lo, "hi": hi, "n": 8}  # noqa: E731
    table = before_after_table({"held-out": {"base": {"strict": ci(0.25, 0.0, 0.5), "partial": ci(0.5, 0.3, 0.7)},
                                             "aligned": {"strict": ci(0.625, 0.375, 0.875),
                                                         "partial": ci(0.75, 0.5, 1.0)}}})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith(HEADER)
    assert lines[2].startswith("| held-out | base | 25.0% [0.0%, 50.0%] | 50.0% [30.0%, 70.0%] | 0.750 |")
    assert lines[3].startswith("| held-out | aligned | 62.5% [37.5%, 87.5%] | 75.0% [50.0%, 100.0%] | 1.375 |")
    assert all(ROW.match(line) for line in lines[2:])


def _scores(split_dir: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in map(json.loads, (split_dir / "results.jsonl").read_text().splitlines()):
        assert r["reward"] == "shapes_geneval"
        out.setdefault(r["variant"], []).append(r["value"])
    return out


@pytest.mark.slow
def test_demo_command_prints_table_and_writes_gallery_and_grid(tmp_path):
    out = tmp_path / "demo"
    lst = lambda xs: "[" + ", ".join(xs) + "]"  # noqa: E731
    cmd = [sys.executable, "-m", "flowalign.cli", "demo", "--out", str(out), "--seeds", "0-1",
           f"sample.prompts={lst(RL)}", f"eval.prompts={lst(HELD)}", "sample.prompts_per_round=2",
           "sample.group_size=4", "sample.batch_size=8", "max_iterations=1",
           "ema.interval=1"]  # the recipe's EMA (interval 8) would not move in 4 updates: aligned == base
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    for step in ("[1/3] Flow-GRPO", "[2/3] Evaluating base vs aligned", "[3/3] Gallery and summary"):
        assert step in stdout

    # the table: 2 splits x (base, aligned), each number recomputed from the per-image verifier scores
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(table) == 6 and table[0].startswith(HEADER)
    rows = {(m[1], m[2]): m for m in map(ROW.match, table[2:]) if m}
    assert set(rows) == {(s, v) for s in ("RL prompts", "held-out") for v in ("base", "aligned")}
    summary = json.loads((out / "summary.json").read_text())
    for split, sub, n_prompts in (("RL prompts", "RL_prompts", len(RL)), ("held-out", "held_out", len(HELD))):
        scores = _scores(out / sub)
        for variant in ("base", "aligned"):
            x = np.array(scores[variant])
            assert len(x) == n_prompts * 2 and ((0 <= x) & (x <= 1)).all()
            strict, partial = float((x >= 1 - 1e-6).mean()), float(x.mean())
            m = rows[(split, variant)]
            s_mean, s_lo, s_hi, p_mean, p_lo, p_hi = (float(m[i]) / 100 for i in range(3, 9))
            assert s_mean == pytest.approx(strict, abs=5e-4) and p_mean == pytest.approx(partial, abs=5e-4)
            assert s_lo <= s_mean <= s_hi and p_lo <= p_mean <= p_hi
            assert float(m[9]) == pytest.approx(strict + partial, abs=5e-4)  # mean of the strict+partial reward
            acc = summary["accuracy"][split][variant]
            assert acc["strict"]["mean"] == pytest.approx(strict) and acc["partial"]["mean"] == pytest.approx(partial)

    # aligned really is the trained checkpoint: same seeds (shared noise), different pixels
    ckpt = Path(summary["checkpoint"])
    assert ckpt.name == "checkpoint-00000001" and ckpt.parent.parent.parent == out and (ckpt / "state.json").is_file()
    imgs = [json.loads(x) for x in (out / "held_out" / "images.jsonl").read_text().splitlines()]
    by = {(r["variant"], r["prompt"], r["seed"]): r for r in imgs}
    pairs = [(by[("base", p, s)], by[("aligned", p, s)]) for p in HELD for s in (0, 1)]
    assert all(b["noise_sha"] == a["noise_sha"] for b, a in pairs)
    assert any(b["pixel_sha"] != a["pixel_sha"] for b, a in pairs)

    # the HTML gallery shows every image of both variants
    gallery = out / "held_out" / "index.html"
    assert f"gallery: {gallery}" in stdout
    html = gallery.read_text()
    srcs = set(re.findall(r'src="(images/[^"]+)"', html))
    assert {r["image"] for r in imgs} <= srcs and all((out / "held_out" / s).is_file() for s in srcs)

    # the PNG grid: base row over aligned row, one column per held-out prompt, tiles = the eval's seed-0 images
    grid_path = out / "before_after.png"
    assert f"grid:    {grid_path}" in stdout
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    scale, cell, label = 4, 32 * 4, 90
    assert grid.shape == (2 * (cell + 4) + 4, label + len(HELD) * (cell + 4), 3)
    for r, variant in enumerate(("base", "aligned")):
        for c, prompt in enumerate(HELD):
            src = Image.open(out / "held_out" / by[(variant, prompt, 0)]["image"]).convert("RGB")
            want = np.asarray(src.resize((32 * scale, 32 * scale), Image.NEAREST))
            y, x = r * (cell + 4) + 4, label + c * (cell + 4)
            assert np.array_equal(grid[y:y + cell, x:x + cell], want), (variant, prompt)
    assert (out / "summary.md").read_text().splitlines() == table
