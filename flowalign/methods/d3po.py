"""D3PO (Yang et al., arXiv 2311.13231): DPO on the denoising steps of online sample pairs.

The round -- sample ``sample.group_size`` trajectories per prompt with a stochastic kernel, pair them inside each
group (``pairing``) -- is the shared ``pair_round.PairRound`` (PRDP composes it too). D3PO adds:

* **Preference** (``preference``): ``reward`` -- the higher total reward wins, ties (``|dr| <= tie_atol``) are
  dropped (D3PO's ``h = 0``); ``human`` -- the pair images go to a labelling queue folder (``labels_dir``, served by
  ``flowalign label serve``) and the method waits until ``min_labeled`` of this round's pairs carry a label in
  ``labels.jsonl`` (``a``/``b`` train, ``tie``/``skip`` are dropped). The configured reward is still computed and
  logged as a monitor (and its agreement with the human labels). The method only writes and reads files
  (``flowalign.pairs``); ``serve: true`` starts the app named by ``label_app`` (a ``module:attr`` string, by default
  the web app of ``flowalign.labeling``), so the method imports no server.
* **Loss** per pair (w = preferred, l = rejected) and trained step ``j``, against the frozen reference (LoRA
  disabled, no grad)::

      rho_i = clip(exp(log p_theta(x^i_{j+1} | x^i_j) - log p_ref(x^i_{j+1} | x^i_j)), 1 - eps, 1 + eps)
      L     = -log sigmoid(beta (log rho_w - log rho_l))

  with ``beta = train.beta`` (D3PO 0.1) and ``eps = ratio_clip`` (D3PO 0.1). Log-probs use ``sample.reduction``
  (``mean`` over latent dims, as DDPO/D3PO). Each update's objective is the mean over its pairs and trained
  steps; the policy and the reference see the pair's rows in one batched forward each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowalign.adapter import Adapter
from flowalign.config import Config, help_field
from flowalign.data import RewardFn
from flowalign import pairs as pf
from flowalign.losses import dpo_loss
from flowalign.methods.base import METHODS, Batch, Collected, Method, Runtime, TrainState, option_error
from flowalign.methods.options import compose_options
from flowalign.methods.pair_round import (
    PairOptions,
    PairRound,
    PairStore,
    RoundRewards,
    check_pair_config,
    check_ratio_clip,
)
from flowalign.registry import import_string


@dataclass
class D3POLoss:
    """D3PO's loss options."""

    ratio_clip: float | None = help_field(0.1, "eps of the per-step ratio clip to [1-eps, 1+eps] (D3PO 0.1); "
                                               "null = none.")
    label_smoothing: float = help_field(0.0, "cDPO label smoothing of the DPO loss (0 = D3PO).")

    def check(self, cfg) -> None:
        check_ratio_clip(self.ratio_clip)
        if not 0 <= self.label_smoothing < 0.5:
            raise option_error("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")


