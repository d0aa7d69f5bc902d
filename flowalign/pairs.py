"""Preference-pair files: the offline DPO dataset, the labelling queue and the label log.

Three JSONL formats (UTF-8, one JSON object per line; media paths are relative to the file's folder or absolute):

* **Pairs dataset** (offline Diffusion-/Flow-DPO): ``{"id": str, "prompt": str, "chosen": path, "rejected": path}``
  plus optional metadata keys. Media are images (``.png .jpg .jpeg .webp .bmp``) or videos (``.mp4 .webm .mov``).
* **Labelling queue** ``<dir>/pairs.jsonl``: ``{"id", "prompt", "a": path, "b": path, ...}``, two candidates for a
  person to compare (written by D3PO's human mode or by hand; served by ``flowalign label serve <dir>``).
* **Label log** ``<dir>/labels.jsonl``: append-only events ``{"id", "choice": "a"|"b"|"tie"|"skip", "annotator",
  "time"}`` and ``{"id", "undo": true, ...}``. The last event of an id wins; an undo removes the id's label. Every
  event is one ``write`` of one line on an ``O_APPEND`` file followed by ``fsync``, so a crash can at most tear the
  last line, which ``read_labels`` ignores (any other malformed line is an error naming it).

``load_pairs(path, size=...)`` reads a pairs dataset file, or a labelled queue folder (``a``/``b`` + labels ->
chosen/rejected; ties, skips and unlabelled pairs are left out), and validates *every* row before returning
anything: malformed JSON, missing or mistyped keys, duplicate ids, missing or unreadable media, media of the wrong
size or frame count, chosen == rejected. All problems are reported together in one ``PairsError``.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".webm", ".mov")
CHOICES = ("a", "b", "tie", "skip")
QUEUE_FILE = "pairs.jsonl"
LABELS_FILE = "labels.jsonl"


class PairsError(ValueError):
    """A pairs file with bad rows; ``errors`` lists every problem (one string each)."""

    def __init__(self, source: str | os.PathLike, errors: Sequence[str]) -> None:
        self.source, self.errors = str(source), list(errors)
        head = f"{self.source}: {len(self.errors)} problem(s), nothing was loaded:"
        super().__init__("\n  ".join([head, *self.errors]))


@dataclass(frozen=True)
class Pair:
    """One preference pair: ``chosen`` is preferred over ``rejected`` for ``prompt``."""

    id: str
    prompt: str
    chosen: Path
    rejected: Path
    metadata: dict = field(default_factory=dict, compare=False)


# ----------------------------------------------------------------------------------------------- JSONL
def _read_lines(path: Path, tolerate_torn_tail: bool) -> tuple[list[tuple[int, Any]], list[str]]:
    """``[(line_no, obj)]`` and error strings; with ``tolerate_torn_tail`` an unparsable last line that lacks its
    newline (a crash mid-append) is dropped silently."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    torn = not text.endswith("\n") and text != ""
    rows, errors = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and torn and n == len(lines):
                continue
            errors.append(f"line {n}: malformed JSON ({e.msg} at column {e.colno})")
    return rows, errors


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows, each as one ``write`` of one line (``O_APPEND``), then ``fsync``: concurrent writers never
    interleave within a line and a crash tears at most the last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for row in rows:
            os.write(fd, (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class Label:
    id: str
    choice: str
    annotator: str = ""
    time: float = 0.0


def read_labels(path: str | os.PathLike) -> "OrderedDict[str, Label]":
    """Fold a label log into the current label of each id, ordered by when it was (last) set.

    A missing file is an empty log. Raises ``PairsError`` naming every malformed line except a torn last line.
    """
    path = Path(path)
    out: OrderedDict[str, Label] = OrderedDict()
    if not path.is_file():
        return out
    rows, errors = _read_lines(path, tolerate_torn_tail=True)
    for n, ev in rows:
        if not isinstance(ev, dict) or not isinstance(ev.get("id"), str):
            errors.append(f"line {n}: a label event needs a string 'id'")
            continue
        if ev.get("undo"):
            out.pop(ev["id"], None)
        elif ev.get("choice") in CHOICES:
            out.pop(ev["id"], None)
            out[ev["id"]] = Label(ev["id"], ev["choice"], str(ev.get("annotator", "")), float(ev.get("time", 0.0)))
        else:
            errors.append(f"line {n}: choice={ev.get('choice')!r} is not one of {', '.join(CHOICES)}")
    if errors:
        raise PairsError(path, errors)
    return out


class LabelLog:
    """Writer of a label log (thread-safe); ``undo`` reverts the most recent label (of ``annotator`` if given)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        read_labels(self.path)  # fail early on a corrupt log
        self._drop_torn_tail()

    def _drop_torn_tail(self) -> None:
        """Cut a torn last line (crash mid-append) so the next event starts on its own line."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(keep)
            os.replace(tmp, self.path)

    def labels(self) -> "OrderedDict[str, Label]":
        with self._lock:
            return read_labels(self.path)

    def record(self, pair_id: str, choice: str, annotator: str = "") -> Label:
        if choice not in CHOICES:
            raise ValueError(f"choice={choice!r} is not allowed. Allowed: {', '.join(CHOICES)}")
        label = Label(pair_id, choice, annotator, time.time())
        with self._lock:
            append_jsonl(self.path, [{"id": pair_id, "choice": choice, "annotator": annotator, "time": label.time}])
        return label

    def undo(self, annotator: str | None = None) -> str | None:
        """Remove the most recent label (of ``annotator``); returns its id, or None when there is nothing to undo."""
        with self._lock:
            for label in reversed(read_labels(self.path).values()):
                if annotator is None or label.annotator == annotator:
                    append_jsonl(self.path, [{"id": label.id, "undo": True, "annotator": annotator or "",
                                              "time": time.time()}])
                    return label.id
        return None


# ----------------------------------------------------------------------------------------------- queue
def wait_for_labels(path: str | os.PathLike, ids: Sequence[str], min_labeled: float = 1.0,
                    timeout_s: float | None = None, poll_s: float = 1.0, progress: bool = False
                    ) -> tuple["OrderedDict[str, Label]", float]:
    """Poll the label log ``path`` until ``ceil(min_labeled * len(ids))`` of ``ids`` carry a label (any choice);
    return ``(labels, seconds waited)``. ``TimeoutError`` after ``timeout_s`` (None: wait forever), naming the
    folder and the command that serves it. ``progress`` shows a tqdm bar while waiting."""
    path = Path(path)
    need = math.ceil(min_labeled * len(ids))
    t0 = time.monotonic()
    bar = None
    try:
        while True:
            labels = read_labels(path)
            done = sum(i in labels for i in ids)
            if done >= need:
                return labels, time.monotonic() - t0
            if bar is None and progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=need, desc=f"waiting for labels in {path.parent}", leave=False)
            if bar is not None:
                bar.n = done
                bar.refresh()
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{done} of {len(ids)} pairs labelled in {path} after {timeout_s} s "
                                   f"(need {need}, train.method_options.min_labeled={min_labeled}); is "
                                   f"`flowalign label serve {path.parent}` running?")
            time.sleep(poll_s)
    finally:
        if bar is not None:
            bar.close()


