"""Trainer overhead: one Flow-GRPO iteration through ``flowalign.trainer.Trainer`` vs the same work as a plain loop.

Tiny SD3 (CFG 4.5 inside the trained policy, KL beta 0.01, flow_sde, 6 steps, 5 trained) and tiny FLUX (embedded
guidance 3.5, Fast: CPS window of 3 steps, beta 0); 2 prompts x group 4 per round, chunks of 4, 2 optimizer steps
per iteration, LoRA rank 4, redness reward, CPU fp32.

* ``trainer``: ``Trainer.step()`` with everything on (accelerate, EMA, background reward thread, metrics, JSONL).
* ``plain``: a straight loop doing the same forward/backward work: ``rollout.sample`` per chunk, reward, group
  advantages, then per update and micro-batch (rows x trained step): predict, log-prob, PPO clip (+ KL under
  disabled adapters), backward; clip grad norm; AdamW. No accelerate, EMA, threads or logging.

Contenders alternate (ABBA) after a warm-up; ``overhead`` is the median over rounds of trainer/plain (paired, so
the load drifts of a shared machine cancel), for wall and process-CPU time. Phase times (sample / reward / train)
are medians. Goal: overhead <= 1.05. Writes ``benchmarks/results/train_step.json``.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import format_table, interleaved, median, paired_ratio, write_json  # noqa: E402

from flowalign import sde  # noqa: E402
from flowalign.advantages import grpo  # noqa: E402
from flowalign.config import load_config  # noqa: E402
from flowalign.losses import gaussian_kl, ppo_clip  # noqa: E402
from flowalign.methods.base import generator  # noqa: E402
from flowalign.pipelines import tiny  # noqa: E402
from flowalign.rollout import sample  # noqa: E402
from flowalign.schedules import make_plan  # noqa: E402
from flowalign.trainer import (Trainer, apply_lora, build_adapter, build_reward, lora_disabled,  # noqa: E402
                               lora_settings, tuner_layers)

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "three purple stars"]
GOAL = 1.05
SETTINGS = {
    "sd3": {"sample": {"guidance": 4.5, "kernel": "flow_sde", "noise_level": 0.7, "schedule": "all",
                       "schedule_options": {"fraction": 0.99}},
            "train": {"beta": 0.01}},
    "flux": {"sample": {"guidance": 3.5, "kernel": "cps", "noise_level": 0.8, "schedule": "window",
                        "schedule_options": {"size": 3, "lo": 0, "hi": 3}, "density": "unnormalized"},
             "train": {"beta": 0.0, "clip_range": 1e-5}},
}


def make_cfg(family: str, out: str):
    s = SETTINGS[family]
    return load_config({
        "model": {"adapter": family, "path": tiny.cached(family), "kwargs": dict(tiny.RESOLUTION[family]),
                  "lora": {"rank": 4}},
        "sample": {"prompts": PROMPTS, "prompts_per_round": 2, "group_size": 4, "num_steps": 6, "batch_size": 4,
                   **s["sample"]},
        "reward": {"weights": {"redness": 1.0}},
        "train": {"lr": 1e-3, "updates_per_iteration": 2, **s["train"]},
        "output_dir": out, "max_iterations": 1000, "log": {"progress": False},
        "checkpoint": {"save_final": False},
    })


class PlainLoop:
    """The same iteration written straight, as a flow_grpo-style script would (the baseline)."""

    def __init__(self, cfg) -> None:
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.adapter = build_adapter(cfg, "cpu")
        self.module = self.adapter.trainable_module()
        apply_lora(self.module, lora_settings(cfg, self.adapter))
        self.layers = tuner_layers(self.module)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()
        t = cfg.train
        self.opt = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                     eps=t.adam_eps)
        self.reward = build_reward(cfg, "cpu")
        self.it = 0
        self.times: dict[str, list[float]] = {"sample": [], "reward": [], "train": []}

    def iteration(self) -> None:
        cfg, s, t = self.cfg, self.cfg.sample, self.cfg.train
        G, bs = s.group_size, s.batch_size
        t0 = time.perf_counter()
        ids = [(self.it * s.prompts_per_round + k) % len(PROMPTS) for k in range(s.prompts_per_round)]
        plan = make_plan(s.schedule, s.num_steps, generator=generator(cfg.seed, "plan", self.it), **s.schedule_options)
        trajs = []
        per_chunk = bs // G
        self.module.eval()
        with torch.no_grad():
            for c in range(len(ids) // per_chunk):
                ps = [PROMPTS[i] for i in ids[c * per_chunk:(c + 1) * per_chunk]]
                tr = sample(self.adapter, ps, group_size=G, num_steps=s.num_steps, kernel=s.kernel,
                            noise_level=s.noise_level, plan=plan, guidance=s.guidance,
                            generator=generator(cfg.seed, "sample", self.it, c), batch_size=bs, density=s.density)
                trajs.append(tr)
        t1 = time.perf_counter()
        rewards = torch.cat([self.reward(tr.images.clamp(0, 1), tr.sample_prompts) for tr in trajs])
        adv = grpo(rewards, G)
        t2 = time.perf_counter()
        self.module.train()
        latents = torch.cat([tr.latents for tr in trajs])
        old = torch.cat([tr.log_probs for tr in trajs])
        from flowalign.adapter import Cond

        cond = Cond.cat([tr.cond for tr in trajs])
        sig = trajs[0].sigmas
        steps = plan.trained_indices()
        order = torch.randperm(len(adv), generator=generator(cfg.seed, "shuffle", self.it, 0))
        for part in torch.tensor_split(order, t.updates_per_iteration):
            for i in range(0, len(part), bs):
                rows = part[i:i + bs]
                for j in steps:
                    x, x1, cd = latents[rows, j], latents[rows, j + 1], cond.index(rows)
                    out = self.adapter.predict(x, sig[j], cd, s.guidance)
                    new = sde.log_prob_of(s.kernel, x, x1, out, sig[j], sig[j + 1], s.noise_level, density=s.density)
                    a = adv[rows].clamp(-t.adv_clip_max, t.adv_clip_max)
                    loss, _ = ppo_clip(new.log_prob, old[rows, j], a, clip_range=t.clip_range)
                    if t.beta > 0:
                        with torch.no_grad(), lora_disabled(self.module, self.layers):
                            ref = self.adapter.predict(x, sig[j], cd, s.guidance)
                        mref, _ = sde.mean_std(s.kernel, x, ref, sig[j], sig[j + 1], s.noise_level)
                        loss = loss + t.beta * gaussian_kl(new.mean, mref, new.std, sig[j + 1] - sig[j], form=t.kl)
                    (loss.sum() / (len(part) * len(steps))).backward()
            torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        for k, v in zip(("sample", "reward", "train"), (t1 - t0, t2 - t1, t3 - t2)):
            self.times[k].append(v)
        self.it += 1


def bench_family(family: str, repeats: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = make_cfg(family, out)
        trainer = Trainer(cfg)
        plain = PlainLoop(cfg)
        recs: list[dict] = []
        times = interleaved({"trainer": lambda: recs.append(trainer.step()), "plain": plain.iteration},
                            repeats=repeats, warmup=warmup)
        trainer.method.close()
    recs = recs[warmup:]
    tphase = {k: median([r[f"time/{k}"] for r in recs]) for k in ("sample", "reward", "train")}
    tphase["reward"] = median([r["time/reward_wait"] for r in recs])  # the reward runs in a thread; this is the wait
    pphase = {k: median(v[warmup:]) for k, v in plain.times.items()}
    return {
        "family": family, "repeats": repeats,
        "trainer_s": median(times["trainer"]["wall"]), "plain_s": median(times["plain"]["wall"]),
        "overhead": paired_ratio(times["trainer"]["wall"], times["plain"]["wall"]),
        "overhead_cpu": paired_ratio(times["trainer"]["cpu"], times["plain"]["cpu"]),
        "trainer_phases_s": tphase, "plain_phases_s": pphase,
        "trainer_reward_compute_s": median([r["time/reward"] for r in recs]),
        "raw": {k: v for k, v in times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--families", nargs="+", default=["sd3", "flux"])
    ap.add_argument("--out", default="train_step")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = [bench_family(f, args.repeats, args.warmup) for f in args.families]
    rows = [{"model": r["family"], "trainer s/it": r["trainer_s"], "plain s/it": r["plain_s"],
             "overhead (wall)": r["overhead"], "overhead (cpu)": r["overhead_cpu"],
             "sample (tr/plain)": f"{r['trainer_phases_s']['sample']:.3f}/{r['plain_phases_s']['sample']:.3f}",
             "reward (tr wait/plain)": f"{r['trainer_phases_s']['reward']:.4f}/{r['plain_phases_s']['reward']:.4f}",
             "train (tr/plain)": f"{r['trainer_phases_s']['train']:.3f}/{r['plain_phases_s']['train']:.3f}"}
            for r in results]
    print(format_table(rows))
    ok = all(r["overhead_cpu"] <= GOAL for r in results)
    print(f"goal: trainer/plain <= {GOAL} (process CPU time, paired): {'met' if ok else 'NOT met'}")
    path = write_json(args.out, {"benchmark": "train_step", "goal": GOAL, "goal_met": ok,
                                 "command": "OMP_NUM_THREADS=1 python benchmarks/train_step.py", "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
