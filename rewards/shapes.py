"""Rewards of the shapes world: a programmatic GenEval-style verifier and a differentiable proxy.

``shapes_geneval`` (pixels only, no network):

1. *Segmentation.* The background ``b`` is the median of the border pixels. A pixel ``p`` is read as a mix of the
   background and palette color ``c``: coverage ``alpha_c = <p - b, c - b> / |c - b|^2`` and residual
   ``r_c = |p - b - alpha_c (c - b)|`` (RGB in [0, 1]). It is labelled ``argmin_c r_c`` over colors with
   ``alpha_c >= 1/2`` (more than half covered: the right cut for anti-aliased edges), ``r_c <= color_threshold``
   and a *core* pixel of that color (best explained by ``c`` with ``0.8 <= alpha_c <= 1.25``) among its 8
   neighbours; otherwise background / unlabelled (mud, or the rim of another color).
2. *Objects.* Connected components (4-connectivity, ``scipy.ndimage.label``) of each color mask with at least
   ``min_area`` pixels (default ``WorldConfig.min_area``, 30% of the smallest triangle).
3. *Shape.* The component's soft coverage ``alpha_c`` is compared with each shape fitted by moments (same area
   and centroid, rendered anti-aliased): ``shape = argmax soft-IoU``; below ``min_iou`` it is a blob (an
   unrecognised object, which still counts against the ``only`` clause).
4. *Clauses* of the parsed prompt (``flowalign.shapes``): exact count per term, the relation between centres with
   ``relation_margin``, and ``only`` (no other objects). ``mode="strict"`` returns 1 iff all hold (GenEval's
   strict accuracy), ``"partial"`` the fraction that holds, ``"strict+partial"`` their sum (the RL reward of the
   prototype: dense signal plus a bonus for full success).

Known failure modes (by construction, tested in ``tests/test_shapes.py``): two objects of the *same* color that
touch merge into one component (one object, misclassified shape); objects of different colors that touch are
separated by color. Colors within ``color_threshold`` of a palette entry are snapped to it, so a generated
"reddish" blob counts as red; a color halfway between two palette entries is unlabelled.

``shapes_proxy`` (differentiable, torch only): soft color masks ``m_k(p) = softmax_k(-||x(p) - rgb_k||^2 / tau)``
over palette + backgrounds and coverages ``a_k = mean_p m_k(p)``. With ``a*_c = sum_terms count * E[area(shape)] /
HW`` the expected coverage of each prompted color and ``mu_k`` the soft centre of mass of color ``k``,
``R = - sum_{c in prompt} |a_c - a*_c| / a*_c - sum_{c not in prompt} a_c / a_min
- relu(margin - sign (mu_1 - mu_0)[axis]) / W`` (the last term for relations between two different colors).
Higher is better, 0 at best. It sees colors, amounts and positions only, not shapes: a proxy, as its name says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowalign.rewards.base import REWARDS, Reward
from flowalign.shapes import BACKGROUNDS, LEVELS, PALETTE, RELATIONS, SHAPES, Spec, WorldConfig, parse

MODES = ("strict", "partial", "strict+partial")


@dataclass(frozen=True)
class Detection:
    """One detected object: color name, shape (``"blob"`` if unrecognised), bounding-box centre (px), area (px)
    and best template IoU."""

    color: str
    shape: str
    cx: float
    cy: float
    area: int
    iou: float


_SS = 4  # supersampling of the template coverage maps


def _template_coverage(shape: str, area: float, cx: float, cy: float, h: int, w: int) -> np.ndarray:
    """Anti-aliased coverage ``[h, w]`` of ``shape`` with the given area and centroid (crop pixel units), each pixel
    the mean of ``_SS x _SS`` point samples. Sizes from the area: square side ``sqrt(A)``, circle diameter
    ``sqrt(4A/pi)``, upright triangle base = height = ``sqrt(2A)`` with its centroid at 2/3 of the height."""
    y = (np.arange(h * _SS) + 0.5)[:, None] / _SS
    x = (np.arange(w * _SS) + 0.5)[None, :] / _SS
    if shape == "square":
        r = np.sqrt(area) / 2
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif shape == "circle":
        r = np.sqrt(area / np.pi)
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    else:  # triangle, apex up
        s = np.sqrt(2 * area)
        y0 = cy - 2 * s / 3
        inside = (y >= y0) & (y <= y0 + s) & (np.abs(x - cx) <= (s / 2) * (y - y0) / s)
    return inside.reshape(h, _SS, w, _SS).mean((1, 3))


def classify(coverage: np.ndarray) -> tuple[str, float]:
    """``(shape, soft IoU)`` of one object's coverage map ``[h, w]`` in [0, 1] (zero outside the object).

    Each shape is fitted by moments (same area ``A = sum(coverage)`` and centroid) and rendered anti-aliased;
    ``IoU = sum(min(c, t)) / sum(max(c, t))``; the best shape wins. Works from ~8 px objects up, where binary
    masks can no longer tell a half-pixel-offset square from a circle."""
    h, w = coverage.shape
    area = float(coverage.sum())
    if area <= 0:
        return "blob", 0.0
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = float((coverage * xs).sum() / area), float((coverage * ys).sum() / area)
    best, best_iou = "blob", 0.0
    for name in SHAPES:
        t = _template_coverage(name, area, cx, cy, h, w)
        iou = float(np.minimum(coverage, t).sum() / max(np.maximum(coverage, t).sum(), 1e-9))
        if iou > best_iou:
            best, best_iou = name, iou
    return best, best_iou


def detect(image: np.ndarray, cfg: WorldConfig, color_threshold: float = 0.25, min_area: float | None = None,
           min_iou: float = 0.6) -> list[Detection]:
    """Objects in one image ``float [H, W, 3]`` in [0, 1] (see module docstring, steps 1-3)."""
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    H, W_ = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    names = list(cfg.colors)
    refs = np.array([PALETTE[c] for c in names], dtype=np.float32) / 255.0  # [K, 3]
    v = refs - bg[None]  # direction background -> color
    q = img - bg  # [H, W, 3]
    alpha = (q @ v.T) / (v * v).sum(-1)  # [H, W, K]: coverage of color k if the pixel mixes bg and color k
    resid = np.linalg.norm(q[:, :, None, :] - alpha[..., None] * v[None, None], axis=-1)
    ok = (resid <= color_threshold) & (alpha >= 0.5)
    best = np.where(ok, resid, np.inf).argmin(-1)
    # cores: pixels best explained by (nearly) pure color k; an edge pixel (alpha >= 1/2) only counts next to a core
    # of its color, so the anti-aliased rim of red on white (which is also a plausible pure pink) is never an object
    core = ok & (alpha >= 0.8) & (alpha <= 1.25) & (best[..., None] == np.arange(len(names)))
    near = np.stack([ndimage.binary_dilation(core[..., k], np.ones((3, 3), bool)) for k in range(len(names))], -1)
    cand = np.where(ok & near, resid, np.inf)
    lab = cand.argmin(-1)
    lab[~np.isfinite(cand.min(-1))] = -1
    min_area = cfg.min_area if min_area is None else min_area
    cov = np.clip(alpha, 0.0, 1.0)
    out: list[Detection] = []
    for k, name in enumerate(names):
        comps, n = ndimage.label(lab == k)
        if n == 0:
            continue
        for i, sl in enumerate(ndimage.find_objects(comps), start=1):
            m = comps[sl] == i
            area = int(m.sum())
            if area < min_area:
                continue
            # soft coverage over the box grown by 1 px, restricted to the component and its 1-px ring
            y0, y1 = max(sl[0].start - 1, 0), min(sl[0].stop + 1, H)
            x0, x1 = max(sl[1].start - 1, 0), min(sl[1].stop + 1, W_)
            region = ndimage.binary_dilation(comps[y0:y1, x0:x1] == i, np.ones((3, 3), bool))
            region &= (lab[y0:y1, x0:x1] == k) | (lab[y0:y1, x0:x1] == -1)
            shape, iou = classify(cov[y0:y1, x0:x1, k] * region)
            if iou < min_iou:
                shape = "blob"
            # bounding-box centre (as the renderer's Obj.cx/cy; a triangle's centroid would sit h/6 lower)
            out.append(Detection(name, shape, (sl[1].start + sl[1].stop) / 2, (sl[0].start + sl[0].stop) / 2,
                                 area, iou))
    return out


def evaluate_clauses(spec: Spec, objects: list[Any], relation_margin: float) -> dict[str, bool]:
    """Truth of each clause of ``spec`` over ``objects`` (anything with ``color, shape, cx, cy``: detections or
    ground-truth ``flowalign.shapes.Obj``). Keys: ``count:0``, ``count:1``, ``relation``, ``only``."""
    res: dict[str, bool] = {}
    groups = []
    for i, o in enumerate(spec.objects):
        g = [d for d in objects if d.color == o.color and d.shape == o.shape]
        groups.append(g)
        res[f"count:{i}"] = len(g) == o.count
    if spec.relation is not None:
        axis, sign = RELATIONS[spec.relation]
        pos = (lambda d: d.cx) if axis == 0 else (lambda d: d.cy)
        a, b = groups
        res["relation"] = bool(a and b) and all(sign * (pos(y) - pos(x)) > relation_margin for x in a for y in b)
    res["only"] = all(any(d.color == o.color and d.shape == o.shape for o in spec.objects) for d in objects)
    return res


def _spec_of(prompt: str, meta: dict | None) -> Spec:
    if meta and "spec" in meta:
        s = meta["spec"]
        return s if isinstance(s, Spec) else Spec.from_dict(s)
    return parse(prompt)


def _world(level: int | WorldConfig | dict) -> WorldConfig:
    if isinstance(level, WorldConfig):
        return level
    if isinstance(level, dict):
        return WorldConfig.from_dict(level)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)} or a WorldConfig, got {level!r}")
    return LEVELS[level]


@REWARDS.register("shapes_geneval")
class ShapesGenEval(Reward):
    """GenEval-style verifier of the shapes world (see module docstring); ``mode`` in ``MODES``."""

    name = "shapes_geneval"
    differentiable = False

    def __init__(self, mode: str = "strict", level: int | WorldConfig | dict = 1, color_threshold: float = 0.25,
                 min_iou: float = 0.6, device: str | torch.device = "cpu", batch_size: int | None = 256) -> None:
        super().__init__(device, batch_size)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not allowed. Allowed: {', '.join(MODES)}")
        self.mode = mode
        self.world = _world(level)
        self.color_threshold = color_threshold
        self.min_iou = min_iou

    def detect(self, image: Tensor) -> list[Detection]:
        """Detections in one image ``[3, H, W]`` in [0, 1]."""
        return detect(image.detach().permute(1, 2, 0).cpu().numpy(), self.world, self.color_threshold,
                      min_iou=self.min_iou)

    def clauses(self, image: Tensor, prompt: str, meta: dict | None = None) -> dict[str, bool]:
        """Per-clause verdicts for one image (for logs and the precision/recall tests)."""
        return evaluate_clauses(_spec_of(prompt, meta), self.detect(image), self.world.relation_margin)

    def score(self, inputs: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        out = []
        for img, p, m in zip(inputs, prompts, metadata):
            c = self.clauses(img, p, m)
            strict = float(all(c.values()))
            partial = sum(c.values()) / len(c)
            out.append({"strict": strict, "partial": partial, "strict+partial": strict + partial}[self.mode])
        return torch.tensor(out, dtype=torch.float32)


@REWARDS.register("shapes_proxy")
class ShapesProxy(Reward):
    """Differentiable color-coverage / position proxy of the verifier (see module docstring)."""

    name = "shapes_proxy"
    differentiable = True

    def __init__(self, level: int | WorldConfig | dict = 1, tau: float = 0.02, device: str | torch.device = "cpu",
                 batch_size: int | None = 256) -> None:
        super().__init__(device, batch_size)
        self.world = _world(level)
        self.tau = tau
        s = sum(self.world.size_range) / 2
        #: mean area of each shape as a fraction of the canvas
        self.shape_area = {"circle": np.pi / 4 * s * s, "square": s * s, "triangle": s * s / 2}
        self.shape_area = {k: v / self.world.image_size**2 for k, v in self.shape_area.items()}
        assert set(self.shape_area) == set(SHAPES)

    def score(self, inputs: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        cfg = self.world
        x = inputs.float()
        _, _, H, W = x.shape
        names = list(cfg.colors) + list(cfg.backgrounds)
        refs = torch.tensor([PALETTE[c] for c in cfg.colors] + [BACKGROUNDS[b] for b in cfg.backgrounds],
                            dtype=x.dtype, device=x.device) / 255.0  # [K, 3]
        d2 = ((x[:, None] - refs[None, :, :, None, None]) ** 2).sum(2)  # [B, K, H, W]
        m = torch.softmax(-d2 / self.tau, dim=1)
        cover = m.mean((2, 3))  # [B, K]
        xs = (torch.arange(W, dtype=x.dtype, device=x.device) + 0.5)
        ys = (torch.arange(H, dtype=x.dtype, device=x.device) + 0.5)
        mass = m.sum((2, 3)) + 1e-6
        mu = torch.stack([(m.sum(2) * xs).sum(-1) / mass, (m.sum(3) * ys).sum(-1) / mass], -1)  # [B, K, 2]
        out = []
        for b, (p, meta) in enumerate(zip(prompts, metadata)):
            spec = _spec_of(p, meta)
            target: dict[str, float] = {}
            for o in spec.objects:
                target[o.color] = target.get(o.color, 0.0) + o.count * self.shape_area[o.shape]
            r = x.new_zeros(())
            for c, a in target.items():
                r = r - (cover[b, names.index(c)] - a).abs() / a
            for c in cfg.colors:  # colors not in the prompt should be absent
                if c not in target:
                    r = r - cover[b, names.index(c)] / min(self.shape_area.values())
            if spec.relation is not None and spec.objects[0].color != spec.objects[1].color:
                axis, sign = RELATIONS[spec.relation]
                i0, i1 = names.index(spec.objects[0].color), names.index(spec.objects[1].color)
                gap = sign * (mu[b, i1, axis] - mu[b, i0, axis])
                r = r - torch.relu(cfg.relation_margin - gap) / W
            out.append(r)
        return torch.stack(out)
