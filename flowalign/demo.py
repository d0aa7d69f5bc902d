"""``flowalign demo``: align the embedded shapes-world model with Flow-GRPO on CPU and show before/after.

1. train ``recipes/shapes_flow_grpo.yaml`` (the one trainer; a tqdm bar throughout),
2. evaluate the base model and the aligned checkpoint with the same seeds (shared initial noise) on the RL
   prompts and on held-out prompts (unseen combinations) with the shapes verifier (``flowalign.eval``),
3. print a before/after table (strict and partial accuracy with bootstrap 95% CIs, mean reward, and the
   one-sided p-value of the strict-accuracy gain from a paired, prompt-clustered bootstrap), and write an HTML
   gallery plus a PNG grid (``outputs/demo/``).

Everything reuses the library: the trainer, ``flowalign.eval.run_eval`` / ``verifier_accuracy`` /
``build_gallery``; this module only wires them together for the README's first command.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import torch

RECIPE = "recipes/shapes_flow_grpo.yaml"
VERIFIER = "shapes_geneval"


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowalign demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=RECIPE, help="Flow-GRPO recipe to run (default: %(default)s)")
    p.add_argument("--out", default="outputs/demo", help="where the eval, gallery and summary go")
    p.add_argument("--minutes", type=float, default=None, help="training budget (default: the recipe's max_minutes)")
    p.add_argument("--seeds", default="0-3", help="eval seeds per prompt (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    return p


def _accuracy(rows: list[dict], reward: str) -> dict[str, dict]:
    from flowalign.eval import verifier_accuracy

    return verifier_accuracy(rows, reward, n_resamples=2000)


def strict_gain_p(rows: list[dict], reward: str, variant: str = "aligned", base: str = "base") -> float:
    """One-sided p-value of "no strict-accuracy gain": the same (prompt, seed) share initial noise, so the per-image
    gains are paired; the bootstrap resamples prompts (``flowalign.eval.bootstrap_p_gain``)."""
    from flowalign.eval import bootstrap_p_gain
    from flowalign.eval.metrics import paired

    v, b, prompts = paired(rows, reward, variant, base)
    tol = 1e-6  # as verifier_accuracy: strict = every check passed
    return bootstrap_p_gain((v >= 1 - tol).astype(float) - (b >= 1 - tol).astype(float), prompts)


def before_after_table(results: dict[str, dict[str, dict]], p_values: dict[str, float] | None = None) -> str:
    """Markdown table: split x variant -> strict / partial accuracy (95% CI), mean reward (strict + partial) and,
    for the aligned rows, the p-value of the strict gain over the base."""
    p_values = p_values or {}
    lines = ["| prompts | model | strict accuracy | partial accuracy | mean reward | gain p |", "|---|---|---|---|---|---|"]
    for split, per_variant in results.items():
        for variant, acc in per_variant.items():
            s, p = acc["strict"], acc["partial"]
            sig = f"{p_values[split]:.4f}" if variant != "base" and split in p_values else ""
            lines.append(f"| {split} | {variant} | {s['mean']:.1%} [{s['lo']:.1%}, {s['hi']:.1%}] | "
                         f"{p['mean']:.1%} [{p['lo']:.1%}, {p['hi']:.1%}] | {s['mean'] + p['mean']:.3f} | {sig} |")
    return "\n".join(lines)


def save_grid(images_by_variant: dict[str, torch.Tensor], prompts: Sequence[str], path: Path, scale: int = 4) -> None:
    """A PNG with one column pair per prompt: base on top, aligned below (nearest-neighbour upscaled)."""
    from PIL import Image, ImageDraw

    rows = list(images_by_variant.items())
    n = rows[0][1].shape[0]
    h, w = rows[0][1].shape[-2:]
    cell_h, cell_w, label = h * scale, w * scale, 90
    canvas = Image.new("RGB", (label + n * (cell_w + 4), len(rows) * (cell_h + 4) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, imgs) in enumerate(rows):
        draw.text((4, r * (cell_h + 4) + cell_h // 2), name, fill="black")
        for c in range(n):
            arr = (imgs[c].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            tile = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label + c * (cell_w + 4), r * (cell_h + 4) + 4))
    canvas.save(path)


def demo_main(argv: Sequence[str] | None = None) -> int:
    from flowalign.config import load_config, load_prompts
    from flowalign.eval import Variant, build_gallery, run_eval
    from flowalign.rewards import get_reward
    from flowalign.trainer import train

    args = demo_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # a fresh run directory per demo, so re-running never overwrites (or silently resumes) an earlier run
    run_dir = out / time.strftime("run-%Y%m%d-%H%M%S")
    overrides = [f"output_dir={run_dir}", *args.overrides]
    overrides += [f"max_minutes={args.minutes}"] if args.minutes is not None else []
    cfg = load_config(args.recipe, overrides)

    t0 = time.time()
    print(f"[1/3] Flow-GRPO on the shapes world: {args.recipe} (budget {cfg.max_minutes} min)", flush=True)
    train(cfg)
    train_minutes = (time.time() - t0) / 60
    from flowalign.checkpoint import list_checkpoints

    ckpts = list_checkpoints(cfg.checkpoint.dir or Path(cfg.output_dir) / "checkpoints")
    if not ckpts:
        raise RuntimeError(f"training wrote no checkpoint under {cfg.output_dir}")
    model = f"{cfg.model.adapter}:{cfg.model.path}"
    variants = [Variant("base", model), Variant("aligned", model, lora=str(ckpts[-1]))]
    verifier = {VERIFIER: get_reward(VERIFIER, mode="partial")}

    print("[2/3] Evaluating base vs aligned with shared seeds (ODE sampler)", flush=True)
    splits = {"RL prompts": load_prompts(cfg.sample.prompts)[0], "held-out": load_prompts(cfg.eval.prompts)[0]}
    results, grids, p_values = {}, {}, {}
    for split, prompts in splits.items():
        res = run_eval(variants, prompts, args.seeds, verifier, num_steps=cfg.sample.num_steps,
                       guidance=cfg.sample.guidance, out_dir=out / split.replace(" ", "_").replace("-", "_"),
                       batch_size=64)
        results[split] = _accuracy(res.rows, VERIFIER)
        p_values[split] = strict_gain_p(res.rows, VERIFIER)
        grids[split] = res
    held = grids["held-out"]
    first = {}
    for v in ("base", "aligned"):  # the first seed of the first 12 held-out prompts, same noise in both rows
        recs = [r for r in held.records if r["variant"] == v]
        idx = [i for i, r in enumerate(recs) if r["seed"] == recs[0]["seed"]][:12]
        first[v] = held.images(v)[idx].float() / 255
    save_grid(first, splits["held-out"][:12], out / "before_after.png")

    print("[3/3] Gallery and summary", flush=True)
    gallery = build_gallery(out / "held_out", logs=[Path(cfg.output_dir) / "metrics.jsonl"])
    table = before_after_table(results, p_values)
    logs = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    samples = max((r.get("samples", 0) for r in logs), default=0)  # cumulative training samples
    summary = {"recipe": args.recipe, "train_minutes": round(train_minutes, 2),
               "total_minutes": round((time.time() - t0) / 60, 2), "checkpoint": str(ckpts[-1]),
               "train_samples": samples, "train_images_per_s": round(samples / max(train_minutes * 60, 1e-9), 2),
               "accuracy": results, "strict_gain_p": p_values}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(table + "\n")
    print("\n" + table + "\n")
    print(f"gallery: {gallery}\ngrid:    {out / 'before_after.png'}\nsummary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(demo_main())
