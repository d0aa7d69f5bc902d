"""D3PO (Yang et al., arXiv 2311.13231): DPO on the denoising steps of online sample pairs.

One iteration (yk7333/d3po ``scripts/rm/train_d3po.py`` / ``scripts/train.py``; reference ``backprop_preference.md``
B2):

1. **Sample** ``sample.group_size`` trajectories per prompt with a stochastic kernel (``ddim`` eta for epsilon
   models, ``flow_sde`` / ``dance`` / ``cps`` for flow models), recording every latent. ``sample.same_noise`` shares
   the initial noise within a group, as D3PO does. Chunks hold whole groups (``sample.batch_size % group_size == 0``)
   and are dealt to processes as in Flow-GRPO, so a row's trajectory does not depend on the process count.
2. **Pairs** inside each group (``pairing``): ``all`` C(G, 2) pairs (D3PO's human path: 7 images -> 21 pairs),
   ``adjacent`` (0, 1), (2, 3), ... or ``best_worst`` (max vs min reward, flow_grpo's DPO pairs).
3. **Preference** (``preference``): ``reward`` -- the higher total reward wins, ties (``|dr| <= tie_atol``) are
   dropped (D3PO's ``h = 0``); ``human`` -- the pair images go to a labelling queue folder (``labels_dir``,
   served by ``flowalign label serve``) and the method waits until ``min_labeled`` of this round's pairs carry a
   label in ``labels.jsonl`` (``a``/``b`` train, ``tie``/``skip`` are dropped). The configured reward is still
   computed and logged as a monitor (and its agreement with the human labels).
4. **Loss** per pair (w = preferred, l = rejected) and trained step ``j``, against the frozen reference (LoRA
   disabled, no grad)::

       rho_i = clip(exp(log p_theta(x^i_{j+1} | x^i_j) - log p_ref(x^i_{j+1} | x^i_j)), 1 - eps, 1 + eps)
       L     = -log sigmoid(beta (log rho_w - log rho_l))

   with ``beta = train.beta`` (D3PO 0.1) and ``eps = ratio_clip`` (D3PO 0.1). Log-probs use ``sample.reduction``
   (``mean`` over latent dims, as DDPO/D3PO). Each update's objective is the mean over its pairs and trained
   steps; the policy and the reference see the pair's rows in one batched forward each.

PRDP (``prdp.py``) reuses steps 1-2 with a regression loss against the sampling policy.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from flowalign import sde
from flowalign.config import ConfigError, help_field, from_dict, load_prompts
from flowalign.losses import clipped_log_ratio, dpo_loss
from flowalign.methods.base import METHODS, Batch, Collected, Method, PromptSampler, Runtime, TrainState, generator
from flowalign.methods.flow_grpo import reward_parts
from flowalign.rollout import sample
from flowalign.schedules import StepPlan, make_plan

from flowalign.adapter import Cond

OPTIONS_KEY = "train.method_options"


# ----------------------------------------------------------------------------------------------- options
@dataclass
class PairOptions:
    """Options of the online pair methods (``train.method_options``)."""

    preference: Literal["reward", "human"] = help_field("reward", "Who decides a pair: the reward (higher total wins) or "
                                                          "people, through the labelling queue in labels_dir.")
    pairing: Literal["all", "adjacent", "best_worst"] = help_field(
        "all", "Pairs inside a group: all C(G,2), adjacent (0,1),(2,3)..., best_worst (max vs min reward).")
    ratio_clip: float | None = help_field(0.1, "eps of the per-step ratio clip to [1-eps, 1+eps] (D3PO 0.1); null = none.")
    tie_atol: float = help_field(0.0, "Reward differences |dr| <= tie_atol are ties (no preference, pair dropped).")
    label_smoothing: float = help_field(0.0, "cDPO label smoothing of the DPO loss (0 = D3PO).")
    labels_dir: str | None = help_field(None, "preference=human: the labelling queue folder (pairs.jsonl, labels.jsonl, "
                                      "images); `flowalign label serve <labels_dir>` shows it to people.")
    min_labeled: float = help_field(1.0, "preference=human: share of a round's pairs that must be labelled (a/b/tie/skip) "
                                 "before training on it.")
    label_timeout_s: float | None = help_field(None, "preference=human: give up waiting after this many seconds "
                                             "(TimeoutError); null = wait forever.")
    poll_s: float = help_field(1.0, "preference=human: seconds between reads of labels.jsonl while waiting.")
    serve: bool = help_field(False, "preference=human: start the labelling web app in this process (main process only).")
    serve_host: str = help_field("127.0.0.1", "Host of the labelling app started by serve=true.")
    serve_port: int = help_field(8765, "Port of the labelling app started by serve=true (0 = any free port).")

    def check(self, cfg, method: str) -> None:
        s = cfg.sample
        if s.group_size < 2:
            raise ConfigError(f"sample.group_size={s.group_size}: {method} compares samples of one prompt, use >= 2")
        if s.batch_size % s.group_size:
            raise ConfigError(f"sample.batch_size={s.batch_size} must be a multiple of sample.group_size="
                              f"{s.group_size}: {method} pairs samples of a group, so a chunk holds whole groups")
        if self.pairing == "adjacent" and s.group_size % 2:
            raise ConfigError(f"{OPTIONS_KEY}.pairing=adjacent needs an even sample.group_size, got {s.group_size}")
        if self.ratio_clip is not None and not 0 < self.ratio_clip < 1:
            raise ConfigError(f"{OPTIONS_KEY}.ratio_clip must be in (0, 1) or null, got {self.ratio_clip}")
        if self.tie_atol < 0:
            raise ConfigError(f"{OPTIONS_KEY}.tie_atol must be >= 0, got {self.tie_atol}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{OPTIONS_KEY}.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.preference == "human":
            if not self.labels_dir:
                raise ConfigError(f"{OPTIONS_KEY}.preference=human needs {OPTIONS_KEY}.labels_dir (the labelling "
                                  "queue folder served by `flowalign label serve`)")
            if self.pairing == "best_worst":
                raise ConfigError(f"{OPTIONS_KEY}.pairing=best_worst ranks by the reward; with preference=human "
                                  "use all or adjacent")
        if not 0 < self.min_labeled <= 1:
            raise ConfigError(f"{OPTIONS_KEY}.min_labeled must be in (0, 1], got {self.min_labeled}")
        if self.poll_s <= 0 or (self.label_timeout_s is not None and self.label_timeout_s <= 0):
            raise ConfigError(f"{OPTIONS_KEY}.poll_s and label_timeout_s must be > 0")


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


@dataclass
class _PairStore:
    """This process's trajectories of the round and its training pairs (local row indices)."""

    latents: Tensor  # [n, N+1, ...]
    log_probs: Tensor  # [n, N] (sampling policy)
    cond: Cond
    sigmas: Tensor
    plan: StepPlan
    pairs: Tensor  # long [m, 2]: (chosen, rejected) for D3PO, (a, b) for PRDP
    target: Tensor  # [m]: PRDP's reward difference (D3PO: ones)


