"""One online round, composed (not inherited) by every online method: Flow-GRPO and its recipes, BranchGRPO,
DiffusionNFT, ...

A round (flow_grpo ``scripts/train_sd3.py``, reference survey §2), one piece each; a method calls them in order
and keeps only its own data (a typed store, a typed micro-batch payload in ``Batch.data``, ``Batch.weight``):

1. **Deal** (``OnlineRound.deal``): ``prompts_per_round`` prompts from the shared ``PromptSampler`` (the same list
   on every process), ``G = group_size`` rows each in group-major order. The ``B`` rows are cut into chunks of
   ``sample.batch_size`` and process ``r`` gets the contiguous chunk range ``r`` (groups may straddle processes).
2. **Sample** (``OnlineRound.run``) each chunk with a pluggable ``SampleFn``: ``flat_sampler``
   (``flowalign.rollout.sample``) or a tree sampler (``flowalign.tree.sample_tree``). Chunk ``c`` draws its noise
   from ``(seed, "sample", iteration, c)``, so a row's draw does not depend on the process count.
3. **Score** each chunk in a background thread (``reward.background``) while the next one samples;
   **gather** the rewards over processes (rank order = global row order).
4. **Advantages** (``OnlineRound.advantages``): the ``flowalign.advantages`` registry estimator over the whole round
   (``grpo`` and friends; ``per_prompt`` keeps a checkpointed per-prompt history; ``gdpo`` takes the reward parts).
5. **Split** (``split_updates``, then ``row_batches`` or ``unit_batches``): the kept ids are shuffled with a shared
   seed ``(seed, "shuffle", iteration, epoch)`` and cut into ``updates_per_iteration`` optimizer steps; each process
   trains its own rows of each step in micro-batches weighted ``1 / (rows of the update x slots)`` (units: rows that
   share a forward, e.g. a tree parent's children, stay in one micro-batch).
6. **KL to the reference** (``reference_kl``): the Gaussian step KL of flow_grpo, the reference being the adapter
   inside ``runtime.reference()`` (LoRA disabled).

Shared data: ``Rollouts`` (a round's flat trajectories) and ``RowStep`` (a rows x step micro-batch). Shared metrics:
``reward_metrics``, ``advantage_metrics`` and ``flat_metrics``; timings ``sample``/``reward``/``reward_wait``/
``collect`` (``Scored.timings``).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from flowalign.config import Config, load_prompts
from flowalign.data import RewardFn
from flowalign import sde
from flowalign.adapter import Adapter, Cond
from flowalign.advantages import ADVANTAGES, resolve_estimator, zero_std_groups
from flowalign.losses import gaussian_kl
from flowalign.methods.base import Batch, PromptSampler, Runtime, generator
from flowalign.rollout import Trajectory, sample
from flowalign.schedules import StepPlan

#: ``(chunk index, its global row ids [bs], its noise generator) -> rollout`` with ``.images`` (one per row)
SampleFn = Callable[[int, Tensor, torch.Generator], Any]


def reward_parts(reward_fn, images: Tensor, prompts: list[str], metadata: list[dict]) -> tuple[Tensor, dict]:
    """Total reward ``[B]`` and its components (a ``Compose`` reports each; a plain reward is its own part)."""
    if hasattr(reward_fn, "components"):  # flowalign.rewards.Compose
        total, parts = reward_fn(images, prompts, metadata, return_components=True)
    else:
        total = reward_fn(images, prompts, metadata)
        parts = {getattr(reward_fn, "name", "reward"): total}
    return total.detach().float().cpu(), {k: v.detach().float().cpu() for k, v in parts.items()}


@dataclass
class Deal:
    """This process's share of one round: chunks ``chunks`` of ``chunk_rows`` rows of the global ``row_pid``."""

    iteration: int
    row_pid: Tensor  # long [B]: prompt id of every global row, group-major
    chunks: range  # this process's chunk indices
    chunk_rows: int  # rows per chunk (sample.batch_size)
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def row0(self) -> int:
        """Global index of this process's first row."""
        return self.chunks.start * self.chunk_rows

    @property
    def num_rows(self) -> int:
        return len(self.chunks) * self.chunk_rows

    @property
    def local_pids(self) -> Tensor:
        """Prompt ids of this process's rows ``[num_rows]``."""
        return self.row_pid[self.row0: self.row0 + self.num_rows]

    def rows(self, chunk: int) -> Tensor:
        """Global row ids of chunk ``chunk`` ``[chunk_rows]``."""
        return torch.arange(chunk * self.chunk_rows, (chunk + 1) * self.chunk_rows)


