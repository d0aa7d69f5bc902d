"""The shapes world: a prompt grammar, deterministic train / held-out splits, a PIL renderer and a dataset generator.

This is the embedded default of flowalign (no downloads): a tiny text-to-image model is pretrained on images drawn
here (``scripts/pretrain_shapes.py``) and aligned with the programmatic verifier of ``flowalign.rewards.shapes``.

Grammar (one level of the world is a :class:`WorldConfig`)::

    prompt   := object | object RELATION object
    object   := COUNT COLOR SHAPE        # "a red circle", "two green triangles"
    COUNT    := "a" | "two" | "three" | "four"
    RELATION := "left of" | "right of" | "above" | "below"

e.g. ``"a red circle left of a blue square"``. A prompt parses into a :class:`Spec` (objects + optional relation),
which is what the renderer draws and what the verifier checks. The clauses of a spec (see :func:`clauses`) are

* ``count:i``  -- exactly ``count_i`` objects of color ``c_i`` and shape ``s_i``;
* ``relation`` -- every object of term 0 is ``RELATION`` every object of term 1, by centres with a margin
  (``a left of b  <=>  a.cx + margin < b.cx``);
* ``only``     -- no other (recognisable) objects in the image.

Strict (GenEval-style) accuracy is 1 iff every clause holds; partial accuracy is the fraction that holds.

Splits: the *held-out* prompts are unseen combinations, chosen by a seeded permutation: for relation prompts the
unordered pair of objects ``{(c0, s0), (c1, s1)}`` is held out (all orders and relations of that pair), for single
prompts the ``(color, shape, count)`` triple. Every color, shape, count and relation still appears in training.

Levels (``LEVELS[k]``): level 1 is the "easier world" measured to be learnable by a 2.4M-parameter pixel-space
transformer on 2 CPU cores in under an hour (4 well separated colors, 3 shapes, counts 1-2, left/right,
11-14 px shapes on a 32x32 white canvas); levels 2-3 add colors, counts, vertical relations, counted relation
terms, smaller shapes and both backgrounds.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

# -- vocabulary (fixed across levels so one tokenizer serves every level) --------------------------------------------
#: RGB of every color name any level may use (0-255)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 235),
    "yellow": (245, 215, 20),
    "purple": (150, 40, 200),
    "orange": (250, 135, 20),
    "cyan": (20, 210, 220),
    "pink": (250, 120, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURAL: dict[str, str] = {s: s + "s" for s in SHAPES}
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
WORD_COUNTS: dict[str, int] = {w: n for n, w in COUNT_WORDS.items()}
#: relation -> (axis, sign): "a REL b" holds iff sign * (b.center[axis] - a.center[axis]) > margin (axis 0 = x)
RELATIONS: dict[str, tuple[int, int]] = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}
#: every word a prompt of any level can contain (the tokenizer's vocabulary, after the special tokens)
VOCAB: tuple[str, ...] = tuple(
    list(COUNT_WORDS.values()) + list(PALETTE) + list(SHAPES) + list(PLURAL.values()) + ["left", "right", "of",
                                                                                        "above", "below"]
)


@dataclass(frozen=True)
class WorldConfig:
    """One level of the shapes world. Every field is a knob of difficulty; sizes are in output pixels."""

    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")  # names in PALETTE
    shapes: tuple[str, ...] = SHAPES  # subset of SHAPES
    counts: tuple[int, ...] = (1, 2)  # counts allowed in single-object prompts
    relation_counts: tuple[int, ...] = (1,)  # counts allowed for each term of a relation prompt
    relations: tuple[str, ...] = ("left of", "right of")  # subset of RELATIONS
    size_range: tuple[int, int] = (11, 14)  # object side / diameter, inclusive, drawn per object
    backgrounds: tuple[str, ...] = ("white",)  # names in BACKGROUNDS, drawn per image
    image_size: int = 32
    supersample: int = 4  # draw at image_size * supersample, then box-filter down (anti-aliased edges)
    gap: int = 2  # min free pixels between object bounding boxes
    margin: int = 1  # min free pixels to the image border
    relation_margin: float = 4.0  # px; "a left of b" needs a.cx + relation_margin < b.cx
    p_relation: float = 0.67  # probability that a sampled training prompt is a relation prompt
    heldout_fraction: float = 0.15  # fraction of object pairs (and single triples) held out
    split_seed: int = 0  # seed of the held-out permutation

    def __post_init__(self) -> None:
        for c in self.colors:
            if c not in PALETTE:
                raise ValueError(f"unknown color {c!r}; known: {', '.join(PALETTE)}")
        for s in self.shapes:
            if s not in SHAPES:
                raise ValueError(f"unknown shape {s!r}; known: {', '.join(SHAPES)}")
        for r in self.relations:
            if r not in RELATIONS:
                raise ValueError(f"unknown relation {r!r}; known: {', '.join(RELATIONS)}")
        for b in self.backgrounds:
            if b not in BACKGROUNDS:
                raise ValueError(f"unknown background {b!r}; known: {', '.join(BACKGROUNDS)}")
        for n in (*self.counts, *self.relation_counts):
            if n not in COUNT_WORDS:
                raise ValueError(f"counts must be in {sorted(COUNT_WORDS)}, got {n}")
        if not 0 <= self.p_relation <= 1 or not 0 <= self.heldout_fraction < 1:
            raise ValueError("p_relation must be in [0, 1] and heldout_fraction in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorldConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def min_area(self) -> float:
        """Smallest connected component (px) the verifier counts as an object: 30% of the smallest triangle."""
        return 0.3 * self.size_range[0] ** 2 / 2


#: documented difficulty levels; level 1 is the default (shipped model)
LEVELS: dict[int, WorldConfig] = {
    1: WorldConfig(),
    2: WorldConfig(colors=("red", "green", "blue", "yellow", "purple", "orange"), counts=(1, 2, 3),
                   relations=("left of", "right of", "above", "below"), size_range=(9, 12)),
    3: WorldConfig(colors=tuple(PALETTE), counts=(1, 2, 3, 4), relation_counts=(1, 2),
                   relations=("left of", "right of", "above", "below"), size_range=(8, 11),
                   backgrounds=("white", "black")),
}


# -- specs and the grammar -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjSpec:
    """``count`` objects of one color and shape."""

    color: str
    shape: str
    count: int = 1

    def phrase(self) -> str:
        noun = self.shape if self.count == 1 else PLURAL[self.shape]
        return f"{COUNT_WORDS[self.count]} {self.color} {noun}"


@dataclass(frozen=True)
class Spec:
    """A parsed prompt: one or two object terms and, with two, the relation of term 0 to term 1."""

    objects: tuple[ObjSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if len(self.objects) not in (1, 2) or (len(self.objects) == 2) != (self.relation is not None):
            raise ValueError("a spec has one object term, or two terms and a relation")

    @property
    def prompt(self) -> str:
        if self.relation is None:
            return self.objects[0].phrase()
        return f"{self.objects[0].phrase()} {self.relation} {self.objects[1].phrase()}"

    @property
    def num_objects(self) -> int:
        return sum(o.count for o in self.objects)

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict) -> "Spec":
        return cls(tuple(ObjSpec(**o) for o in d["objects"]), d.get("relation"))


_OBJ_RE = r"(a|an|one|two|three|four)\s+([a-z]+)\s+([a-z]+?)(?:s)?"
_REL_RE = "|".join(re.escape(r) for r in RELATIONS)
_PROMPT_RE = re.compile(rf"^\s*{_OBJ_RE}(?:\s+({_REL_RE})\s+{_OBJ_RE})?\s*\.?\s*$")


def parse(prompt: str) -> Spec:
    """Parse a prompt of the grammar into a :class:`Spec` (case- and whitespace-insensitive); ValueError if not."""
    m = _PROMPT_RE.match(prompt.lower())
    if m is None:
        raise ValueError(f"not a shapes-world prompt: {prompt!r} (expected e.g. 'a red circle left of a blue square')")
    g = m.groups()

    def obj(count: str, color: str, shape: str) -> ObjSpec:
        if color not in PALETTE or shape not in SHAPES:
            raise ValueError(f"unknown color or shape in {prompt!r}: {color!r} {shape!r}")
        return ObjSpec(color, shape, {"an": 1, "one": 1}.get(count, WORD_COUNTS.get(count, 1)))

    objects = [obj(*g[0:3])]
    if g[3] is not None:
        objects.append(obj(*g[4:7]))
    return Spec(tuple(objects), g[3])


# -- enumeration and splits ------------------------------------------------------------------------------------------
def _object_types(cfg: WorldConfig) -> list[tuple[str, str]]:
    """(color, shape) pairs of the level, in a fixed order."""
    return [(c, s) for c in cfg.colors for s in cfg.shapes]


def all_specs(cfg: WorldConfig) -> list[Spec]:
    """Every prompt of the level: single terms (color x shape x count) and relations between distinct objects."""
    return list(_all_specs(cfg))


@functools.lru_cache(maxsize=16)
def _all_specs(cfg: WorldConfig) -> tuple[Spec, ...]:
    out = [Spec((ObjSpec(c, s, n),)) for (c, s) in _object_types(cfg) for n in cfg.counts]
    for a, b in itertools.permutations(_object_types(cfg), 2):
        for na, nb in itertools.product(cfg.relation_counts, repeat=2):
            for rel in cfg.relations:
                out.append(Spec((ObjSpec(*a, na), ObjSpec(*b, nb)), rel))
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _heldout_keys(cfg: WorldConfig) -> tuple[frozenset, frozenset]:
    """Held-out single triples and unordered object pairs, by a permutation seeded with ``cfg.split_seed``."""
    rng = np.random.default_rng(cfg.split_seed)
    singles = [(c, s, n) for (c, s) in _object_types(cfg) for n in cfg.counts]
    pairs = [frozenset(p) for p in itertools.combinations(_object_types(cfg), 2)]
    k1 = round(cfg.heldout_fraction * len(singles))
    k2 = round(cfg.heldout_fraction * len(pairs))
    held_s = {singles[i] for i in rng.permutation(len(singles))[:k1]}
    held_p = {pairs[i] for i in rng.permutation(len(pairs))[:k2]}
    return frozenset(held_s), frozenset(held_p)


def is_heldout(spec: Spec, cfg: WorldConfig) -> bool:
    """Whether ``spec`` is an unseen combination of the level (its object pair / single triple is held out)."""
    held_s, held_p = _heldout_keys(cfg)
    if spec.relation is None:
        o = spec.objects[0]
        return (o.color, o.shape, o.count) in held_s
    return frozenset((o.color, o.shape) for o in spec.objects) in held_p


def split(cfg: WorldConfig, which: str) -> list[Spec]:
    """``which`` in {"train", "heldout", "all"}: the level's prompts in a fixed order."""
    if which not in ("train", "heldout", "all"):
        raise ValueError(f"which must be 'train', 'heldout' or 'all', got {which!r}")
    return list(_split(cfg, which))


