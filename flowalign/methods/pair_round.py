"""The online pair round that D3PO and PRDP compose (not a method itself): sample groups, score, pair, batch.

One iteration (yk7333/d3po ``scripts/rm/train_d3po.py`` / ``scripts/train.py``; reference ``backprop_preference.md``
B2), on the shared online round (``online.OnlineRound``: deal, flat sampling, background scoring, gather, update
split):

1. **Sample** ``sample.group_size`` trajectories per prompt with a stochastic kernel (``ddim`` eta for epsilon
   models, ``flow_sde`` / ``dance`` / ``cps`` for flow models), recording every latent. ``sample.same_noise`` shares
   the initial noise within a group, as D3PO does. Chunks hold whole groups (``sample.batch_size % group_size == 0``)
   and are dealt to processes as in Flow-GRPO, so a row's trajectory does not depend on the process count.
2. **Pairs** inside each group (``pairing``): ``all`` C(G, 2) pairs (D3PO's human path: 7 images -> 21 pairs),
   ``adjacent`` (0, 1), (2, 3), ... or ``best_worst`` (max vs min reward, flow_grpo's DPO pairs).
3. **Label** them with the method's ``label`` function (D3PO: a preference from the reward or from people; PRDP:
   the reward difference), which returns the training pairs and their targets.
4. **Batches**: the round's groups that hold pairs, shuffled with the shared seed and cut into updates
   (``online.split_updates``; a group's pairs share rows, so they stay together); this process's groups of each
   update in micro-batches of about ``train.batch_size`` rows. Every pair-step of an update weighs
   ``1 / (pairs of the update over all processes x trained steps)``.

The method keeps the round's ``PairStore`` and computes its loss with ``log_ratios`` (policy vs. a reference it
chooses). The options every pair method shares are ``PairOptions``: one group of its flat options.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from flowalign.adapter import Adapter, Cond
from flowalign.config import Config, ConfigError, help_field
from flowalign.data import RewardFn
from flowalign import sde
from flowalign.losses import clipped_log_ratio
from flowalign.methods.base import Batch, Collected, Runtime, TrainState, generator, option_error
from flowalign.methods.online import OnlineRound, flat_sampler, reward_metrics, split_updates
from flowalign.schedules import StepPlan, make_plan


# ----------------------------------------------------------------------------------------------- options
@dataclass
class PairOptions:
    """How a round's pairs are formed and who decides them (``train.method_options``)."""

    preference: Literal["reward", "human"] = help_field(
        "reward", "Who decides a pair: the reward (higher total wins) or people, through the labelling queue in "
                  "labels_dir.")
    pairing: Literal["all", "adjacent", "best_worst"] = help_field(
        "all", "Pairs inside a group: all C(G,2), adjacent (0,1),(2,3)..., best_worst (max vs min reward).")
    tie_atol: float = help_field(0.0, "Reward differences |dr| <= tie_atol are ties (no preference, pair dropped).")
    labels_dir: str | None = help_field(None, "preference=human: the labelling queue folder (pairs.jsonl, "
                                              "labels.jsonl, images); `flowalign label serve <labels_dir>` shows it "
                                              "to people.")
    min_labeled: float = help_field(1.0, "preference=human: share of a round's pairs that must be labelled "
                                         "(a/b/tie/skip) before training on it.")
    label_timeout_s: float | None = help_field(None, "preference=human: give up waiting after this many seconds "
                                                     "(TimeoutError); null = wait forever.")
    poll_s: float = help_field(1.0, "preference=human: seconds between reads of labels.jsonl while waiting.")
    serve: bool = help_field(False, "preference=human: start the labelling app (label_app) in this process (main "
                                    "process only).")
    serve_host: str = help_field("127.0.0.1", "Host of the labelling app started by serve=true.")
    serve_port: int = help_field(8765, "Port of the labelling app started by serve=true (0 = any free port).")
    label_app: str = help_field("flowalign.labeling:LabelServer", (
        "serve=true: 'module:attr' of the labelling app, called as (labels_dir, host=, port=, create=True) and "
        "returning an object with start(), url and stop(); the default is the web app of `flowalign label serve`."))

    def check(self, cfg) -> None:
        s, method = cfg.sample, cfg.train.method
        if s.group_size < 2:
            raise ConfigError(f"sample.group_size={s.group_size}: {method} compares samples of one prompt, use >= 2")
        if s.batch_size % s.group_size:
            raise ConfigError(f"sample.batch_size={s.batch_size} must be a multiple of sample.group_size="
                              f"{s.group_size}: {method} pairs samples of a group, so a chunk holds whole groups")
        if self.pairing == "adjacent" and s.group_size % 2:
            raise option_error("pairing=adjacent", f"needs an even sample.group_size, got {s.group_size}")
        if self.tie_atol < 0:
            raise option_error("tie_atol", f"must be >= 0, got {self.tie_atol}")
        if self.preference == "human":
            if not self.labels_dir:
                raise option_error("preference=human", "needs train.method_options.labels_dir (the labelling "
                                   "queue folder served by `flowalign label serve`)")
            if self.pairing == "best_worst":
                raise option_error("pairing=best_worst", "ranks by the reward; with preference=human use all or "
                                   "adjacent")
        if not 0 < self.min_labeled <= 1:
            raise option_error("min_labeled", f"must be in (0, 1], got {self.min_labeled}")
        if self.poll_s <= 0 or (self.label_timeout_s is not None and self.label_timeout_s <= 0):
            raise option_error("poll_s and label_timeout_s", "must be > 0")