@dataclass
class Scored:
    """A round's rollouts (one per local chunk, in chunk order) with their rewards."""

    deal: Deal
    rollouts: list  # Trajectory / RolloutTree per chunk; only the first keeps its images (for logging)
    names: list[str]  # reward components
    local_total: Tensor  # [num_rows] this process's total rewards
    total: Tensor  # [B] gathered over processes, global row order
    parts: Tensor  # [B, K] components
    t_sample: float = 0.0
    t_reward: float = 0.0
    t_wait: float = 0.0

    def timings(self) -> dict[str, float]:
        """Seconds: sampling, scoring (thread time), waiting for the scorer, the whole collect so far."""
        return {"sample": self.t_sample, "reward": self.t_reward, "reward_wait": self.t_wait,
                "collect": time.perf_counter() - self.deal.t_start}


class OnlineRound:
    """Prompts, prompt sampler, reward scoring and advantage state of an online method (module docstring).

    ``chunks_what`` names the chunks in the process-count error (e.g. trees instead of rows).
    """

    def __init__(self, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime,
                 chunks_what: str | None = None) -> None:
        s, a = cfg.sample, cfg.train.advantage
        self.cfg, self.adapter, self.reward_fn, self.runtime = cfg, adapter, reward_fn, runtime
        self.prompts, self.metadata = load_prompts(s.prompts)
        self.sampler = PromptSampler(len(self.prompts), seed=cfg.seed, shuffle=s.shuffle_prompts)
        # the one place an online method resolves its estimator; ddof 0 (the image default) is flow_grpo's np.std
        self.adv_name, self.adv_kwargs = resolve_estimator(a.estimator, a.std, a.baseline, a.per_reward, a.eps,
                                                           a.kwargs, a.ddof)
        self.adv_fn = ADVANTAGES.get(self.adv_name)
        self.adv_history: dict[str, list[float]] = {}  # per_prompt (DDPO) reward history, checkpointed
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="reward") if cfg.reward.background else None
        self.chunks_what = chunks_what or (
            f"sampling chunks per round (sample.prompts_per_round * sample.group_size / sample.batch_size = "
            f"{cfg.global_batch} / {s.batch_size})")

    # ------------------------------------------------------------------------------------------ deal
    def num_chunks(self) -> int:
        return self.cfg.global_batch // self.cfg.sample.batch_size

    def check_world(self, world_size: int) -> None:
        n = self.num_chunks()
        if n % world_size:
            raise ValueError(f"{n} {self.chunks_what} cannot be split evenly over {world_size} processes; "
                             f"make it a multiple of {world_size}")

    def deal(self, iteration: int) -> Deal:
        """Draw the round's prompts (same on every process) and this process's contiguous chunk range."""
        s, rt = self.cfg.sample, self.runtime
        t_start = time.perf_counter()
        row_pid = self.sampler.next(s.prompts_per_round).repeat_interleave(s.group_size)
        self.check_world(rt.world_size)
        per_rank = self.num_chunks() // rt.world_size
        return Deal(iteration, row_pid, range(rt.rank * per_rank, (rt.rank + 1) * per_rank), s.batch_size, t_start)

    # ------------------------------------------------------------------------------------------ sample + score
    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]):
        t0 = time.perf_counter()
        total, parts = reward_parts(self.reward_fn, images, prompts, metadata)
        return total, parts, time.perf_counter() - t0

    def run(self, deal: Deal, sample_chunk: SampleFn, keep_images: bool = False) -> Scored:
        """Sample every local chunk (under ``runtime.autocast``), score it in the background, gather the rewards.
        ``keep_images``: every chunk keeps its images (D3PO's human labels), not only the first."""
        rt, seed = self.runtime, self.cfg.seed
        rollouts, futures, t_sample = [], [], 0.0
        for c in rt.progress(deal.chunks, "sampling"):
            rows = deal.rows(c)
            gen = generator(seed, "sample", deal.iteration, c, device=rt.device)
            t0 = time.perf_counter()
            with rt.autocast():
                ro = sample_chunk(c, rows, gen)
            t_sample += time.perf_counter() - t0
            images = ro.images.float().clamp(0, 1)
            pids = deal.row_pid[rows].tolist()
            args = (images, [self.prompts[p] for p in pids], [dict(self.metadata[p]) for p in pids])
            if self.executor is not None:
                futures.append(self.executor.submit(self._score, *args))
            else:
                done: Future = Future()
                done.set_result(self._score(*args))
                futures.append(done)
            ro.images = images if keep_images or not rollouts else None  # one chunk of images for logging
            rollouts.append(ro)

        t0 = time.perf_counter()
        results = [f.result() for f in futures]
        t_wait = time.perf_counter() - t0
        names = list(results[0][1])
        local_total = torch.cat([r[0] for r in results])
        local_parts = torch.stack([torch.cat([r[1][k] for r in results]) for k in names], 1)  # [n, K]
        total = rt.gather(local_total.to(rt.device)).cpu()
        parts = rt.gather(local_parts.to(rt.device)).cpu()
        return Scored(deal, rollouts, names, local_total, total, parts, t_sample, sum(r[2] for r in results), t_wait)

    # ------------------------------------------------------------------------------------------ advantages
    def advantages(self, sc: Scored) -> tuple[Tensor, Tensor, Tensor]:
        """``(adv, zero, keep)`` bool/float ``[B]`` over the whole round (the same numbers on every process):
        the registry estimator's advantages, the rows of all-equal groups, and the rows to train
        (``~zero`` when ``train.advantage.drop_zero_std``)."""
        G = self.cfg.sample.group_size
        if self.adv_name == "gdpo":
            weights = getattr(self.reward_fn, "weights", None) or self.cfg.reward.weights
            adv = self.adv_fn(sc.parts, G, weights=[float(weights.get(k, 1.0)) for k in sc.names], **self.adv_kwargs)
            zero = zero_std_groups(sc.parts, G)
        elif self.adv_name == "per_prompt":  # DDPO stat tracking: a per-prompt reward history across rounds
            keys = [self.prompts[int(p)] for p in sc.deal.row_pid]
            adv = self.adv_fn(sc.total, G, keys=keys, history=self.adv_history, **self.adv_kwargs)
            zero = zero_std_groups(sc.total, G)
        else:
            adv = self.adv_fn(sc.total, G, **self.adv_kwargs)
            zero = zero_std_groups(sc.total, G)
        keep = ~zero if self.cfg.train.advantage.drop_zero_std else torch.ones_like(zero)
        return adv, zero, keep

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


