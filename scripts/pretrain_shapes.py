#!/usr/bin/env python
"""Pretrain the shapes-world model by flow matching on rendered images; ship it with ``save_pretrained``.

Objective (rectified flow, diffusers convention): for a rendered image ``x_0`` in [-1, 1], ``eps ~ N(0, I)``,
``sigma ~ U(0, 1)``: ``x_t = (1 - sigma) x_0 + sigma eps`` and
``L = || v_theta(x_t, 1000 sigma, text) - (eps - x_0) ||^2``, the text replaced by ``""`` with probability
``--cond-drop`` (classifier-free guidance). The transformer and the tiny CLIP text encoder are trained jointly
(AdamW, linear warm-up, grad-norm clip 1), with an EMA of the weights (``decay_n = min((1+n)/(10+n), --ema)``);
the EMA weights are what gets evaluated and saved.

Every ``--eval-minutes`` the EMA model samples the held-out prompts (Euler ODE, ``--eval-steps`` steps, CFG 1 and
``--eval-cfg``, fixed seeds) and ``shapes_geneval`` scores them; the numbers go to ``--log`` (JSONL) and the EMA
pipeline is saved atomically (temp dir, then rename) to ``--out`` together with ``TRAINING.json`` (config, steps,
images seen, accuracy curve). Data and noise come from generators seeded with ``--seed``: with ``--max-steps`` the
run is reproducible step for step; ``--minutes`` bounds wall time (the step count reached is recorded).

    nohup nice -n 10 .venv/bin/python scripts/pretrain_shapes.py --minutes 50 > /work/pretrain.log 2>&1 &
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting waste most of their time on an oversubscribed machine (measured here:
# 2 threads, load 8 on 2 cores -> 7 CPU-s and 25 s per step spinning vs 0.6 CPU-s and 1.5 s passive); set it before
# torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flowalign import shapes as W
from flowalign.pipelines.shapes import ShapesPipeline, build_pipeline
from flowalign.rewards.shapes import ShapesGenEval

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=50.0, help="wall-clock budget of the training loop")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="seeds model init, data, noise and timesteps")
    p.add_argument("--level", type=int, default=1, help="world level (flowalign.shapes.LEVELS)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200, help="linear lr warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay cap")
    p.add_argument("--cond-drop", type=float, default=0.1, help="probability of training on the empty prompt")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--shift", type=float, default=1.0, help="scheduler shift")
    p.add_argument("--init", type=str, default=None, help="start from a saved pipeline folder instead of random")
    p.add_argument("--eval-minutes", type=float, default=5.0, help="evaluate + checkpoint every this many minutes")
    p.add_argument("--eval-per-prompt", type=int, default=2, help="samples per held-out prompt (periodic evals)")
    p.add_argument("--final-per-prompt", type=int, default=8, help="samples per held-out prompt (final eval)")
    p.add_argument("--state", type=str, default=str(ROOT / "outputs" / "pretrain_shapes" / "state.pt"),
                   help="training state (optimizer, EMA, step, RNGs) written at every eval, for --resume")
    p.add_argument("--resume", action="store_true", help="continue from --state (the budget counts anew)")
    p.add_argument("--eval-steps", type=int, default=10, help="Euler steps when evaluating")
    p.add_argument("--eval-cfg", type=float, default=3.0, help="the second guidance scale evaluated (1 is always)")
    p.add_argument("--out", type=str, default=str(ROOT / "pipelines" / "weights" / "shapes"))
    p.add_argument("--log", type=str, default=str(ROOT / "outputs" / "pretrain_shapes" / "log.jsonl"),
                   help="JSONL metrics")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-only", action="store_true",
                   help="no training: evaluate the pipeline in --out (--final-per-prompt samples per prompt) and "
                        "update the accuracy in its TRAINING.json")
    return p.parse_args(argv)


class EMA:
    """``shadow <- d shadow + (1 - d) param``, ``d = min((1 + n) / (10 + n), decay)``."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, n: int) -> None:
        d = min((1 + n) / (10 + n), self.decay)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)