@METHODS.register("d3po")
class D3PO(Method):
    """D3PO on online pairs; preference from a reward or from people (see module docstring)."""

    name = "d3po"
    Options = compose_options("D3POOptions", PairOptions, D3POLoss)

    def __init__(self, cfg: Config, adapter: Adapter, reward_fn: RewardFn, runtime: Runtime | None = None) -> None:
        super().__init__(cfg, adapter, reward_fn, runtime)
        opts = self.options(cfg)
        self.pair_opts, self.loss_opts = opts.part(PairOptions), opts.part(D3POLoss)
        human = self.pair_opts.preference == "human"
        self.round = PairRound(cfg, adapter, reward_fn, self.runtime, self.pair_opts, self.label_pairs,
                               keep_images=human)
        self.component = self.round
        self._store: PairStore | None = None
        self.server = None  # the labelling app serve=true started (main process)
        o = self.pair_opts
        if human and o.serve and self.runtime.is_main:
            app = import_string(o.label_app)
            self.server = app(o.labels_dir, host=o.serve_host, port=o.serve_port, create=True).start()
            print(f"[{self.name}] label the pairs at {self.server.url}", flush=True)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        check_pair_config(cls.name, cfg)


    def collect(self, state: TrainState) -> Collected:
        self._store, collected = self.round.collect(state)
        return collected

    # ------------------------------------------------------------------------------------------ preference
    def label_pairs(self, r: RoundRewards) -> tuple[Tensor, Tensor, dict[str, float]]:
        """``(pairs [m, 2] as (chosen, rejected), ones [m], metrics)`` from the candidate pairs ``(a, b)``."""
        o, cand = self.pair_opts, r.cand
        dr = r.rewards[cand[:, 0]] - r.rewards[cand[:, 1]]
        if o.preference == "human":
            pairs, pm = self.human_pairs(r)
            # how often people agree with the monitor reward (pairs the reward does not tie)
            lookup = {(int(a), int(b)): float(d) for (a, b), d in zip(cand, dr)}
            signs = [lookup.get((int(w), int(l)), -lookup.get((int(l), int(w)), 0.0)) for w, l in pairs]
            decided = [x for x in signs if abs(x) > o.tie_atol]
            pm["human_reward_agreement"] = sum(x > 0 for x in decided) / len(decided) if decided else float("nan")
        else:
            keep = dr.abs() > o.tie_atol
            flip = dr < 0
            pairs = torch.where(flip[:, None], cand.flip(1), cand)[keep]
            pm = {"tie_frac": float((~keep).float().mean()) if len(cand) else 0.0,
                  "pair_reward_gap": float(dr[keep].abs().mean()) if keep.any() else 0.0}
        return pairs, torch.ones(len(pairs)), pm

    def human_pairs(self, r: RoundRewards) -> tuple[Tensor, dict[str, float]]:
        """Write this round's pairs to the labelling queue, wait for labels, return (chosen, rejected) pairs."""
        o, it, row0 = self.pair_opts, r.iteration, r.row0
        folder, sub = Path(o.labels_dir), f"iter_{r.iteration:06d}"
        (folder / sub).mkdir(parents=True, exist_ok=True)
        images = torch.cat(r.images)
        video = images.ndim == 5
        u8 = (images * 255).round().to(torch.uint8).cpu()
        paths = {}
        for i in sorted(set(r.cand.flatten().tolist())):
            rel = f"{sub}/{row0 + i:06d}.{'mp4' if video else 'png'}"
            if not (folder / rel).exists():
                pf.save_media(folder / rel, u8[i])
            paths[i] = rel
        rows = [{"id": f"it{it:06d}-{row0 + a:06d}-{row0 + b:06d}", "prompt": self.round.prompts[int(r.pids[a])],
                 "a": paths[a], "b": paths[b], "iteration": it} for a, b in r.cand.tolist()]
        pf.append_queue(folder, rows)
        labels, waited = pf.wait_for_labels(folder / pf.LABELS_FILE, [q["id"] for q in rows], o.min_labeled,
                                            o.label_timeout_s, o.poll_s,
                                            progress=self.runtime.is_main and self.cfg.log.progress)
        out, counts = [], {c: 0 for c in pf.CHOICES}
        for (a, b), row in zip(r.cand.tolist(), rows):
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

    # ------------------------------------------------------------------------------------------ loss
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Any]]:
        st, idx = self._store, batch.data["pairs"]
        step = self.round.log_ratios(st, idx, batch.data["step"], self.round.frozen_log_prob,
                                     self.loss_opts.ratio_clip)
        lr, inv = step.lr, step.inv
        per_pair, metrics = dpo_loss(lr[inv[:, 0]], lr[inv[:, 1]], self.cfg.train.beta,
                                     self.loss_opts.label_smoothing)
        metrics.update(step.metrics)
        return per_pair.sum() * batch.data["weight"], metrics

    # ------------------------------------------------------------------------------------------ state


    def close(self) -> None:
        super().close()
        if self.server is not None:
            self.server.stop()
            self.server = None