# ---------------------------------------------------------------------------------------------- flat sampling
def flat_sampler(rnd: OnlineRound, deal: Deal, plan: StepPlan, *, need_uncond: bool, return_means: bool = False,
                 **sample_kw) -> SampleFn:
    """``flowalign.rollout.sample`` per chunk: a chunk of whole groups passes one row per prompt (``same_noise``
    possible), a chunk that cuts a group one row per sample. Each of this process's prompts is encoded alone here,
    so its embedding never depends on which prompts share its batch (process count, resume) and the adapter's
    prompt cache hits across rounds. ``sample_kw``: e.g. ``ode_solver``/``post_compress`` (MixGRPO-Flash)."""
    s, adapter, prompts = rnd.cfg.sample, rnd.adapter, rnd.prompts
    G, bs = s.group_size, s.batch_size
    uniq = torch.unique_consecutive(deal.local_pids).tolist()
    neg = [s.negative_prompt] if need_uncond else None
    with rnd.runtime.autocast():
        ucond = Cond.cat([adapter.encode([prompts[i]], negative=neg) for i in uniq])
    pos_of = {int(p): k for k, p in enumerate(uniq)}
    common = dict(num_steps=s.num_steps, kernel=s.kernel, noise_level=s.noise_level, plan=plan, guidance=s.guidance,
                  batch_size=bs, negative_prompt=s.negative_prompt, reduction=s.reduction, density=s.density,
                  return_means=return_means, **sample_kw)

    def chunk(c: int, rows: Tensor, gen: torch.Generator) -> Trajectory:
        pids = deal.row_pid[rows]
        if (c * bs) % G == 0 and bs % G == 0:  # whole groups: sample() repeats each prompt G times
            gp = pids[::G]
            return sample(adapter, [prompts[int(p)] for p in gp], group_size=G, generator=gen,
                          same_noise=s.same_noise, cond=ucond.index(torch.tensor([pos_of[int(p)] for p in gp])),
                          **common)
        return sample(adapter, [prompts[int(p)] for p in pids], group_size=1, generator=gen,
                      cond=ucond.index(torch.tensor([pos_of[int(p)] for p in pids])), **common)

    return chunk