def read_queue(folder: str | os.PathLike) -> list[dict]:
    """The labelling queue ``<folder>/pairs.jsonl`` (a torn last line, still being written, is ignored).

    Raises ``PairsError`` listing every row without string ``id``/``prompt``/``a``/``b`` or with a duplicate id.
    """
    path = Path(folder) / QUEUE_FILE
    if not path.is_file():
        raise PairsError(path, [f"no {QUEUE_FILE} in {folder} (rows: id, prompt, a, b)"])
    rows, errors = _read_lines(path, tolerate_torn_tail=True)
    out, seen = [], {}
    for n, row in rows:
        bad = _missing_keys(row, ("id", "prompt", "a", "b"))
        if bad:
            errors.append(f"line {n}: {bad}")
            continue
        if row["id"] in seen:
            errors.append(f"line {n}: duplicate id {row['id']!r} (first on line {seen[row['id']]})")
            continue
        seen[row["id"]] = n
        out.append(row)
    if errors:
        raise PairsError(path, errors)
    return out


def append_queue(folder: str | os.PathLike, rows: Sequence[dict]) -> int:
    """Append queue rows whose id is not there yet (a resumed run re-writes the same ids); returns how many."""
    folder = Path(folder)
    have = {r["id"] for r in read_queue(folder)} if (folder / QUEUE_FILE).is_file() else set()
    new = [r for r in rows if r["id"] not in have]
    append_jsonl(folder / QUEUE_FILE, new)
    return len(new)


