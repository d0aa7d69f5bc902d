"""Evaluation statistics over tidy rows ``{prompt, prompt_idx, seed, variant, reward, value}``.

* ``bootstrap_ci`` -- percentile bootstrap (Efron & Tibshirani 1993, ch. 13) of a mean, optionally a cluster
  bootstrap that resamples whole groups (prompts): images of one prompt are correlated, so resampling images
  would understate the uncertainty of a per-prompt comparison.
* ``win_rate`` -- paired comparison with the base on the same ``(prompt, seed)`` (same initial noise):
  ``P(v > b) + 0.5 P(v == b)``, with a cluster-bootstrap CI.
* ``verifier_accuracy`` -- GenEval-style accuracy from a verifier reward whose value is the fraction of satisfied
  checks in [0, 1]: strict = share of images passing every check (``value == 1``), partial = mean fraction.
* ``pairwise_diversity`` -- mean pairwise cosine distance ``1 - cos(f_i, f_j)`` of image features within a
  prompt (across seeds), averaged over prompts; features from CLIP (a reward's ``image_features``) or pixels.
* ``reward_hacking`` -- the optimised reward against a held-out one: flagged when the optimised reward's mean gain
  over the base is positive while the held-out reward's gain has its whole 95% CI below zero.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

VERIFIER_REWARDS = ("shapes", "shapes_verifier", "geneval")


@dataclass
class CI:
    """A point estimate with a two-sided confidence interval."""

    mean: float
    lo: float
    hi: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.lo:.4g}, {self.hi:.4g}]"


def _bootstrap_means(x: np.ndarray, groups: Sequence | None, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` bootstrap resamples of ``x``: each draws ``G`` units with replacement (units =
    values, or the distinct ``groups`` labels when given, whose values all come along) and its mean is
    ``sum / count`` of the drawn units. With a single group the values themselves are resampled."""
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    inv = None
    if groups is not None:
        labels = np.asarray(groups)
        if labels.shape[0] != x.size:
            raise ValueError(f"groups has {labels.shape[0]} labels for {x.size} values")
        _, inv = np.unique(labels, return_inverse=True)
    if inv is None or inv.max() == 0:  # one cluster says nothing about between-cluster spread: resample values
        sums, counts = x, np.ones_like(x)
    else:
        sums, counts = np.bincount(inv, weights=x), np.bincount(inv).astype(np.float64)
    g = sums.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    step = max(1, (1 << 22) // g)  # bound the index matrix to ~32 MB
    for i in range(0, n_resamples, step):
        idx = rng.integers(0, g, size=(min(step, n_resamples - i), g))
        means[i:i + idx.shape[0]] = sums[idx].sum(1) / counts[idx].sum(1)
    return means


def _as_values(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError(f"{what} needs at least one value")
    return x


def bootstrap_ci(values: Sequence[float] | np.ndarray, groups: Sequence | None = None, *, confidence: float = 0.95,
                 n_resamples: int = 10_000, seed: int = 0) -> CI:
    """Mean of ``values`` with a percentile-bootstrap CI: the ``(1 - confidence)/2`` and ``(1 + confidence)/2``
    quantiles of the resampled means (clustered by ``groups`` when given). Deterministic for a given ``seed``."""
    x = _as_values(values, "bootstrap_ci")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(_bootstrap_means(x, groups, n_resamples, seed), [alpha, 1 - alpha])
    return CI(float(x.mean()), float(lo), float(hi), int(x.size))


def bootstrap_p_gain(gains: Sequence[float] | np.ndarray, groups: Sequence | None = None, *,
                     n_resamples: int = 20_000, seed: int = 0) -> float:
    """One-sided bootstrap p-value of "mean gain <= 0": the share of resampled means (clustered by ``groups``,
    e.g. prompts) at or below zero (Efron & Tibshirani 1993, section 16.4). Paired gains come from ``paired``."""
    x = _as_values(gains, "bootstrap_p_gain")
    return float((_bootstrap_means(x, groups, n_resamples, seed) <= 0).mean())


def win_indicators(values: Sequence[float], base: Sequence[float], tie: float = 0.5, tol: float = 0.0) -> np.ndarray:
    """Per pair: 1 if ``values > base``, ``tie`` if equal within ``tol``, else 0."""
    v, b = np.asarray(values, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if v.shape != b.shape:
        raise ValueError(f"win_rate needs paired values: got shapes {v.shape} and {b.shape}")
    d = v - b
    return np.where(np.abs(d) <= tol, tie, (d > 0).astype(np.float64))


def win_rate(values: Sequence[float], base: Sequence[float], groups: Sequence | None = None, *, tie: float = 0.5,
             tol: float = 0.0, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> CI:
    """Share of pairs where the variant beats the base (ties count ``tie``), with a bootstrap CI."""
    w = win_indicators(values, base, tie, tol)
    return bootstrap_ci(w, groups, confidence=confidence, n_resamples=n_resamples, seed=seed)


# ------------------------------------------------------------------------------------------ tidy tables
def _index(rows: Sequence[Mapping]) -> dict[tuple[str, str], dict[tuple[int, int], float]]:
    """``{(variant, reward): {(prompt_idx, seed): value}}``."""
    out: dict[tuple[str, str], dict[tuple[int, int], float]] = defaultdict(dict)
    for r in rows:
        out[(r["variant"], r["reward"])][(int(r["prompt_idx"]), int(r["seed"]))] = float(r["value"])
    return out


def _ordered(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def paired(rows: Sequence[Mapping], reward: str, variant: str, base: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values of ``variant`` and ``base`` on their common ``(prompt, seed)`` pairs, and the prompt of each pair."""
    idx = _index(rows)
    v, b = idx.get((variant, reward), {}), idx.get((base, reward), {})
    common = sorted(set(v) & set(b))
    if not common:
        raise ValueError(f"no (prompt, seed) pairs shared by variants {variant!r} and {base!r} for reward {reward!r}")
    return (np.array([v[k] for k in common]), np.array([b[k] for k in common]), np.array([k[0] for k in common]))


def reward_table(rows: Sequence[Mapping], base: str | None = None, *, confidence: float = 0.95,
                 n_resamples: int = 10_000, seed: int = 0) -> list[dict]:
    """Per (reward, variant): mean with CI, and against the base the paired gain and win rate with CIs.
    Resampling is clustered by prompt."""
    variants = _ordered(r["variant"] for r in rows)
    rewards = _ordered(r["reward"] for r in rows)
    base = base or (variants[0] if variants else None)
    idx = _index(rows)
    kw = dict(confidence=confidence, n_resamples=n_resamples, seed=seed)
    table = []
    for reward in rewards:
        for variant in variants:
            vals = idx.get((variant, reward))
            if not vals:
                continue
            keys = sorted(vals)
            entry = {"reward": reward, "variant": variant,
                     "mean": bootstrap_ci([vals[k] for k in keys], [k[0] for k in keys], **kw).as_dict()}
            if variant != base and (base, reward) in idx:
                v, b, g = paired(rows, reward, variant, base)
                entry["gain"] = bootstrap_ci(v - b, g, **kw).as_dict()
                entry["win_rate"] = win_rate(v, b, g, **kw).as_dict()
            table.append(entry)
    return table


def verifier_accuracy(rows: Sequence[Mapping], reward: str, *, tol: float = 1e-6, confidence: float = 0.95,
                      n_resamples: int = 10_000, seed: int = 0) -> dict[str, dict]:
    """``{variant: {"strict": CI, "partial": CI}}`` from a verifier reward valued in [0, 1] (fraction of checks
    passed): strict counts images with every check passed (GenEval's accuracy), partial averages the fraction."""
    idx = _index(rows)
    kw = dict(confidence=confidence, n_resamples=n_resamples, seed=seed)
    out = {}
    for variant in _ordered(r["variant"] for r in rows):
        vals = idx.get((variant, reward))
        if not vals:
            continue
        keys = sorted(vals)
        x, g = np.array([vals[k] for k in keys]), [k[0] for k in keys]
        if x.min() < -tol or x.max() > 1 + tol:
            raise ValueError(f"verifier reward {reward!r} has values outside [0, 1] ({x.min()}, {x.max()}); "
                             "strict/partial accuracy needs the fraction of satisfied checks")
        out[variant] = {"strict": bootstrap_ci((x >= 1 - tol).astype(float), g, **kw).as_dict(),
                        "partial": bootstrap_ci(x, g, **kw).as_dict()}
    return out


def reward_hacking(rows: Sequence[Mapping], optimized: str, held_out: str, base: str | None = None, *,
                   confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> list[dict]:
    """Per non-base variant: paired gains over the base of the optimised and the held-out reward (with CIs), and
    ``flagged`` when the optimised gain is positive while the held-out gain's CI lies entirely below zero."""
    if optimized == held_out:
        raise ValueError(f"optimized and held_out must be different rewards, both are {optimized!r}")
    variants = _ordered(r["variant"] for r in rows)
    base = base or variants[0]
    kw = dict(confidence=confidence, n_resamples=n_resamples, seed=seed)
    report = []
    for variant in variants:
        if variant == base:
            continue
        v, b, g = paired(rows, optimized, variant, base)
        opt = bootstrap_ci(v - b, g, **kw)
        v, b, g = paired(rows, held_out, variant, base)
        held = bootstrap_ci(v - b, g, **kw)
        flagged = opt.mean > 0 and held.hi < 0
        report.append({"variant": variant, "optimized": optimized, "held_out": held_out,
                       "optimized_gain": opt.as_dict(), "held_out_gain": held.as_dict(), "flagged": bool(flagged)})
    return report


# ------------------------------------------------------------------------------------------ diversity
def pairwise_diversity(features: Tensor) -> float:
    """Mean over pairs ``i < j`` of the cosine distance ``1 - cos(f_i, f_j)`` of ``features [n, d]`` (0 for n<2)."""
    f = F.normalize(features.detach().double().flatten(1), dim=1)
    n = f.shape[0]
    if n < 2:
        return 0.0
    sim = f @ f.T
    iu = torch.triu_indices(n, n, offset=1)
    return float((1 - sim[iu[0], iu[1]]).mean())


def pixel_features(images: Tensor, size: int = 32) -> Tensor:
    """Weight-free features: the image (first frame for video) area-resized to ``size`` x ``size`` and centred
    per image, so the cosine distance is a correlation distance of the coarse layouts."""
    x = images.float()
    if x.ndim == 5:
        x = x[:, 0]
    if x.max() > 1.5:  # uint8
        x = x / 255.0
    x = F.interpolate(x, size=(size, size), mode="area").flatten(1)
    return x - x.mean(dim=1, keepdim=True)


def diversity(images_by_prompt: Mapping[object, Tensor],
              embed: Callable[[Tensor], Tensor] = pixel_features) -> CI:
    """Per-prompt pairwise diversity (across seeds) averaged over prompts, with a bootstrap CI over prompts."""
    per_prompt = []
    for imgs in images_by_prompt.values():
        if imgs.shape[0] >= 2:
            with torch.no_grad():
                per_prompt.append(pairwise_diversity(embed(imgs)))
    if not per_prompt:
        raise ValueError("diversity needs at least two images (seeds) of one prompt")
    return bootstrap_ci(per_prompt)


def feature_fn(name: str, rewards: Mapping[str, object] | None = None) -> Callable[[Tensor], Tensor]:
    """``"pixels"`` or the name of a reward with ``image_features`` (e.g. ``clip_score``: CLIP embeddings)."""
    if name == "pixels":
        return pixel_features
    reward = (rewards or {}).get(name)
    if reward is None or not hasattr(reward, "image_features"):
        allowed = ["pixels"] + [k for k, r in (rewards or {}).items() if hasattr(r, "image_features")]
        raise ValueError(f"diversity features {name!r} unknown; allowed: {', '.join(allowed)}")

    def embed(images: Tensor) -> Tensor:
        x = images.float() / 255.0 if not images.is_floating_point() else images
        return reward.image_features(x[:, 0] if x.ndim == 5 else x).float().cpu()

    return embed


def verifier_rewards(rewards: Sequence[str]) -> list[str]:
    """The rewards whose values are verifier pass fractions (the shapes verifier, GenEval)."""
    return [r for r in rewards if r in VERIFIER_REWARDS or r.startswith("shapes")]


def summarize(rows: Sequence[Mapping], base: str | None = None, *, optimized: str | None = None,
              held_out: str | None = None, verifiers: Sequence[str] | None = None, confidence: float = 0.95,
              n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Everything the gallery's summary shows: the reward table, verifier accuracy and the hacking report."""
    variants = _ordered(r["variant"] for r in rows)
    rewards = _ordered(r["reward"] for r in rows)
    base = base or (variants[0] if variants else None)
    kw = dict(confidence=confidence, n_resamples=n_resamples, seed=seed)
    out: dict = {"base": base, "variants": variants, "rewards": rewards, "confidence": confidence,
                 "table": reward_table(rows, base, **kw), "accuracy": {}, "hacking": []}
    for name in (verifier_rewards(rewards) if verifiers is None else verifiers):
        if name in rewards:
            out["accuracy"][name] = verifier_accuracy(rows, name, **kw)
    if optimized and held_out and len(variants) > 1:
        for name, arg in ((optimized, "optimized"), (held_out, "held_out")):
            if name not in rewards:
                raise ValueError(f"{arg}={name!r} is not among the scored rewards {rewards}")
        out["hacking"] = reward_hacking(rows, optimized, held_out, base, **kw)
    return out