@functools.lru_cache(maxsize=48)
def _split(cfg: WorldConfig, which: str) -> tuple[Spec, ...]:
    specs = _all_specs(cfg)
    if which == "all":
        return specs
    return tuple(s for s in specs if is_heldout(s, cfg) == (which == "heldout"))


@functools.lru_cache(maxsize=48)
def _split_by_kind(cfg: WorldConfig, which: str) -> tuple[tuple[Spec, ...], tuple[Spec, ...]]:
    specs = _split(cfg, which)
    return tuple(s for s in specs if s.relation is None), tuple(s for s in specs if s.relation is not None)


def prompts(cfg: WorldConfig, which: str = "train") -> list[str]:
    """The prompt strings of a split (see :func:`split`)."""
    return [s.prompt for s in split(cfg, which)]


def eval_prompts(cfg: WorldConfig, which: str = "heldout", n: int | None = None, seed: int = 0) -> list[str]:
    """A fixed evaluation list: all prompts of the split (or ``n`` of them, a seeded choice without replacement)."""
    ps = prompts(cfg, which)
    if n is None or n >= len(ps):
        return ps
    idx = np.random.default_rng(seed).choice(len(ps), size=n, replace=False)
    return [ps[i] for i in sorted(idx)]


def sample_specs(cfg: WorldConfig, n: int, rng: np.random.Generator, which: str = "train") -> list[Spec]:
    """``n`` specs of a split: relation prompts with probability ``cfg.p_relation``, then uniform within the kind."""
    if which not in ("train", "heldout", "all"):
        raise ValueError(f"which must be 'train', 'heldout' or 'all', got {which!r}")
    singles, rels = _split_by_kind(cfg, which)
    out = []
    for _ in range(n):
        pool = rels if (rels and (not singles or rng.random() < cfg.p_relation)) else singles
        out.append(pool[int(rng.integers(len(pool)))])
    return out


