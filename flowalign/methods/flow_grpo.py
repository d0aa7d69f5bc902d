"""Flow-GRPO (Liu et al., arXiv 2505.05470): group-relative PPO on the SDE rollouts of a flow model.

One iteration (flow_grpo ``scripts/train_sd3.py``, reference survey §2):

1. **Sample.** ``prompts_per_round`` prompts (same list on every process), ``group_size`` samples each, in
   group-major row order; the ``B`` rows are cut into chunks of ``sample.batch_size`` and process ``r`` samples
   the contiguous chunk range ``r``. Chunk ``c`` draws its noise from a generator seeded by
   ``(seed, iteration, c)``, so a row's trajectory does not depend on the process count, and groups may straddle
   processes. The step plan (which steps are SDE / trained; Fast window) is drawn once per round from a shared
   seed, so every member of a group gets the same window (flow_grpo draws it per GPU).
2. **Score** each chunk in a background thread while the next chunk samples; all-gather the rewards.
3. **Advantages** over the whole round (``flowalign.advantages``), zero-std groups dropped and logged.
4. **Micro-batches.** The kept rows are shuffled with a shared seed and split into ``updates_per_iteration``
   parts (one optimizer step each, flow_grpo: 2); each process trains its own rows of a part, in micro-batches
   of ``train_batch_size`` rows x one trained timestep (flow_grpo's accumulation over samples x timesteps).
5. **Loss** per row and step: PPO clip on ``ratio = exp(logp_theta - logp_old)`` with advantages clipped to
   ``adv_clip_max`` + ``beta`` x KL to the reference (LoRA disabled, no grad), weighted by
   ``1 / (rows of the update over all processes x trained steps)``.

Recipes, not new methods: DanceGRPO = ``kernel: dance`` + ``same_noise`` + ``schedule: subsample`` (+
``method_options.best_worst_k``: train only the best and worst ``k`` of each group, DanceGRPO ``--bestofn``);
MixGRPO = ``schedule: sliding`` (+ ``method_options.ode_solver: dpm2`` / ``post_compress``: MixGRPO-Flash,
``flowalign.solvers``); Flow-GRPO-Fast = ``schedule: window``; CPS = ``kernel: cps``; GRPO-Guard (arXiv 2510.22319)
= ``method_options.ratio_norm`` (the rollout keeps each step's mean; ``flowalign.losses.ratio_norm``) +
``method_options.step_reweight`` (policy loss / ``|dt|``, flow_grpo ``train_sd3_GRPO_Guard.py``); DDPO-IS (arXiv 2305.13301) =
``kernel: ddim`` on an epsilon model + ``advantage.estimator: per_prompt`` (DDPO's per-prompt stat tracking; its
history is checkpointed) + ``drop_zero_std: false`` (``recipes/sd15_ddpo_*.yaml``).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from flowalign import sde
from flowalign.advantages import ADVANTAGES, resolve_estimator, zero_std_groups
from flowalign.config import ConfigError, load_prompts
from flowalign.losses import POLICY_LOSSES, gaussian_kl, ratio_norm
from flowalign.methods.base import METHODS, Batch, Collected, Method, PromptSampler, Runtime, TrainState, generator
from flowalign.rollout import sample
from flowalign.schedules import StepPlan, make_plan
from flowalign.solvers import SOLVERS

from flowalign.adapter import Cond


@dataclass
class _Store:
    """This process's rollouts of the current iteration (rows in global order of its chunk range)."""

    latents: Tensor  # [n, N+1, ...]
    log_probs: Tensor  # [n, N]
    cond: Cond
    adv: Tensor  # [n]
    sigmas: Tensor  # [N+1]
    plan: StepPlan
    means: Tensor | None = None  # [n, N, ...] fp32 step means (GRPO-Guard ratio_norm)


def reward_parts(reward_fn, images: Tensor, prompts: list[str], metadata: list[dict]) -> tuple[Tensor, dict]:
    """Total reward ``[B]`` and its components (a ``Compose`` reports each; a plain reward is its own part)."""
    if hasattr(reward_fn, "components"):  # flowalign.rewards.Compose
        total, parts = reward_fn(images, prompts, metadata, return_components=True)
    else:
        total = reward_fn(images, prompts, metadata)
        parts = {getattr(reward_fn, "name", "reward"): total}
    return total.detach().float().cpu(), {k: v.detach().float().cpu() for k, v in parts.items()}