@dataclass
class Rollouts:
    """This process's flat rollouts of a round, concatenated over its chunks (rows in global order)."""

    latents: Tensor  # [n, N+1, ...]
    log_probs: Tensor  # [n, N]
    cond: Cond
    adv: Tensor  # [n] this process's rows of the round's advantages
    sigmas: Tensor  # [N+1]
    plan: StepPlan
    means: Tensor | None = None  # [n, N, ...] fp32 step means (``return_means``; GRPO-Guard ratio_norm)

    @classmethod
    def of(cls, sc: Scored, adv: Tensor, plan: StepPlan, device: torch.device, means: bool = False) -> "Rollouts":
        """The local rows of ``sc``'s ``flat_sampler`` trajectories with their advantages (``adv``: ``[B]``)."""
        trajs, d = sc.rollouts, sc.deal
        return cls(latents=torch.cat([tr.latents for tr in trajs]), log_probs=torch.cat([tr.log_probs for tr in trajs]),
                   cond=Cond.cat([tr.cond for tr in trajs]), adv=adv[d.row0: d.row0 + d.num_rows].to(device),
                   sigmas=trajs[0].sigmas, plan=plan,
                   means=torch.cat([tr.extras["means"] for tr in trajs]) if means else None)


@dataclass
class RowStep:
    """A micro-batch payload: local rows ``[b]`` at trained step ``step``."""

    rows: Tensor
    step: int


# ---------------------------------------------------------------------------------------------- split
def split_updates(ids: Tensor, cfg, iteration: int) -> tuple[list[list[Tensor]], int]:
    """The kept global ids (rows, tree units, ...) cut into optimizer updates: ``parts[epoch][u]`` and the update
    count ``num_inner_epochs * U`` with ``U = min(updates_per_iteration, len(ids))``. Every inner epoch reshuffles
    with the shared seed ``(seed, "shuffle", iteration, epoch)`` (when ``train.shuffle``), so every process cuts
    the same parts."""
    t = cfg.train
    if len(ids) == 0:
        return [], 0
    U = min(t.updates_per_iteration, len(ids))
    parts = []
    for e in range(t.num_inner_epochs):
        order = ids[torch.randperm(len(ids), generator=generator(cfg.seed, "shuffle", iteration, e))] \
            if t.shuffle else ids
        parts.append(list(torch.tensor_split(order, U)))
    return parts, t.num_inner_epochs * U


def row_batches(parts: list[list[Tensor]], row0: int, num_rows: int, batch_rows: int, slots: Sequence[int],
                payload: Callable[[Tensor, int, int], Any]) -> list[Batch]:
    """This process's micro-batches of ``split_updates`` row parts: per update, its local rows (global ids in
    ``[row0, row0 + num_rows)``, made local) in runs of ``batch_rows``, each run once per slot (a trained step, a
    timestep draw). ``payload(rows, slot, epoch)`` builds the method's data; the weight ``1 / (rows of the update
    over all processes x slots)`` makes the summed micro-batch losses the update's mean."""
    batches = []
    for e, by_update in enumerate(parts):
        for u, part in enumerate(by_update):
            weight = 1.0 / (len(part) * len(slots))
            mine = part[(part >= row0) & (part < row0 + num_rows)] - row0
            for i in range(0, len(mine), batch_rows):
                rows = mine[i: i + batch_rows]
                for j in slots:
                    batches.append(Batch(payload(rows, j, e), update=e * len(by_update) + u, weight=weight))
    return batches


def unit_batches(units: list[list[Tensor]], kept: Tensor, first: int, cfg, iteration: int, runtime: Runtime,
                 step_of: Callable[[Tensor], int], payload: Callable[[Tensor, int], Any]
                 ) -> tuple[list[Batch], int, int, int]:
    """Micro-batches of *units*: index tensors that train together (BranchGRPO: a parent with its kept children,
    which share the parent's forward). ``units[g]`` are the units of local group ``g`` (global group
    ``first + g``); every group has the same number of units, so ``(group, j)`` names the same work on every
    process. The units of the ``kept`` global groups are shuffled and cut into updates by ``split_updates``; per
    update this process's units are grouped by ``step_of(unit)`` and packed whole into micro-batches of at most
    ``train_batch_size`` indices (a larger unit goes alone), ``payload(indices, step)`` each, weighted
    ``1 / (indices of the update over all processes)`` -- counts summed over processes rather than assumed.
    Returns the batches, the update count and this process's unit and index counts (first inner epoch)."""
    counts = {len(u) for u in units}
    if len(counts) > 1:  # pragma: no cover - e.g. tree pruning keeps counts structural
        raise RuntimeError(f"groups have different numbers of training units: {sorted(counts)}")
    upg = counts.pop() if counts else 0
    ids = (kept.view(-1, 1) * upg + torch.arange(upg).view(1, -1)).flatten()  # global unit ids
    parts, num_updates = split_updates(ids, cfg, iteration)
    batches, mine_units, mine_size, mbs = [], 0, 0, cfg.train_batch_size
    for ep, by_update in enumerate(parts):
        U = len(by_update)
        local = torch.zeros(U, dtype=torch.float64)
        mine_parts = []
        for u, part in enumerate(by_update):
            g, j = part // upg, part % upg
            mine = (g >= first) & (g < first + len(units))
            mine_parts.append([units[int(a) - first][int(b)] for a, b in zip(g[mine], j[mine])])
            local[u] = sum(len(x) for x in mine_parts[-1])
            if ep == 0:
                mine_units, mine_size = mine_units + len(mine_parts[-1]), mine_size + int(local[u])
        glob = runtime.gather(local.to(runtime.device).view(1, -1)).view(-1, U).sum(0).cpu()
        for u, mine_u in enumerate(mine_parts):
            by_step: dict[int, list[Tensor]] = {}
            for x in mine_u:
                by_step.setdefault(step_of(x), []).append(x)
            for j in sorted(by_step):
                cur, n = [], 0
                for x in by_step[j] + [None]:
                    if x is None or (cur and n + len(x) > mbs):
                        batches.append(Batch(payload(torch.cat(cur), j), update=ep * U + u,
                                             weight=1.0 / float(glob[u])))
                        cur, n = [], 0
                    if x is not None:
                        cur.append(x)
                        n += len(x)
    return batches, num_updates, mine_units, mine_size