@torch.no_grad()
def evaluate(pipe: ShapesPipeline, verifier: ShapesGenEval, prompts: list[str], per_prompt: int, steps: int,
             guidance: float, seed: int) -> dict[str, float]:
    """Strict / partial verifier accuracy of ODE samples (fixed seed) over ``prompts x per_prompt``."""
    strict, partial = [], []
    verifier_p = ShapesGenEval(mode="partial", level=verifier.world)
    g = torch.Generator().manual_seed(seed)
    chunk = 64
    flat = [p for p in prompts for _ in range(per_prompt)]
    for i in range(0, len(flat), chunk):
        ps = flat[i : i + chunk]
        imgs = pipe(ps, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="pt").images
        strict.append(verifier(imgs, ps))
        partial.append(verifier_p(imgs, ps))
    s, p = torch.cat(strict), torch.cat(partial)
    # per-prompt means, for a standard error over prompts
    sp = s.view(len(prompts), per_prompt).mean(1)
    return {"strict": float(s.mean()), "partial": float(p.mean()),
            "strict_se": float(sp.std() / math.sqrt(len(prompts))) if len(prompts) > 1 else 0.0}


def evaluate_all(pipe: ShapesPipeline, verifier: ShapesGenEval, heldout: list[str], train_eval: list[str], k: int,
                 args: argparse.Namespace) -> dict:
    """Held-out accuracy at CFG 1 and ``--eval-cfg``, train-prompt accuracy at CFG 1 (``k`` samples per prompt)."""
    rec: dict = {"per_prompt": k}
    for gname, g in (("cfg1", 1.0), (f"cfg{args.eval_cfg:g}", args.eval_cfg)):
        r = evaluate(pipe, verifier, heldout, k, args.eval_steps, g, seed=1234)
        rec.update({f"heldout_{gname}_{m}": round(v, 4) for m, v in r.items()})
    r = evaluate(pipe, verifier, train_eval, k, args.eval_steps, 1.0, seed=1234)
    rec.update({f"train_cfg1_{m}": round(v, 4) for m, v in r.items()})
    return rec


def eval_only(args: argparse.Namespace) -> None:
    """Re-measure a saved pipeline (e.g. after a verifier change) and update its TRAINING.json atomically."""
    out = Path(args.out)
    info_path = out / "TRAINING.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    level = info.get("level", args.level)
    cfg = W.WorldConfig.from_dict(info["world"]) if "world" in info else W.LEVELS[level]
    pipe = ShapesPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    seed = info.get("args", {}).get("seed", args.seed)
    heldout = W.prompts(cfg, "heldout")
    train_eval = W.eval_prompts(cfg, "train", n=len(heldout), seed=seed)
    t = time.time()
    rec = evaluate_all(pipe, ShapesGenEval(mode="strict", level=cfg), heldout, train_eval, args.final_per_prompt,
                       args)
    rec["eval_seconds"] = round(time.time() - t, 1)
    print(json.dumps(rec), flush=True)
    info["heldout_accuracy"] = {k: v for k, v in rec.items() if k.startswith("heldout_")}
    info["train_prompt_accuracy"] = {k: v for k, v in rec.items() if k.startswith("train_")}
    info["accuracy_per_prompt"] = rec["per_prompt"]
    info["reevaluated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    info["reevaluated_note"] = ("heldout_accuracy / train_prompt_accuracy re-measured by --eval-only with the current "
                                "verifier; the curve keeps the values measured during training")
    tmp = info_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, info_path)