# ----------------------------------------------------------------------------------------------- method
@METHODS.register("d3po")
class D3PO(Method):
    """D3PO on online pairs; preference from a reward or from people (see module docstring)."""

    name = "d3po"
    Options: ClassVar[type[PairOptions]] = PairOptions

    def __init__(self, cfg, adapter, reward_fn, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, adapter, reward_fn, runtime)
        s = cfg.sample
        self.opts = self.options(cfg)
        self.prompts, self.metadata = load_prompts(s.prompts)
        self.sampler = PromptSampler(len(self.prompts), seed=cfg.seed, shuffle=s.shuffle_prompts)
        self.train_guidance = s.guidance if cfg.train.train_cfg else 1.0
        self.need_uncond = s.guidance != 1.0 or self.train_guidance != 1.0
        self._store: _PairStore | None = None
        self.server = None
        if self.opts.preference == "human" and self.opts.serve and self.runtime.is_main:
            from flowalign.labeling import LabelServer

            self.server = LabelServer(self.opts.labels_dir, host=self.opts.serve_host,
                                      port=self.opts.serve_port, create=True).start()
            print(f"[{self.name}] label the pairs at {self.server.url}", flush=True)

    # ------------------------------------------------------------------------------------------ config
    @classmethod
    def options(cls, cfg) -> PairOptions:
        opts = from_dict(cls.Options, dict(cfg.train.method_options), OPTIONS_KEY)
        opts.check(cfg, cls.name)
        return opts

    @classmethod
    def check_config(cls, cfg) -> None:
        cls.options(cfg)
        s, t = cfg.sample, cfg.train
        if not sde.is_stochastic(s.kernel, s.noise_level):
            raise ConfigError(f"{cls.name} needs a stochastic kernel (a step log-prob): sample.kernel={s.kernel!r} "
                              f"with sample.noise_level={s.noise_level} draws no noise")
        if not t.beta > 0:
            raise ConfigError(f"train.beta is {cls.name}'s preference temperature and must be > 0 "
                              f"(D3PO 0.1), got {t.beta}")

    def check_world(self, world_size: int) -> None:
        n = self.cfg.global_batch // self.cfg.sample.batch_size
        if n % world_size:
            raise ValueError(f"{n} sampling chunks per round (sample.prompts_per_round * sample.group_size / "
                             f"sample.batch_size) cannot be split evenly over {world_size} processes")

    # ------------------------------------------------------------------------------------------ collect
    @torch.no_grad()
    def collect(self, state: TrainState) -> Collected:
        cfg, s, rt, o = self.cfg, self.cfg.sample, self.runtime, self.opts
        it, G, bs = state.iteration, s.group_size, s.batch_size
        t_start = time.perf_counter()
        row_pid = self.sampler.next(s.prompts_per_round).repeat_interleave(G)
        plan = make_plan(s.schedule, s.num_steps, generator=generator(cfg.seed, "plan", it), iteration=it,
                         **s.schedule_options)
        self.check_world(rt.world_size)
        per_rank = cfg.global_batch // bs // rt.world_size
        my_chunks = range(rt.rank * per_rank, (rt.rank + 1) * per_rank)
        row0 = my_chunks.start * bs
        neg = [s.negative_prompt] if self.need_uncond else None

        trajs, totals, parts, images, t_sample, t_reward = [], [], [], [], 0.0, 0.0
        for c in my_chunks:
            pids = row_pid[c * bs: (c + 1) * bs]
            gp = pids[::G]  # chunks hold whole groups
            t0 = time.perf_counter()
            with rt.autocast():
                cond = Cond.cat([self.adapter.encode([self.prompts[int(p)]], negative=neg) for p in gp])
                traj = sample(self.adapter, [self.prompts[int(p)] for p in gp], group_size=G, num_steps=s.num_steps,
                              kernel=s.kernel, noise_level=s.noise_level, plan=plan, guidance=s.guidance,
                              generator=generator(cfg.seed, "sample", it, c, device=rt.device),
                              same_noise=s.same_noise, batch_size=bs, negative_prompt=s.negative_prompt,
                              reduction=s.reduction, density=s.density, cond=cond)
            t1 = time.perf_counter()
            img = traj.images.float().clamp(0, 1)
            total, part = reward_parts(self.reward_fn, img, [self.prompts[int(p)] for p in pids],
                                       [dict(self.metadata[int(p)]) for p in pids])
            t_sample, t_reward = t_sample + t1 - t0, t_reward + time.perf_counter() - t1
            traj.images = None
            trajs.append(traj)
            totals.append(total)
            parts.append(part)
            if o.preference == "human" or not images:  # people see every pair; logs keep the first chunk
                images.append(img)

        local_r = torch.cat(totals)
        names = list(parts[0])
        total = rt.gather(local_r.to(rt.device)).cpu()
        comp = rt.gather(torch.stack([torch.cat([p[k] for p in parts]) for k in names], 1).to(rt.device)).cpu()
        cand = torch.tensor([(g * G + a, g * G + b) for g in range(len(local_r) // G)
                             for a, b in candidate_pairs(G, o.pairing, local_r[g * G:(g + 1) * G])],
                            dtype=torch.long)
        t0 = time.perf_counter()
        pairs, target, pm = self.label_pairs(it, cand, local_r, total, images, row_pid[row0: row0 + len(local_r)],
                                             row0)
        t_label = time.perf_counter() - t0
        self._store = _PairStore(
            latents=torch.cat([tr.latents for tr in trajs]), log_probs=torch.cat([tr.log_probs for tr in trajs]),
            cond=Cond.cat([tr.cond for tr in trajs]), sigmas=trajs[0].sigmas, plan=plan, pairs=pairs,
            target=target.to(rt.device))
        batches, num_updates, n_pairs = self._micro_batches(it, len(local_r) // G)

        metrics = {"reward_mean": float(total.mean()), "reward_std": float(total.std()) if len(total) > 1 else 0.0,
                   "pairs": n_pairs, "pairs_per_group": n_pairs / max(1, cfg.sample.prompts_per_round),
                   "trained_steps": len(plan.trained_indices()), **pm}
        for j, k in enumerate(names):
            metrics[f"reward_{k}_mean"] = float(comp[:, j].mean())
        timings = {"sample": t_sample, "reward": t_reward, "label": t_label, "collect": time.perf_counter() - t_start}
        return Collected(batches=batches, num_updates=num_updates, metrics=metrics, timings=timings,
                         num_samples=len(local_r), images=images[0][:16] if images else None)

    def label_pairs(self, it: int, cand: Tensor, rewards: Tensor, all_rewards: Tensor, images: list,
                    pids: Tensor, row0: int) -> tuple[Tensor, Tensor, dict[str, float]]:
        """``(pairs [m, 2] as (chosen, rejected), target [m], metrics)`` from the candidate pairs ``(a, b)``."""
        dr = rewards[cand[:, 0]] - rewards[cand[:, 1]]
        if self.opts.preference == "human":
            pairs, pm = self._human_pairs(it, cand, torch.cat(images), pids, row0)
            # how often people agree with the monitor reward (pairs the reward does not tie)
            lookup = {(int(a), int(b)): float(d) for (a, b), d in zip(cand, dr)}
            signs = [lookup.get((int(w), int(l)), -lookup.get((int(l), int(w)), 0.0)) for w, l in pairs]
            decided = [x for x in signs if abs(x) > self.opts.tie_atol]
            pm["human_reward_agreement"] = sum(x > 0 for x in decided) / len(decided) if decided else float("nan")
        else:
            keep = dr.abs() > self.opts.tie_atol
            flip = dr < 0
            pairs = torch.where(flip[:, None], cand.flip(1), cand)[keep]
            pm = {"tie_frac": float((~keep).float().mean()) if len(cand) else 0.0,
                  "pair_reward_gap": float(dr[keep].abs().mean()) if keep.any() else 0.0}
        return pairs, torch.ones(len(pairs)), pm

    # ------------------------------------------------------------------------------------------ people
    def _human_pairs(self, it: int, cand: Tensor, images: Tensor, pids: Tensor, row0: int
                     ) -> tuple[Tensor, dict[str, float]]:
        """Write this round's pairs to the labelling queue, wait for labels, return (chosen, rejected) pairs."""
        from flowalign import pairs as pf
        from flowalign.eval.media import save_png, save_video

        folder = Path(self.opts.labels_dir)
        sub = f"iter_{it:06d}"
        (folder / sub).mkdir(parents=True, exist_ok=True)
        video = images.ndim == 5
        u8 = (images * 255).round().to(torch.uint8).cpu()
        paths = {}
        for r in sorted(set(cand.flatten().tolist())):
            rel = f"{sub}/{row0 + r:06d}.{'mp4' if video else 'png'}"
            if not (folder / rel).exists():
                (save_video if video else save_png)(folder / rel, u8[r])
            paths[r] = rel
        rows = [{"id": f"it{it:06d}-{row0 + a:06d}-{row0 + b:06d}", "prompt": self.prompts[int(pids[a])],
                 "a": paths[a], "b": paths[b], "iteration": it} for a, b in cand.tolist()]
        pf.append_queue(folder, rows)
        labels, waited = self._wait_for_labels(folder / pf.LABELS_FILE, [r["id"] for r in rows])
        out, counts = [], {c: 0 for c in pf.CHOICES}
        for (a, b), row in zip(cand.tolist(), rows):
            lab = labels.get(row["id"])
            if lab is None:
                continue
            counts[lab.choice] += 1
            if lab.choice in ("a", "b"):
                out.append((a, b) if lab.choice == "a" else (b, a))
        n = max(1, len(rows))
        return (torch.tensor(out, dtype=torch.long).view(-1, 2),
                {"labeled_frac": sum(counts.values()) / n, "tie_frac": counts["tie"] / n,
                 "skip_frac": counts["skip"] / n, "label_wait_s": waited})

    def _wait_for_labels(self, path: Path, ids: list[str]):
        from tqdm.auto import tqdm

        from flowalign.pairs import read_labels

        o = self.opts
        need = math.ceil(o.min_labeled * len(ids))
        t0 = time.monotonic()
        bar = None
        while True:
            labels = read_labels(path)
            done = sum(i in labels for i in ids)
            if done >= need:
                if bar is not None:
                    bar.close()
                return labels, time.monotonic() - t0
            if bar is None and self.runtime.is_main and self.cfg.log.progress:
                bar = tqdm(total=need, desc=f"waiting for labels in {path.parent}", leave=False)
            if bar is not None:
                bar.n = done
                bar.refresh()
            if o.label_timeout_s is not None and time.monotonic() - t0 > o.label_timeout_s:
                if bar is not None:
                    bar.close()
                raise TimeoutError(f"{done} of {len(ids)} pairs labelled in {path} after {o.label_timeout_s} s "
                                   f"(need {need}, train.method_options.min_labeled={o.min_labeled}); is "
                                   f"`flowalign label serve {path.parent}` running?")
            time.sleep(o.poll_s)

    # ------------------------------------------------------------------------------------------ batches
    def _micro_batches(self, it: int, n_groups_local: int) -> tuple[list[Batch], int, int]:
        """Shared-seed shuffle of the round's groups (a group's pairs share rows, so they stay together), split into
        updates; this process's groups of each, packed into micro-batches of about ``train.batch_size`` rows.
        Every pair-step of an update weighs ``1 / (pairs of the update over all processes x trained steps)``."""
        cfg, rt, t, G = self.cfg, self.runtime, self.cfg.train, self.cfg.sample.group_size
        group_of = self._store.pairs[:, 0] // G
        local = torch.bincount(group_of, minlength=n_groups_local)
        counts = rt.gather(local.to(rt.device)).cpu()  # pairs per group, global group order
        off = int(rt.gather(torch.tensor([n_groups_local], device=rt.device)).cpu()[: rt.rank].sum())
        steps = self._store.plan.trained_indices()
        live = counts.nonzero().flatten()
        n_pairs = int(counts.sum())
        if n_pairs == 0 or not steps:
            return [], 0, n_pairs
        U = min(t.updates_per_iteration, len(live))
        per_mb = max(1, cfg.train_batch_size // G)  # groups per micro-batch
        batches = []
        for e in range(t.num_inner_epochs):
            order = live[torch.randperm(len(live), generator=generator(cfg.seed, "shuffle", it, e))] if t.shuffle \
                else live
            for u, part in enumerate(torch.tensor_split(order, U)):
                weight = 1.0 / (int(counts[part].sum()) * len(steps))
                mine = part[(part >= off) & (part < off + n_groups_local)] - off
                for i in range(0, len(mine), per_mb):
                    idx = torch.isin(group_of, mine[i: i + per_mb]).nonzero().flatten()
                    for j in steps:
                        batches.append(Batch({"pairs": idx, "step": j, "weight": weight}, update=e * U + u))
        return batches, t.num_inner_epochs * U, n_pairs

    # ------------------------------------------------------------------------------------------ loss
    def step_log_probs(self, rows: Tensor, j: int) -> tuple[sde.StepOut, Tensor]:
        """Policy step log-prob of ``rows`` at step ``j`` (with grad) and the reference's (no grad)."""
        st, s, rt = self._store, self.cfg.sample, self.runtime
        x, x_next = st.latents[rows, j], st.latents[rows, j + 1]
        cond = st.cond.index(rows)
        sigma, sigma_next = st.sigmas[j], st.sigmas[j + 1]
        with rt.autocast():
            out = self.adapter.predict(x, sigma, cond, self.train_guidance)
        new = sde.log_prob_of(s.kernel, x, x_next, out, sigma, sigma_next, s.noise_level, reduction=s.reduction,
                              density=s.density)
        return new, self.reference_log_prob(rows, j)

    def reference_log_prob(self, rows: Tensor, j: int) -> Tensor:
        """D3PO: the frozen initial model (LoRA disabled)."""
        st, s, rt = self._store, self.cfg.sample, self.runtime
        x, x_next = st.latents[rows, j], st.latents[rows, j + 1]
        with torch.no_grad(), rt.reference(), rt.autocast():
            out = self.adapter.predict(x, st.sigmas[j], st.cond.index(rows), self.train_guidance)
        return sde.log_prob_of(s.kernel, x, x_next, out, st.sigmas[j], st.sigmas[j + 1], s.noise_level,
                               reduction=s.reduction, density=s.density).log_prob

    def pair_loss(self, lr_a: Tensor, lr_b: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """D3PO: DPO on the clipped per-step log-ratios of (chosen, rejected)."""
        return dpo_loss(lr_a, lr_b, self.cfg.train.beta, self.opts.label_smoothing)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Any]]:
        st, j = self._store, batch.data["step"]
        pair_idx = batch.data["pairs"]
        rows, inv = torch.unique(st.pairs[pair_idx].flatten(), return_inverse=True)
        inv = inv.view(-1, 2)
        new, ref = self.step_log_probs(rows, j)
        lr = clipped_log_ratio(new.log_prob, ref.to(new.log_prob.device), self.opts.ratio_clip)
        per_pair, metrics = self.pair_loss(lr[inv[:, 0]], lr[inv[:, 1]], st.target[pair_idx])
        with torch.no_grad():
            raw = new.log_prob - ref.to(new.log_prob.device)
            clip = self.opts.ratio_clip
            metrics["log_ratio_abs"] = raw.abs().mean()
            if clip is not None:
                metrics["clipfrac"] = ((raw < math.log1p(-clip)) | (raw > math.log1p(clip))).float().mean()
        extra, em = self.extra_loss(new, rows, inv, j)
        metrics.update(em)
        loss = (per_pair + extra).sum() * batch.data["weight"]
        return loss, metrics

    def extra_loss(self, new: sde.StepOut, rows: Tensor, inv: Tensor, j: int) -> tuple[Tensor | float, dict]:
        """Per-pair extra terms (PRDP's KL to the base model); none for D3PO."""
        return 0.0, {}

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
