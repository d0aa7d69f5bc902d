"""``flowalign eval`` and ``flowalign gallery`` (wired into ``flowalign/cli.py`` as ``eval_main``/``gallery_main``).

    flowalign eval --model sd3:/models/sd3.5m --lora runs/a/ckpt-300 runs/b/ckpt-300 \\
        --prompts prompts.txt --rewards pickscore,clip_score --seeds 0-3 --out evals/sd3 \\
        --optimized pickscore --held-out clip_score --gallery
    flowalign gallery evals/sd3 --logs runs/a/metrics.jsonl runs/b/metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
import yaml

from flowalign.data import load_prompts
from flowalign.eval.generate import build_rewards, parse_seeds, run_eval
from flowalign.eval.media import load_png
from flowalign.eval.models import variants_from_args
from flowalign.eval.metrics import diversity, feature_fn, summarize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model_kwargs(items: Sequence[str]) -> dict:
    """``["height=512", "num_frames=33"]`` -> ``{"height": 512, "num_frames": 33}`` (YAML scalars)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise ValueError(f"--model-arg {item!r}: expected KEY=VALUE, e.g. height=512")
        out[key] = yaml.safe_load(value)
    return out


def _reward_kwargs(items: Sequence[str]) -> dict[str, dict]:
    """``["clip_score.model=/ckpt/clip", "pickscore.batch_size=8"]`` -> ``{"clip_score": {"model": ..., ...}}``
    (values parsed as YAML scalars)."""
    out: dict[str, dict] = defaultdict(dict)
    for item in items:
        key, eq, value = item.partition("=")
        name, dot, arg = key.rpartition(".")
        if not eq or not dot or not name or not arg:
            raise ValueError(f"--reward-arg {item!r}: expected REWARD.KEY=VALUE, e.g. clip_score.model=/ckpt/clip")
        out[name][arg] = yaml.safe_load(value)
    return dict(out)


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowalign eval", description="Deterministic generation and scoring of a base "
                                "model and its LoRA checkpoints (same seeds, same initial noise), resumable.")
    p.add_argument("--model", required=True, help="base model: ADAPTER:PATH (e.g. sd3:/models/sd3.5m) or a diffusers "
                   "folder whose model_index.json names the pipeline")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="adapter argument, e.g. height=512 or num_frames=33 (repeatable)")
    p.add_argument("--lora", nargs="*", default=[], help="trained weights, one variant each: flowalign checkpoint "
                   "folders (checkpoint-N/), peft folders or .safetensors files")
    p.add_argument("--raw-weights", action="store_true",
                   help="use a checkpoint's raw weights.safetensors instead of its EMA weights")
    p.add_argument("--names", nargs="*", default=None, help="variant names: base first, then one per --lora")
    p.add_argument("--prompts", required=True, help="prompts file: .txt (one per line), .jsonl ({'prompt': ...}) or .csv (a 'prompt' column)")
    p.add_argument("--rewards", default="", help="comma-separated rewards from flowalign.rewards (or module:attr)")
    p.add_argument("--reward-arg", action="append", default=[], metavar="REWARD.KEY=VALUE",
                   help="constructor argument of a reward, e.g. clip_score.model=/ckpt/clip (repeatable)")
    p.add_argument("--seeds", default="0-3", help="seeds, e.g. 0-3 or 0,5,7-9 (default 0-3)")
    p.add_argument("--steps", type=int, default=40, help="sampling steps, deterministic kernel (default 40)")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale (default 1.0: no CFG)")
    p.add_argument("--negative-prompt", default="", help="negative prompt for CFG (default empty)")
    p.add_argument("--batch-size", type=int, default=8, help="images per denoiser batch (default 8)")
    p.add_argument("--fps", type=int, default=8, help="frame rate of written videos (default 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--out", required=True, help="output folder; rerunning with the same folder resumes")
    p.add_argument("--optimized", default=None, help="the reward that was optimised (for the reward-hacking report)")
    p.add_argument("--held-out", default=None, help="a held-out reward not optimised (for the reward-hacking report)")
    p.add_argument("--verifier", action="append", default=None,
                   help="reward(s) valued as a verifier's pass fraction, for strict/partial accuracy "
                        "(default: shapes*, geneval when scored)")
    p.add_argument("--diversity", default="pixels", help="features for diversity: pixels, or a reward with "
                   "image_features such as clip_score (default pixels)")
    p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--gallery", action="store_true", help="also build <out>/index.html")
    p.add_argument("--logs", nargs="*", default=[], help="trainer JSONL logs to plot in the gallery")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Run ``flowalign eval``; prints the summary table and writes results, metrics and (optionally) a gallery."""
    args = eval_parser().parse_args(argv)
    try:
        rewards_list = [r.strip() for r in args.rewards.split(",") if r.strip()]
        if (args.optimized is None) != (args.held_out is None):
            raise ValueError("--optimized and --held-out go together (the reward-hacking report needs both)")
        for name, arg in ((args.optimized, "--optimized"), (args.held_out, "--held-out")):
            if name is not None and name not in rewards_list:
                raise ValueError(f"{arg} {name!r} must be one of --rewards {rewards_list}")
        parse_seeds(args.seeds)
        # --prompts is always a file: read it before loading any model, so a missing, empty or unknown-suffix file
        # (or a CSV without a `prompt` column) is an error here, never a prompt made of the path string
        load_prompts(args.prompts, "--prompts")
        variants = variants_from_args(args.model, args.lora, args.names, args.device, DTYPES[args.dtype],
                                      use_ema=not args.raw_weights, model_kwargs=_model_kwargs(args.model_arg))
        rewards = build_rewards(rewards_list, _reward_kwargs(args.reward_arg))
        embed = feature_fn(args.diversity, rewards)
    except ValueError as e:
        print(f"flowalign eval: error: {e}", file=sys.stderr)
        return 2
    result = run_eval(variants, args.prompts, args.seeds, rewards, num_steps=args.steps, guidance=args.guidance,
                      negative_prompt=args.negative_prompt, out_dir=args.out, batch_size=args.batch_size, fps=args.fps,
                      reward_kwargs=None, progress=not args.quiet,
                      extra_config={"optimized": args.optimized, "held_out": args.held_out, "verifiers": args.verifier})
    out = Path(args.out)
    summary = summarize(result.rows, result.variants[0], optimized=args.optimized, held_out=args.held_out,
                        verifiers=args.verifier, n_resamples=args.bootstrap)
    div = {}
    for variant in result.variants:
        by_prompt = defaultdict(list)
        for rec in result.records:
            if rec["variant"] == variant:
                by_prompt[rec["prompt_idx"]].append(load_png(out / (rec.get("poster") or rec["image"])))
        if any(len(v) > 1 for v in by_prompt.values()):
            div[variant] = diversity({k: torch.stack(v) for k, v in by_prompt.items()}, embed).as_dict()
    (out / "metrics.json").write_text(json.dumps({**summary, "diversity": div, "diversity_features": args.diversity},
                                                 indent=2))
    _print_summary(summary, div)
    if args.gallery:
        from flowalign.eval.gallery import build_gallery

        page = build_gallery(out, logs=args.logs, summary=summary)
        print(f"gallery: {page.as_uri()}")
    return 0


def _print_summary(summary: dict, div: dict) -> None:
    print(f"{'reward':<18} {'variant':<16} {'mean [95% CI]':<28} {'gain over base':<28} win rate")
    for e in summary["table"]:
        m = e["mean"]
        gain = f"{e['gain']['mean']:+.4g} [{e['gain']['lo']:+.4g}, {e['gain']['hi']:+.4g}]" if "gain" in e else "-"
        win = f"{e['win_rate']['mean'] * 100:.1f}%" if "win_rate" in e else "-"
        print(f"{e['reward']:<18} {e['variant']:<16} {m['mean']:.4g} [{m['lo']:.4g}, {m['hi']:.4g}]".ljust(64)
              + f"{gain:<28} {win}")
    for name, per in summary["accuracy"].items():
        for v, acc in per.items():
            print(f"accuracy {name} {v}: strict {acc['strict']['mean']:.3f} partial {acc['partial']['mean']:.3f}")
    for v, d in div.items():
        print(f"diversity {v}: {d['mean']:.4g} [{d['lo']:.4g}, {d['hi']:.4g}]")
    for h in summary["hacking"]:
        print(f"reward hacking {h['variant']}: {'FLAGGED' if h['flagged'] else 'ok'} "
              f"({h['optimized']} {h['optimized_gain']['mean']:+.4g}, "
              f"{h['held_out']} {h['held_out_gain']['mean']:+.4g})")


def gallery_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowalign gallery", description="Static HTML gallery of an eval folder "
                                "(opens offline from disk).")
    p.add_argument("eval_dir", help="folder written by `flowalign eval --out`")
    p.add_argument("--out", default=None, help="page path (default <eval_dir>/index.html)")
    p.add_argument("--logs", nargs="*", default=[], help="trainer JSONL logs whose curves are embedded")
    p.add_argument("--title", default=None)
    p.add_argument("--thumb", type=int, default=192, help="cell size in pixels (default 192)")
    p.add_argument("--plot-format", default="svg", choices=["svg", "png"])
    p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    return p


def gallery_main(argv: Sequence[str] | None = None) -> int:
    """Run ``flowalign gallery``; prints the page's file:// URL."""
    from flowalign.eval.gallery import build_gallery

    args = gallery_parser().parse_args(argv)
    try:
        page = build_gallery(args.eval_dir, args.out, logs=args.logs, title=args.title, thumb_px=args.thumb,
                             n_resamples=args.bootstrap, plot_format=args.plot_format)
    except ValueError as e:
        print(f"flowalign gallery: error: {e}", file=sys.stderr)
        return 2
    print(page.as_uri())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(eval_main())