# ----------------------------------------------------------------------------------------------- media
def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def media_shape(path: str | os.PathLike) -> tuple[int, int, int | None]:
    """``(height, width, frames)`` of an image (``frames`` None; header only) or a video (decoded with PyAV)."""
    path = Path(path)
    if is_video(path):
        import av

        with av.open(str(path)) as c:
            s = c.streams.video[0]
            frames = sum(1 for _ in c.decode(s))
            return s.codec_context.height, s.codec_context.width, frames
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width, None


def load_media(path: str | os.PathLike) -> Tensor:
    """An image as float ``[3, H, W]`` or a video as ``[T, 3, H, W]``, values in [0, 1]."""
    path = Path(path)
    if is_video(path):
        import av

        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
        return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def save_media(path: str | os.PathLike, media_u8: Tensor, fps: int = 8) -> None:
    """Write uint8 media atomically: an image ``[C, H, W]`` as PNG (lossless), a video ``[T, C, H, W]`` as H.264
    mp4 (yuv420p, faststart; odd sizes padded by edge pixels, 4:2:0 chroma needs even ones). The inverse of
    ``load_media`` (to 8 bits; the same encoding as ``flowalign.eval.media``, kept here so writers of a labelling
    queue need no eval)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = media_u8.cpu().numpy()
    if media_u8.ndim == 3:
        import io

        from PIL import Image

        img = arr.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
        return
    import av

    arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    pad_h, pad_w = arr.shape[1] % 2, arr.shape[2] % 2
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    tmp = path.with_name(path.name + ".tmp.mp4")
    with av.open(str(tmp), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = arr.shape[2], arr.shape[1], "yuv420p"
        stream.options = {"crf": "18", "preset": "medium"}
        for frame in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- dataset
def _missing_keys(row: Any, keys: Sequence[str]) -> str:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    missing = [k for k in keys if k not in row]
    if missing:
        return f"missing key(s) {', '.join(repr(k) for k in missing)} (a row needs {', '.join(keys)})"
    wrong = [k for k in keys if not isinstance(row[k], str) or not row[k]]
    if wrong:
        return f"key(s) {', '.join(repr(k) for k in wrong)} must be non-empty strings"
    return ""


def _resolve(base: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else base / p


def _check_media(path: Path, what: str, size: tuple[int, int] | None, frames: int | None) -> str:
    if not path.is_file():
        return f"{what} file {str(path)!r} not found"
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTS + VIDEO_EXTS:
        return f"{what} file {str(path)!r} has extension {ext!r}; use one of {', '.join(IMAGE_EXTS + VIDEO_EXTS)}"
    try:
        h, w, t = media_shape(path)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad row
        return f"{what} file {str(path)!r} cannot be read ({type(e).__name__}: {e})"
    if size is not None and (h, w) != tuple(size):
        return f"{what} {str(path)!r} is {h}x{w} (HxW), expected {size[0]}x{size[1]}"
    if frames is not None and t is not None and t != frames:
        return f"{what} video {str(path)!r} has {t} frames, expected {frames}"
    if frames is not None and t is None:
        return f"{what} {str(path)!r} is an image but the model makes {frames}-frame videos"
    if frames is None and t is not None and size is not None:
        return f"{what} {str(path)!r} is a video but the model makes images"
    return ""


def load_pairs(path: str | os.PathLike, size: tuple[int, int] | None = None, frames: int | None = None
               ) -> list[Pair]:
    """Read and validate a pairs dataset (``.jsonl``) or a labelled queue folder (see module docstring).

    ``size`` = ``(height, width)`` every medium must have (the model's output size); ``frames`` the frame count of
    videos (None: images). Raises ``PairsError`` with every problem at once; returns only when all rows are good.
    """
    path = Path(path)
    if path.is_dir():
        return _load_labelled_queue(path, size, frames)
    if not path.is_file():
        raise PairsError(path, [f"pairs file {str(path)!r} not found (a .jsonl file or a labelled queue folder)"])
    rows, errors = _read_lines(path, tolerate_torn_tail=False)
    base = path.parent
    pairs, seen = [], {}
    for n, row in rows:
        bad = _missing_keys(row, ("prompt", "chosen", "rejected"))
        pid = row.get("id", f"line{n}") if isinstance(row, dict) else f"line{n}"
        where = f"line {n} (id {pid!r})"
        if bad:
            errors.append(f"{where}: {bad}")
            continue
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            errors.append(f"{where}: 'id' must be a string or an integer")
            continue
        pid = str(pid)
        if pid in seen:
            errors.append(f"{where}: duplicate id {pid!r} (first on line {seen[pid]})")
        seen.setdefault(pid, n)
        chosen, rejected = _resolve(base, row["chosen"]), _resolve(base, row["rejected"])
        if chosen.resolve() == rejected.resolve():
            errors.append(f"{where}: chosen and rejected are the same file {row['chosen']!r}")
        for what, p in (("chosen", chosen), ("rejected", rejected)):
            msg = _check_media(p, what, size, frames)
            if msg:
                errors.append(f"{where}: {msg}")
        meta = {k: v for k, v in row.items() if k not in ("id", "prompt", "chosen", "rejected")}
        pairs.append(Pair(pid, row["prompt"], chosen, rejected, meta))
    if not rows and not errors:
        errors.append("no pairs in the file")
    if errors:
        raise PairsError(path, errors)
    return pairs


def _load_labelled_queue(folder: Path, size, frames) -> list[Pair]:
    queue = read_queue(folder)
    labels = read_labels(folder / LABELS_FILE)
    errors, pairs = [], []
    for row in queue:
        lab = labels.get(row["id"])
        if lab is None or lab.choice not in ("a", "b"):
            continue
        a, b = _resolve(folder, row["a"]), _resolve(folder, row["b"])
        for what, p in (("a", a), ("b", b)):
            msg = _check_media(p, what, size, frames)
            if msg:
                errors.append(f"pair {row['id']!r}: {msg}")
        chosen, rejected = (a, b) if lab.choice == "a" else (b, a)
        meta = {k: v for k, v in row.items() if k not in ("id", "prompt", "a", "b")}
        pairs.append(Pair(row["id"], row["prompt"], chosen, rejected, {**meta, "annotator": lab.annotator}))
    if not pairs and not errors:
        errors.append(f"no pair in {folder / QUEUE_FILE} has an a/b label in {LABELS_FILE} yet")
    if errors:
        raise PairsError(folder, errors)
    return pairs


def export_pairs(folder: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write the labelled pairs of a queue folder as a pairs dataset (absolute paths); returns the row count."""
    pairs = _load_labelled_queue(Path(folder), None, None)
    rows = [{"id": p.id, "prompt": p.prompt, "chosen": str(p.chosen.resolve()),
             "rejected": str(p.rejected.resolve()), **p.metadata} for p in pairs]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    return len(rows)