# ---------------------------------------------------------------------------------------------- KL, metrics
def reference_kl(adapter: Adapter, runtime: Runtime, x: Tensor, sigma, sigma_next, cond: Cond, guidance: float,
                 mean: Tensor, std: Tensor, kernel: str, noise_level: float, form: str, reduction: str,
                 expand: Tensor | None = None) -> Tensor:
    """Per-row KL ``[B']`` of the policy step ``N(mean, std^2)`` to the reference's ``N(mean_ref, std^2)``
    (flow_grpo's KL term; ``flowalign.losses.gaussian_kl`` in ``form``). The reference (``runtime.reference()``:
    LoRA disabled, no grad) predicts at ``x`` ``[B, ...]``; ``expand`` ``[B']`` picks each policy row's reference
    row (BranchGRPO: siblings share their parent's forward), else ``B' = B``."""
    with torch.no_grad(), runtime.reference(), runtime.autocast():
        out_ref = adapter.predict(x, sigma, cond, guidance)
    mean_ref, _ = sde.mean_std(kernel, x, out_ref, sigma, sigma_next, noise_level)
    if expand is not None:
        mean_ref = mean_ref[expand]
    return gaussian_kl(mean, mean_ref, std, sigma_next - sigma, form=form, reduction=reduction)


def reward_metrics(sc: Scored, group_size: int) -> dict[str, float]:
    """Reward mean/std over the round, mean in-group std, and each component's mean/std."""
    total, parts = sc.total, sc.parts
    m = {"reward_mean": float(total.mean()), "reward_std": float(total.std()) if len(total) > 1 else 0.0,
         "group_reward_std_mean": float(total.reshape(-1, group_size).std(1).mean()) if group_size > 1 else 0.0}
    for j, k in enumerate(sc.names):
        m[f"reward_{k}_mean"] = float(parts[:, j].mean())
        m[f"reward_{k}_std"] = float(parts[:, j].std()) if len(parts) > 1 else 0.0
    return m


def advantage_metrics(adv: Tensor, zero: Tensor, keep: Tensor) -> dict[str, float]:
    """Advantage mean/std/|mean| ``[B]``, the all-equal-group fraction and the trained-row fraction."""
    return {"adv_mean": float(adv.mean()), "adv_std": float(adv.std()) if len(adv) > 1 else 0.0,
            "adv_abs_mean": float(adv.abs().mean()), "zero_std_frac": float(zero.float().mean()),
            "kept_frac": float(keep.float().mean())}


def flat_metrics(sc: Scored, group_size: int, adv: Tensor, zero: Tensor, keep: Tensor,
                 plan: StepPlan) -> dict[str, float]:
    """``reward_metrics`` + ``advantage_metrics`` + the step plan's trained steps and SDE window start, and the
    denoiser rows per sample while sampling / training (comparable to branch_grpo's per-leaf NFE)."""
    steps, kept = plan.trained_indices(), float(keep.float().mean())
    return {**reward_metrics(sc, group_size), **advantage_metrics(adv, zero, keep), "trained_steps": len(steps),
            "sde_window_start": int(plan.sde.nonzero()[0]) if plan.sde.any() else -1,
            "nfe_per_leaf": float(sc.rollouts[0].num_steps), "train_nfe_per_leaf": len(steps) * kept}