def check_ratio_clip(ratio_clip: float | None) -> None:
    """The per-step ratio clip of a pair loss: ``(0, 1)`` or null."""
    if ratio_clip is not None and not 0 < ratio_clip < 1:
        raise option_error("ratio_clip", f"must be in (0, 1) or null, got {ratio_clip}")


def check_pair_config(name: str, cfg) -> None:
    """Load-time rules of every online pair method ``name`` (after its options were checked)."""
    s, t = cfg.sample, cfg.train
    if not sde.is_stochastic(s.kernel, s.noise_level):
        raise ConfigError(f"{name} needs a stochastic kernel (a step log-prob): sample.kernel={s.kernel!r} "
                          f"with sample.noise_level={s.noise_level} draws no noise")
    if not t.beta > 0:
        raise ConfigError(f"train.beta is {name}'s preference temperature and must be > 0 "
                          f"(D3PO 0.1), got {t.beta}")


def candidate_pairs(group_size: int, pairing: str, rewards: Tensor | None = None) -> list[tuple[int, int]]:
    """Index pairs ``(a, b)`` inside one group (``rewards``: the group's rewards, for ``best_worst``)."""
    if pairing == "all":
        return list(itertools.combinations(range(group_size), 2))
    if pairing == "adjacent":
        return [(i, i + 1) for i in range(0, group_size - 1, 2)]
    if pairing == "best_worst":
        if rewards is None:
            raise ValueError("pairing=best_worst needs the group's rewards")
        return [(int(rewards.argmax()), int(rewards.argmin()))]
    raise ValueError(f"pairing={pairing!r} is not allowed. Allowed: all, adjacent, best_worst")


# ----------------------------------------------------------------------------------------------- the round
@dataclass
class PairStore:
    """This process's trajectories of the round and its training pairs (local row indices)."""

    latents: Tensor  # [n, N+1, ...]
    log_probs: Tensor  # [n, N] (sampling policy)
    cond: Cond
    sigmas: Tensor
    plan: StepPlan
    pairs: Tensor  # long [m, 2]: (chosen, rejected) for D3PO, (a, b) for PRDP
    target: Tensor  # [m]: PRDP's reward difference (D3PO: ones)


@dataclass
class RoundRewards:
    """What a method's ``label`` function sees of a round (this process's rows; local indices)."""

    iteration: int
    cand: Tensor  # long [m, 2]: candidate pairs (a, b)
    rewards: Tensor  # [n] total reward of this process's rows
    all_rewards: Tensor  # [N] total reward of every row of the round (all processes)
    images: list[Tensor]  # this process's images per chunk (every chunk with keep_images, else the first one)
    pids: Tensor  # long [n]: prompt index of each row
    row0: int  # global index of local row 0