# -- scenes and rendering --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    """One placed object; ``x0, y0`` its bounding-box corner and ``size`` its side, in output pixels."""

    color: str
    shape: str
    x0: float
    y0: float
    size: float

    @property
    def cx(self) -> float:
        return self.x0 + self.size / 2

    @property
    def cy(self) -> float:
        return self.y0 + self.size / 2


@dataclass(frozen=True)
class Scene:
    """What the renderer draws: placed objects on a named background."""

    objects: tuple[Obj, ...]
    background: str = "white"


def _overlaps(a: tuple[float, float, float], b: tuple[float, float, float], gap: float) -> bool:
    (xa, ya, sa), (xb, yb, sb) = a, b
    return not (xa + sa + gap <= xb or xb + sb + gap <= xa or ya + sa + gap <= yb or yb + sb + gap <= ya)


def _fit_line(sizes: list[float], lo: tuple[float, float], hi: tuple[float, float], axis: int, g: float,
              rng: np.random.Generator) -> list[tuple[float, float, float]] | None:
    """Boxes of ``sizes`` in a random order along ``axis`` inside ``[lo, hi]``, random slack between them."""
    span = hi[axis] - lo[axis]
    free = span - sum(sizes) - g * (len(sizes) - 1)
    if free < 0 or any(hi[1 - axis] - lo[1 - axis] < s for s in sizes):
        return None
    cuts = np.sort(rng.uniform(0, free, size=len(sizes)))  # slack before each box (cumulative)
    out, pos = [], lo[axis]
    prev = 0.0
    for s, c in zip(sizes, cuts):
        pos += c - prev
        prev = c
        other = float(rng.uniform(lo[1 - axis], hi[1 - axis] - s))
        out.append((pos, other, s) if axis == 0 else (other, pos, s))
        pos += s + g
    return out