def save_atomic(pipe: ShapesPipeline, out: Path, info: dict) -> None:
    """``save_pretrained`` into ``out.tmp``, then swap it in place of ``out`` (never a half-written folder)."""
    tmp = out.with_name(out.name + ".tmp")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "TRAINING.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.eval_only:
        return eval_only(args)
    torch.manual_seed(args.seed)
    cfg = W.LEVELS[args.level]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a")

    def emit(rec: dict) -> None:
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(json.dumps(rec), flush=True)

    if args.init:
        pipe = ShapesPipeline.from_pretrained(args.init)
    else:
        pipe = build_pipeline(seed=args.seed, num_layers=args.layers, width=args.width, patch_size=args.patch,
                              shift=args.shift)
    pipe.set_progress_bar_config(disable=True)
    tr, te = pipe.transformer, pipe.text_encoder
    tr.train()
    te.train()
    params = [p for m in (tr, te) for p in m.parameters()]
    n_params = {"transformer": sum(p.numel() for p in tr.parameters()),
                "text_encoder": sum(p.numel() for p in te.parameters())}
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    ema = EMA(params, args.ema)
    eval_pipe = copy.deepcopy(pipe)
    eval_params = [p for m in (eval_pipe.transformer, eval_pipe.text_encoder) for p in m.parameters()]
    eval_pipe.transformer.eval()
    eval_pipe.text_encoder.eval()
    verifier = ShapesGenEval(mode="strict", level=cfg)
    heldout = W.prompts(cfg, "heldout")
    train_eval = W.eval_prompts(cfg, "train", n=len(heldout), seed=args.seed)

    data_rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    config = {"args": vars(args), "world": cfg.to_dict(), "level": args.level, "n_params": n_params,
              "objective": "rectified flow, v = eps - x0, sigma ~ U(0,1), MSE",
              "heldout_prompts": len(heldout), "torch": torch.__version__}
    emit({"event": "start", **config})
    curve: list[dict] = []
    t0 = time.time()
    last_eval = t0
    step = 0
    seen = 0
    loss_avg = None
    if args.resume:
        st = torch.load(args.state, weights_only=False)
        with torch.no_grad():
            for p, v in zip(params, st["model"]):
                p.copy_(v)
        ema.shadow = [v.clone() for v in st["ema"]]
        opt.load_state_dict(st["opt"])
        step, seen, curve, loss_avg = st["step"], st["seen"], st["curve"], st["loss_avg"]
        gen.set_state(st["gen"])
        data_rng.bit_generator.state = st["data_rng"]
        prior_min = float(st.get("minutes", curve[-1]["minutes"] if curve else 0.0))
        t0 -= prior_min * 60  # minutes in the log stay cumulative over resumed runs
        emit({"event": "resume", "step": step, "images": seen, "minutes": prior_min})

    def do_eval(final: bool = False) -> None:
        with torch.no_grad():
            for dst, src in zip(eval_params, ema.shadow):
                dst.copy_(src)
        te0 = time.time()
        rec = {"event": "eval", "step": step, "images": seen, "minutes": round((time.time() - t0) / 60, 2)}
        k = args.final_per_prompt if final else args.eval_per_prompt
        rec.update(evaluate_all(eval_pipe, verifier, heldout, train_eval, k, args))
        rec["eval_seconds"] = round(time.time() - te0, 1)
        rec["loss_ema"] = loss_avg
        curve.append(rec)
        emit(rec)
        info = {**config, "steps": step, "images_seen": seen, "train_minutes": rec["minutes"], "final": final,
                "eval": {"prompts": "heldout split (all prompts) x eval_per_prompt", "sampler": "Euler ODE",
                         "steps": args.eval_steps, "seed": 1234},
                "heldout_accuracy": {k: v for k, v in rec.items() if k.startswith("heldout_")},
                "train_prompt_accuracy": {k: v for k, v in rec.items() if k.startswith("train_")},
                "accuracy_per_prompt": rec["per_prompt"],
                "curve": curve}
        save_atomic(eval_pipe, out, info)
        state = Path(args.state)
        state.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": [p.detach() for p in params], "ema": ema.shadow, "opt": opt.state_dict(), "step": step,
                    "seen": seen, "gen": gen.get_state(), "data_rng": data_rng.bit_generator.state, "curve": curve,
                    "loss_avg": loss_avg, "minutes": (time.time() - t0) / 60}, str(state) + ".tmp")
        os.replace(str(state) + ".tmp", state)

    budget = (time.time() - t0) + args.minutes * 60  # --minutes more, also when resuming
    while True:
        if args.max_steps is not None and step >= args.max_steps:
            break
        if time.time() - t0 > budget:
            break
        batch = W.make_batch(cfg, args.batch_size, data_rng)
        x0 = batch.images * 2 - 1
        prompts = list(batch.prompts)
        drop = torch.rand(len(prompts), generator=gen) < args.cond_drop
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        sigma = torch.rand(len(prompts), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * eps
        target = eps - x0
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for gr in opt.param_groups:
            gr["lr"] = lr
        ids = pipe.tokenize(prompts)
        enc = te(ids)
        v = tr(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=enc.last_hidden_state,
               pooled_projections=enc.pooler_output, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        step += 1
        seen += len(prompts)
        lv = loss.item()
        loss_avg = lv if loss_avg is None else round(0.98 * loss_avg + 0.02 * lv, 5)
        if step % 50 == 0:
            el = time.time() - t0
            emit({"event": "train", "step": step, "loss": round(lv, 5), "loss_ema": loss_avg,
                  "grad_norm": round(float(gnorm), 4), "lr": lr, "img_per_s": round(seen / el, 1),
                  "minutes": round(el / 60, 2)})
        if time.time() - last_eval > args.eval_minutes * 60:
            do_eval()
            last_eval = time.time()
    do_eval(final=True)
    emit({"event": "done", "steps": step, "images": seen, "minutes": round((time.time() - t0) / 60, 2)})


if __name__ == "__main__":
    sys.exit(main())