#: ``label(round) -> (pairs [m', 2] long local rows, target [m'], metrics)``
Label = Callable[[RoundRewards], tuple[Tensor, Tensor, dict[str, float]]]


@dataclass
class PairStep:
    """One trained step ``j`` of a micro-batch's pairs: the policy's step distribution on the pairs' unique
    ``rows`` (``inv [p, 2]`` maps each pair's two members into them) and the clipped log-ratios ``lr [rows]``."""

    rows: Tensor
    inv: Tensor
    new: sde.StepOut
    lr: Tensor
    metrics: dict[str, Tensor]


class PairRound:
    """Collects a round of online pairs on the shared ``OnlineRound`` and serves their step log-probs."""

    def __init__(self, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime, opts: PairOptions,
                 label: Label, keep_images: bool = False) -> None:
        s = cfg.sample
        self.cfg, self.adapter, self.runtime = cfg, adapter, runtime
        self.opts, self.label, self.keep_images = opts, label, keep_images
        self.online = OnlineRound(cfg, adapter, reward_fn, runtime)
        self.prompts = self.online.prompts
        self.train_guidance = s.guidance if cfg.train.train_cfg else 1.0
        self.need_uncond = s.guidance != 1.0 or self.train_guidance != 1.0

    def check_world(self, world_size: int) -> None:
        self.online.check_world(world_size)

    # ------------------------------------------------------------------------------------------ collect
    @torch.no_grad()
    def collect(self, state: TrainState) -> tuple[PairStore, Collected]:
        """Sample, score, pair and label this iteration's groups; the store and the trainer's micro-batches."""
        cfg, s, rt, o = self.cfg, self.cfg.sample, self.runtime, self.opts
        it, G = state.iteration, s.group_size
        deal = self.online.deal(it)
        plan = make_plan(s.schedule, s.num_steps, generator=generator(cfg.seed, "plan", it), iteration=it,
                         **s.schedule_options)
        sc = self.online.run(deal, flat_sampler(self.online, deal, plan, need_uncond=self.need_uncond),
                             keep_images=self.keep_images)  # people see every pair; logs keep the first chunk
        trajs, local_r, row0 = sc.rollouts, sc.local_total, deal.row0
        images = [tr.images for tr in trajs if tr.images is not None]
        cand = torch.tensor([(g * G + a, g * G + b) for g in range(len(local_r) // G)
                             for a, b in candidate_pairs(G, o.pairing, local_r[g * G:(g + 1) * G])],
                            dtype=torch.long)
        t0 = time.perf_counter()
        pairs, target, pm = self.label(RoundRewards(it, cand, local_r, sc.total, images, deal.local_pids, row0))
        t_label = time.perf_counter() - t0
        store = PairStore(
            latents=torch.cat([tr.latents for tr in trajs]), log_probs=torch.cat([tr.log_probs for tr in trajs]),
            cond=Cond.cat([tr.cond for tr in trajs]), sigmas=trajs[0].sigmas, plan=plan, pairs=pairs,
            target=target.to(rt.device))
        batches, num_updates, n_pairs = self.micro_batches(store, it, len(local_r) // G)

        metrics = {**reward_metrics(sc, G), "pairs": n_pairs,
                   "pairs_per_group": n_pairs / max(1, cfg.sample.prompts_per_round),
                   "trained_steps": len(plan.trained_indices()), **pm}
        return store, Collected(batches=batches, num_updates=num_updates, metrics=metrics,
                                timings={**sc.timings(), "label": t_label}, num_samples=deal.num_rows,
                                images=images[0][:16] if images else None)

    def micro_batches(self, store: PairStore, it: int, n_groups_local: int) -> tuple[list[Batch], int, int]:
        """The round's groups that hold pairs, split into updates (``online.split_updates``); this process's groups
        of each, packed into micro-batches of about ``train.batch_size`` rows, one per trained step. Returns
        ``(batches, num_updates, global pairs)``."""
        cfg, rt, G = self.cfg, self.runtime, self.cfg.sample.group_size
        group_of = store.pairs[:, 0] // G
        local = torch.bincount(group_of, minlength=n_groups_local)
        counts = rt.gather(local.to(rt.device)).cpu()  # pairs per group, global group order
        off = int(rt.gather(torch.tensor([n_groups_local], device=rt.device)).cpu()[: rt.rank].sum())
        steps = store.plan.trained_indices()
        n_pairs = int(counts.sum())
        if n_pairs == 0 or not steps:
            return [], 0, n_pairs
        parts, num_updates = split_updates(counts.nonzero().flatten(), cfg, it)
        per_mb = max(1, cfg.train_batch_size // G)  # groups per micro-batch
        batches = []
        for e, by_update in enumerate(parts):
            for u, part in enumerate(by_update):
                weight = 1.0 / (int(counts[part].sum()) * len(steps))
                mine = part[(part >= off) & (part < off + n_groups_local)] - off
                for i in range(0, len(mine), per_mb):
                    idx = torch.isin(group_of, mine[i: i + per_mb]).nonzero().flatten()
                    for j in steps:
                        batches.append(Batch({"pairs": idx, "step": j, "weight": weight},
                                             update=e * len(by_update) + u))
        return batches, num_updates, n_pairs

    # ------------------------------------------------------------------------------------------ log-probs
    def frozen_out(self, store: PairStore, rows: Tensor, j: int) -> Tensor:
        """The frozen base model's prediction at step ``j`` of ``rows`` (LoRA disabled, no grad)."""
        with torch.no_grad(), self.runtime.reference(), self.runtime.autocast():
            return self.adapter.predict(store.latents[rows, j], store.sigmas[j], store.cond.index(rows),
                                        self.train_guidance)

    def step_out(self, store: PairStore, rows: Tensor, j: int, out: Tensor) -> sde.StepOut:
        """Step distribution of ``rows`` at step ``j`` under the prediction ``out`` and its stored transition's
        log-prob (``sample.reduction``, ``sample.density``)."""
        s = self.cfg.sample
        return sde.log_prob_of(s.kernel, store.latents[rows, j], store.latents[rows, j + 1], out, store.sigmas[j],
                               store.sigmas[j + 1], s.noise_level, reduction=s.reduction, density=s.density)

    def frozen_log_prob(self, store: PairStore, rows: Tensor, j: int) -> Tensor:
        """D3PO's reference: the frozen base model's log-prob of the stored transitions."""
        return self.step_out(store, rows, j, self.frozen_out(store, rows, j)).log_prob

    def log_ratios(self, store: PairStore, pair_idx: Tensor, j: int,
                   reference: Callable[[PairStore, Tensor, int], Tensor], clip: float | None) -> PairStep:
        """Policy (with grad) vs. ``reference(store, rows, j)`` log-probs at step ``j`` of the pairs ``pair_idx``,
        clipped to ``[log(1 - clip), log(1 + clip)]``; logs ``log_ratio_abs`` and ``clipfrac``."""
        rows, inv = torch.unique(store.pairs[pair_idx].flatten(), return_inverse=True)
        with self.runtime.autocast():
            out = self.adapter.predict(store.latents[rows, j], store.sigmas[j], store.cond.index(rows),
                                       self.train_guidance)
        new = self.step_out(store, rows, j, out)
        ref = reference(store, rows, j).to(new.log_prob.device)
        lr = clipped_log_ratio(new.log_prob, ref, clip)
        metrics: dict[str, Any] = {}
        with torch.no_grad():
            raw = new.log_prob - ref
            metrics["log_ratio_abs"] = raw.abs().mean()
            if clip is not None:
                metrics["clipfrac"] = ((raw < math.log1p(-clip)) | (raw > math.log1p(clip))).float().mean()
        return PairStep(rows, inv.view(-1, 2), new, lr, metrics)

    def state_dict(self) -> dict:
        return self.online.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.online.load_state_dict(state)

    def close(self) -> None:
        self.online.close()