def best_worst(adv: Tensor, group_size: int, k: int) -> Tensor:
    """Bool ``[B]``: per group the ``k // 2`` highest- and ``k - k // 2`` lowest-advantage rows (DanceGRPO
    ``--bestofn``, ``train_grpo_hunyuan.py``: advantages use the whole group, only the extremes are trained)."""
    order = torch.argsort(adv.view(-1, group_size), dim=1, stable=True)
    mask = torch.zeros_like(order, dtype=torch.bool)
    mask.scatter_(1, order[:, : k - k // 2], True)
    mask.scatter_(1, order[:, group_size - k // 2:], True)
    return mask.view(-1)


@METHODS.register("flow_grpo")
class FlowGRPO(Method):
    """Flow-GRPO; DanceGRPO, MixGRPO, Flow-GRPO-Fast and CPS are recipes of it (kernel / schedule options)."""

    name = "flow_grpo"

    def __init__(self, cfg, adapter, reward_fn, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, adapter, reward_fn, runtime)
        s, t = cfg.sample, cfg.train
        self.prompts, self.metadata = load_prompts(s.prompts)
        self.sampler = PromptSampler(len(self.prompts), seed=cfg.seed, shuffle=s.shuffle_prompts)
        a = t.advantage
        self.adv_name, self.adv_kwargs = resolve_estimator(a.estimator, a.std, a.baseline, a.per_reward, a.eps,
                                                           a.kwargs)
        self.adv_fn = ADVANTAGES.get(self.adv_name)
        self.adv_history: dict[str, list[float]] = {}  # per_prompt (DDPO) reward history, checkpointed
        self.policy_loss = POLICY_LOSSES.get(t.method_options.get("policy_loss", "ppo_clip"))
        self.train_guidance = s.guidance if t.train_cfg else 1.0
        # MixGRPO-Flash: solver/compression of the ODE steps after the window (flowalign.solvers)
        self.sample_kw = {k: t.method_options[k] for k in ("ode_solver", "post_compress") if k in t.method_options}
        self.need_uncond = s.guidance != 1.0 or self.train_guidance != 1.0
        # GRPO-Guard: re-centred/rescaled ratio (needs the rollout's step means) and 1/|dt| step weights
        self.ratio_norm = bool(t.method_options.get("ratio_norm", False))
        self.step_reweight = bool(t.method_options.get("step_reweight", False))
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="reward") if cfg.reward.background else None
        self._store: _Store | None = None

    # ------------------------------------------------------------------------------------------ checks
    @classmethod
    def check_config(cls, cfg) -> None:
        s, t = cfg.sample, cfg.train
        if not sde.is_stochastic(s.kernel, s.noise_level):
            raise ConfigError(f"flow_grpo needs a stochastic kernel: sample.kernel={s.kernel!r} with "
                              f"sample.noise_level={s.noise_level} draws no noise, so there is no policy ratio")
        allowed = ("policy_loss", "best_worst_k", "ode_solver", "post_compress", "ratio_norm", "step_reweight")
        unknown = set(t.method_options) - set(allowed)
        if unknown:
            raise ConfigError(f"train.method_options: unknown key(s) {sorted(unknown)} for flow_grpo; "
                              f"allowed: {', '.join(allowed)}")
        for key in ("ratio_norm", "step_reweight"):
            if not isinstance(t.method_options.get(key, False), bool):
                raise ConfigError(f"train.method_options.{key} must be true or false (GRPO-Guard), "
                                  f"got {t.method_options[key]!r}")
        if t.method_options.get("ratio_norm") and s.density != "gaussian":
            raise ConfigError("train.method_options.ratio_norm (GRPO-Guard) re-centres a Gaussian log-ratio: "
                              f"it needs sample.density='gaussian', got {s.density!r}")
        k = t.method_options.get("best_worst_k")
        if k is not None and not (isinstance(k, int) and 2 <= k <= s.group_size):
            raise ConfigError(f"train.method_options.best_worst_k={k!r} must be an int in [2, sample.group_size="
                              f"{s.group_size}] (DanceGRPO --bestofn)")
        if t.method_options.get("ode_solver", "euler") not in SOLVERS:
            raise ConfigError(f"train.method_options.ode_solver={t.method_options['ode_solver']!r} is not allowed. "
                              f"Allowed: {', '.join(SOLVERS)}")
        if not 0 < float(t.method_options.get("post_compress", 1.0)) <= 1:
            raise ConfigError("train.method_options.post_compress must be in (0, 1] (MixGRPO-Flash: 0.4)")
        if "policy_loss" in t.method_options:
            try:
                POLICY_LOSSES.get(t.method_options["policy_loss"])
            except ValueError as e:
                raise ConfigError(f"train.method_options.policy_loss: {e}") from None

    def rollout_plan(self, it: int) -> StepPlan:
        """Which steps of iteration ``it``'s rollouts are SDE / trained (drawn from a shared seed)."""
        s = self.cfg.sample
        return make_plan(s.schedule, s.num_steps, generator=generator(self.cfg.seed, "plan", it), iteration=it,
                         **s.schedule_options)

    def num_chunks(self) -> int:
        return self.cfg.global_batch // self.cfg.sample.batch_size

    def check_world(self, world_size: int) -> None:
        n = self.num_chunks()
        if n % world_size:
            raise ValueError(
                f"{n} sampling chunks per round (sample.prompts_per_round * sample.group_size / sample.batch_size "
                f"= {self.cfg.global_batch} / {self.cfg.sample.batch_size}) cannot be split evenly over "
                f"{world_size} processes; make it a multiple of {world_size}")

    # ------------------------------------------------------------------------------------------ collect
    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]):
        t0 = time.perf_counter()
        total, parts = reward_parts(self.reward_fn, images, prompts, metadata)
        return total, parts, time.perf_counter() - t0

    @torch.no_grad()
    def collect(self, state: TrainState) -> Collected:
        cfg, s, rt = self.cfg, self.cfg.sample, self.runtime
        it, G, bs = state.iteration, s.group_size, s.batch_size
        t_start = time.perf_counter()
        prompt_ids = self.sampler.next(s.prompts_per_round)
        row_pid = prompt_ids.repeat_interleave(G)  # [B] global rows, group-major
        plan = self.rollout_plan(it)
        n_chunks = self.num_chunks()
        self.check_world(rt.world_size)
        per_rank = n_chunks // rt.world_size
        my_chunks = range(rt.rank * per_rank, (rt.rank + 1) * per_rank)
        row0 = my_chunks.start * bs

        # encode each prompt of this process's rows alone: a prompt's embedding then never depends on which
        # prompts share its batch (process count, resume), and the adapter's prompt cache hits across rounds
        my_pids = row_pid[row0: row0 + per_rank * bs]
        uniq = torch.unique_consecutive(my_pids)
        neg = [s.negative_prompt] if self.need_uncond else None
        with rt.autocast():
            ucond = Cond.cat([self.adapter.encode([self.prompts[i]], negative=neg) for i in uniq.tolist()])
        pos_of = {int(p): k for k, p in enumerate(uniq.tolist())}

        trajs, futures, t_sample = [], [], 0.0
        for c in my_chunks:
            rows = torch.arange(c * bs, (c + 1) * bs)
            pids = row_pid[rows]
            gen = generator(cfg.seed, "sample", it, c, device=rt.device)
            aligned = (c * bs) % G == 0 and bs % G == 0
            t0 = time.perf_counter()
            with rt.autocast():
                if aligned:  # whole groups: one row per prompt, sample() repeats them (same_noise possible)
                    gp = pids[::G]
                    cond = ucond.index(torch.tensor([pos_of[int(p)] for p in gp]))
                    traj = sample(self.adapter, [self.prompts[int(p)] for p in gp], group_size=G,
                                  num_steps=s.num_steps, kernel=s.kernel, noise_level=s.noise_level, plan=plan,
                                  guidance=s.guidance, generator=gen, same_noise=s.same_noise, batch_size=bs,
                                  negative_prompt=s.negative_prompt, reduction=s.reduction, density=s.density,
                                  cond=cond, return_means=self.ratio_norm, **self.sample_kw)
                else:  # the chunk cuts a group: one row per sample
                    cond = ucond.index(torch.tensor([pos_of[int(p)] for p in pids]))
                    traj = sample(self.adapter, [self.prompts[int(p)] for p in pids], group_size=1,
                                  num_steps=s.num_steps, kernel=s.kernel, noise_level=s.noise_level, plan=plan,
                                  guidance=s.guidance, generator=gen, batch_size=bs,
                                  negative_prompt=s.negative_prompt, reduction=s.reduction, density=s.density,
                                  cond=cond, return_means=self.ratio_norm, **self.sample_kw)
            t_sample += time.perf_counter() - t0
            images = traj.images.float().clamp(0, 1)
            args = (images, [self.prompts[int(p)] for p in pids], [dict(self.metadata[int(p)]) for p in pids])
            if self.executor is not None:
                futures.append(self.executor.submit(self._score, *args))
            else:
                done: Future = Future()
                done.set_result(self._score(*args))
                futures.append(done)
            traj.images = images if not trajs else None  # keep one chunk of images for logging
            trajs.append(traj)

        t0 = time.perf_counter()
        results = [f.result() for f in futures]
        t_wait = time.perf_counter() - t0
        t_reward = sum(r[2] for r in results)
        names = list(results[0][1])
        local_total = torch.cat([r[0] for r in results])
        local_parts = torch.stack([torch.cat([r[1][k] for r in results]) for k in names], 1)  # [n, K]
        dev = rt.device
        total = rt.gather(local_total.to(dev)).cpu()
        parts = rt.gather(local_parts.to(dev)).cpu()

        # advantages over the whole round (every process computes the same numbers)
        if self.adv_name == "gdpo":
            w = [self._weight(k) for k in names]
            adv = self.adv_fn(parts, G, weights=w, **self.adv_kwargs)
            zero = zero_std_groups(parts, G)
        elif self.adv_name == "per_prompt":  # DDPO stat tracking: a per-prompt reward history across rounds
            adv = self.adv_fn(total, G, keys=[self.prompts[int(p)] for p in row_pid], history=self.adv_history,
                              **self.adv_kwargs)
            zero = zero_std_groups(total, G)
        else:
            adv = self.adv_fn(total, G, **self.adv_kwargs)
            zero = zero_std_groups(total, G)
        keep = ~zero if cfg.train.advantage.drop_zero_std else torch.ones_like(zero)
        if cfg.train.method_options.get("best_worst_k"):  # DanceGRPO best-of-n: train the extremes of each group
            keep &= best_worst(adv, G, cfg.train.method_options["best_worst_k"])

        self._store = _Store(
            latents=torch.cat([tr.latents for tr in trajs]),
            log_probs=torch.cat([tr.log_probs for tr in trajs]),
            cond=Cond.cat([tr.cond for tr in trajs]),
            adv=adv[row0: row0 + per_rank * bs].to(dev),
            sigmas=trajs[0].sigmas,
            plan=plan,
            means=torch.cat([tr.extras["means"] for tr in trajs]) if self.ratio_norm else None,
        )
        batches, num_updates = self._micro_batches(it, keep, row0, per_rank * bs)

        metrics = {"reward_mean": float(total.mean()), "reward_std": float(total.std()) if len(total) > 1 else 0.0,
                   "adv_mean": float(adv.mean()), "adv_std": float(adv.std()) if len(adv) > 1 else 0.0,
                   "adv_abs_mean": float(adv.abs().mean()), "zero_std_frac": float(zero.float().mean()),
                   "group_reward_std_mean": float(total.reshape(-1, G).std(1).mean()) if G > 1 else 0.0,
                   "trained_steps": len(plan.trained_indices()),
                   "sde_window_start": int(plan.sde.nonzero()[0]) if plan.sde.any() else -1,
                   "kept_frac": float(keep.float().mean()),
                   # denoiser rows per sample while sampling / training (comparable to branch_grpo's per-leaf NFE)
                   "nfe_per_leaf": float(trajs[0].num_steps),
                   "train_nfe_per_leaf": len(plan.trained_indices()) * float(keep.float().mean())}
        for j, k in enumerate(names):
            metrics[f"reward_{k}_mean"] = float(parts[:, j].mean())
            metrics[f"reward_{k}_std"] = float(parts[:, j].std()) if len(parts) > 1 else 0.0
        timings = {"sample": t_sample, "reward": t_reward, "reward_wait": t_wait,
                   "collect": time.perf_counter() - t_start}
        return Collected(batches=batches, num_updates=num_updates, metrics=metrics, timings=timings,
                         num_samples=per_rank * bs, images=trajs[0].images if trajs else None)

    def _weight(self, name: str) -> float:
        weights = getattr(self.reward_fn, "weights", None) or self.cfg.reward.weights
        return float(weights.get(name, 1.0))

    def _micro_batches(self, it: int, keep: Tensor, row0: int, n_local: int) -> tuple[list[Batch], int]:
        """Shared-seed shuffle of the kept global rows, split into updates; this process's rows of each."""
        t = self.cfg.train
        steps = self._store.plan.trained_indices()
        kept = keep.nonzero().flatten()
        if len(kept) == 0 or not steps:
            return [], 0
        U = min(t.updates_per_iteration, len(kept))
        mbs = self.cfg.train_batch_size
        batches = []
        for e in range(t.num_inner_epochs):
            order = kept[torch.randperm(len(kept), generator=generator(self.cfg.seed, "shuffle", it, e))] \
                if t.shuffle else kept
            for u, part in enumerate(torch.tensor_split(order, U)):
                weight = 1.0 / (len(part) * len(steps))
                mine = part[(part >= row0) & (part < row0 + n_local)] - row0
                for i in range(0, len(mine), mbs):
                    rows = mine[i: i + mbs]
                    for j in steps:
                        batches.append(Batch({"rows": rows, "step": j, "weight": weight}, update=e * U + u))
        return batches, t.num_inner_epochs * U

    # ------------------------------------------------------------------------------------------ loss
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        st, t, s, rt = self._store, self.cfg.train, self.cfg.sample, self.runtime
        rows, j = batch.data["rows"], batch.data["step"]
        x, x_next = st.latents[rows, j], st.latents[rows, j + 1]
        cond = st.cond.index(rows)
        sigma, sigma_next = st.sigmas[j], st.sigmas[j + 1]
        with rt.autocast():
            out = self.adapter.predict(x, sigma, cond, self.train_guidance)
        new = sde.log_prob_of(s.kernel, x, x_next, out, sigma, sigma_next, s.noise_level,
                              reduction=s.reduction, density=s.density)
        adv = st.adv[rows].clamp(-t.adv_clip_max, t.adv_clip_max)
        old = st.log_probs[rows, j].to(new.log_prob.device)
        clip = {"clip_range": t.clip_range, "clip_range_lt": t.clip_range_lt, "clip_range_gt": t.clip_range_gt}
        if self.ratio_norm:  # GRPO-Guard: the normalised log-ratio goes in as log_prob - old_log_prob
            delta = ratio_norm(new.log_prob, old, new.mean, st.means[rows, j].to(new.mean.device), new.std,
                               reduction=s.reduction)
            per_row, metrics = self.policy_loss(delta, torch.zeros_like(delta), adv, **clip)
        else:
            per_row, metrics = self.policy_loss(new.log_prob, old, adv, **clip)
        if self.step_reweight:  # GRPO-Guard: equalise the steps' gradient scale (flow_grpo: / sqrt_dt^2)
            per_row = per_row / (sigma_next - sigma).abs().to(per_row.device)
        if batch.update == 0:  # rollout-vs-train consistency: |log p_train - log p_rollout| before any update
            gap = (new.log_prob.detach() - old).abs()
            metrics.update({"logprob_gap_mean": gap.mean(), "logprob_gap_max": gap.max(),
                            f"logprob_gap_max_step{j}": gap.max()})
        metrics["policy_loss"] = per_row.detach().mean()
        if t.beta > 0:
            with torch.no_grad(), rt.reference(), rt.autocast():
                out_ref = self.adapter.predict(x, sigma, cond, self.train_guidance)
            mean_ref, _ = sde.mean_std(s.kernel, x, out_ref, sigma, sigma_next, s.noise_level)
            kl = gaussian_kl(new.mean, mean_ref, new.std, sigma_next - sigma, form=t.kl, reduction=s.reduction)
            per_row = per_row + t.beta * kl
            metrics["kl"] = kl.detach().mean()
        loss = per_row.sum() * batch.data["weight"]
        return loss, metrics

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "adv_history": self.adv_history}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.adv_history = {k: list(v) for k, v in state.get("adv_history", {}).items()}

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None
