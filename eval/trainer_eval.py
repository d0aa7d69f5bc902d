"""The trainer's periodic eval through ``flowalign.eval`` (no second implementation).

This is the default ``eval.fn``. Every ``eval.every`` iterations the
trainer (with the EMA weights swapped in when ``eval.use_ema``) calls ``trainer_eval(trainer)``, which samples
``eval.prompts`` deterministically (``evaluate``: per-prompt noise from ``torch.Generator().manual_seed(eval.seed)``
-- the same noise at every iteration, so curves compare like with like), scores them with each component of the
run's reward, and writes images + tidy rows under ``<output_dir>/eval/iter-<N>/`` (open one with
``flowalign gallery``). Prompts are dealt round-robin to processes and the means all-reduced.

Keys: ``eval/reward`` (the weighted total) and ``eval/reward_<name>``.
"""

from __future__ import annotations

from typing import Any

import torch

from flowalign.data import RewardFn, load_prompts
from flowalign.eval.generate import evaluate


def trainer_eval(trainer: Any) -> dict[str, float]:
    """``eval.fn`` for ``flowalign.trainer.Trainer``: mean reward and components of deterministic samples."""
    cfg, e, rt = trainer.cfg, trainer.cfg.eval, trainer.runtime
    prompts, meta = load_prompts(e.prompts, "eval.prompts")
    if e.kernel not in ("ode", "ddim") or e.noise_level != 0:
        raise ValueError(f"eval.kernel={e.kernel!r} with noise_level={e.noise_level}: flowalign.eval samples "
                         "deterministically; set eval.kernel=ode (ddim for epsilon models) and eval.noise_level=0")
    mine = list(range(rt.rank, len(prompts), rt.world_size))
    reward: RewardFn = trainer.reward_fn
    components = dict(getattr(reward, "components", None) or {"reward": reward})
    weights = dict(getattr(reward, "weights", None) or {"reward": 1.0})
    it = trainer.state.iteration
    out_dir = trainer.output_dir / "eval" / f"iter-{it:06d}"
    if rt.world_size > 1:
        out_dir = out_dir / f"rank-{rt.rank}"
    sums = torch.zeros(len(components) + 1, dtype=torch.float64)
    if mine:
        records = [{"prompt": prompts[i], **dict(meta[i] or {})} for i in mine]
        res = evaluate(trainer.adapter, records, [e.seed], components, num_steps=e.num_steps,
                       guidance=cfg.sample.guidance if e.guidance is None else e.guidance, out_dir=out_dir,
                       variant=f"iter-{it}", fingerprint=f"{cfg.seed}:iter{it}:{'ema' if e.use_ema else 'raw'}",
                       negative_prompt=cfg.sample.negative_prompt, batch_size=e.batch_size)
        for j, name in enumerate(components):
            sums[j] = sum(r["value"] for r in res.rows if r["reward"] == name)
        sums[-1] = len(mine)
    sums = trainer.all_reduce_sum(sums)
    n = max(float(sums[-1]), 1.0)
    means = {name: float(sums[j]) / n for j, name in enumerate(components)}
    out = {"eval/reward": sum(weights.get(k, 1.0) * v for k, v in means.items())}
    if set(components) != {"reward"}:
        out.update({f"eval/reward_{k}": v for k, v in means.items()})
    return out