def _fit_rect(sizes: list[float], lo: tuple[float, float], hi: tuple[float, float], g: float,
              rng: np.random.Generator, tries: int = 100) -> list[tuple[float, float, float]]:
    """Non-overlapping boxes (``gap`` apart) inside the rectangle ``[lo, hi]``: uniform rejection sampling, then
    a line along a random axis, then a 2-column grid."""
    for _ in range(tries):
        boxes: list[tuple[float, float, float]] = []
        for s in sizes:
            if hi[0] - lo[0] < s or hi[1] - lo[1] < s:
                break
            box = (float(rng.uniform(lo[0], hi[0] - s)), float(rng.uniform(lo[1], hi[1] - s)), s)
            if any(_overlaps(box, b, g) for b in boxes):
                break
            boxes.append(box)
        if len(boxes) == len(sizes):
            return boxes
    for axis in rng.permutation(2):
        line = _fit_line(sizes, lo, hi, int(axis), g, rng)
        if line is not None:
            return line
    # 2-column grid: rows along y, each row a line along x
    rows = [sizes[i : i + 2] for i in range(0, len(sizes), 2)]
    h = (hi[1] - lo[1] - g * (len(rows) - 1)) / len(rows)
    out = []
    for r, row in enumerate(rows):
        y0 = lo[1] + r * (h + g)
        line = _fit_line(row, (lo[0], y0), (hi[0], y0 + h), 0, g, rng)
        if line is None:
            raise ValueError(f"cannot fit objects of sizes {sizes} in the canvas")
        out += line
    return out


def place(spec: Spec, cfg: WorldConfig, rng: np.random.Generator) -> Scene:
    """Random non-overlapping placement satisfying the spec's relation with a clear separation.

    Sizes ``~ U{size_range}`` per object. A relation ``a REL b`` draws a cut along the relation axis and puts all
    ``a`` boxes on the ``REL`` side of it and all ``b`` boxes on the other, ``gap`` px apart (so centres differ by
    at least ``(s_a + s_b)/2 + gap >= relation_margin``); within a side (or the whole canvas for single prompts)
    boxes are uniform and non-overlapping (see ``_fit_rect``).
    """
    W, m, g = cfg.image_size, cfg.margin, cfg.gap
    lo_s, hi_s = cfg.size_range
    bg = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    sizes = [[float(rng.integers(lo_s, hi_s + 1)) for _ in range(o.count)] for o in spec.objects]
    lo, hi = (float(m), float(m)), (float(W - m), float(W - m))
    if spec.relation is None:
        boxes = [_fit_rect(sizes[0], lo, hi, g, rng)]
    else:
        axis, sign = RELATIONS[spec.relation]
        first = 0 if sign > 0 else 1  # the term drawn at the low end of the axis
        order = (first, 1 - first)

        def need(ss: list[float]) -> float:  # extent along the axis: one line across the other axis if it fits
            across = sum(ss) + g * (len(ss) - 1)
            return max(ss) if across <= W - 2 * m else sum(ss) + g * (len(ss) - 1)

        n0, n1 = need(sizes[order[0]]), need(sizes[order[1]])
        free = W - 2 * m - n0 - g - n1
        if free < 0:
            raise ValueError(f"objects too large for a {W}px canvas: {spec.prompt!r}")
        cut = m + n0 + float(rng.uniform(0, free))
        boxes = [None, None]
        for k, t in enumerate(order):
            a_lo, a_hi = (float(m), cut) if k == 0 else (cut + g, float(W - m))
            rlo = (a_lo, lo[1]) if axis == 0 else (lo[0], a_lo)
            rhi = (a_hi, hi[1]) if axis == 0 else (hi[0], a_hi)
            boxes[t] = _fit_rect(sizes[t], rlo, rhi, g, rng)
    objs = tuple(Obj(o.color, o.shape, x, y, s) for o, bs in zip(spec.objects, boxes) for (x, y, s) in bs)
    return Scene(objs, bg)


def _draw(draw: ImageDraw.ImageDraw, o: Obj, k: int) -> None:
    x0, y0, s = o.x0 * k, o.y0 * k, o.size * k
    x1, y1 = x0 + s, y0 + s
    rgb = PALETTE[o.color]
    if o.shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=rgb)
    elif o.shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=rgb)
    elif o.shape == "triangle":  # upright isosceles, base at the bottom
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    else:  # pragma: no cover - guarded by WorldConfig
        raise ValueError(o.shape)


def render_scene(scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """Scene -> ``uint8 [H, W, 3]``: drawn at ``supersample`` x resolution and box-filtered down (anti-aliasing)."""
    k = cfg.supersample
    big = cfg.image_size * k
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(d, o, k)
    if k > 1:
        img = img.resize((cfg.image_size, cfg.image_size), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


def render(spec: Spec | str, cfg: WorldConfig, rng: np.random.Generator) -> tuple[np.ndarray, Scene]:
    """A ground-truth image of ``spec`` (or a prompt) with randomised placement: ``(uint8 [H, W, 3], scene)``."""
    if isinstance(spec, str):
        spec = parse(spec)
    scene = place(spec, cfg, rng)
    return render_scene(scene, cfg), scene


def to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [0, 1]."""
    arr = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0)


@dataclass
class Batch:
    """Ground-truth pairs: images, their prompts, parsed specs and the scenes drawn."""

    images: torch.Tensor  # float [B, 3, H, W] in [0, 1]
    prompts: list[str]
    specs: list[Spec]
    scenes: list[Scene] = field(default_factory=list)


def make_batch(cfg: WorldConfig, n: int, rng: np.random.Generator, which: str = "train") -> Batch:
    """``n`` ground-truth (image, prompt) pairs of a split, every draw from ``rng``."""
    specs = sample_specs(cfg, n, rng, which)
    imgs, scenes = [], []
    for s in specs:
        img, scene = render(s, cfg, rng)
        imgs.append(img)
        scenes.append(scene)
    return Batch(to_tensor(imgs), [s.prompt for s in specs], specs, scenes)


def batches(cfg: WorldConfig, batch_size: int, seed: int, which: str = "train") -> Iterator[Batch]:
    """An endless, seed-deterministic stream of ground-truth batches (the pretraining data)."""
    rng = np.random.default_rng(seed)
    while True:
        yield make_batch(cfg, batch_size, rng, which)


def save_dataset(path: str, cfg: WorldConfig, n: int, seed: int, which: str = "train") -> None:
    """Write ``n`` pairs to ``path`` (``.npz``: ``images`` uint8 [n, H, W, 3], ``prompts``) for inspection or reuse."""
    rng = np.random.default_rng(seed)
    specs = sample_specs(cfg, n, rng, which)
    imgs = [render(s, cfg, rng)[0] for s in specs]
    np.savez_compressed(path, images=np.stack(imgs), prompts=np.array([s.prompt for s in specs]))
