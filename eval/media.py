"""Files of an eval folder: PNG / JPEG thumbnails / H.264 mp4 (PyAV) and crash-safe JSONL.

Every file is written to a temporary name and renamed, so a crash never leaves a torn image; JSONL appends are
flushed and fsynced per batch, and a torn last line (a crash mid-write) is dropped when read.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

THUMB_SIZE = 256


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)



def save_png(path: Path, img_u8: Tensor) -> None:
    """``C,H,W`` uint8 -> PNG (lossless)."""
    from PIL import Image

    arr = img_u8.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    atomic_write(path, buf.getvalue())


def save_thumb(path: Path, img_u8: Tensor, size: int = THUMB_SIZE) -> None:
    from PIL import Image

    arr = img_u8.permute(1, 2, 0).numpy()
    im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert("RGB")
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    atomic_write(path, buf.getvalue())


def save_video(path: Path, frames_u8: Tensor, fps: int = 8) -> None:
    """``T,C,H,W`` uint8 -> H.264 mp4 (yuv420p, faststart), written atomically; odd sizes are padded by edge pixels
    because 4:2:0 chroma needs even dimensions. One encoder for the project: ``flowalign.pairs.save_media``."""
    from flowalign.pairs import save_media

    if frames_u8.ndim != 4:
        raise ValueError(f"save_video needs T,C,H,W frames, got shape {tuple(frames_u8.shape)}")
    save_media(path, frames_u8, fps)


def load_png(path: Path) -> Tensor:
    """PNG -> ``C,H,W`` uint8."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (a crash mid-write) is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


class Appender:
    """Append-only JSONL, flushed and fsynced per batch so a crash loses at most the batch being written."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = read_jsonl(path)
        write_jsonl(path, self.rows)  # drop a torn tail so appends start on a fresh line
        self.path = path

    def extend(self, rows: Sequence[dict]) -> None:
        if not rows:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        self.rows.extend(rows)




def video_info(path: Path) -> dict:
    """``{"frames", "duration_s", "codec", "width", "height"}`` of a video file (decoded with PyAV)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = sum(1 for _ in c.decode(s))
        duration = float(s.duration * s.time_base) if s.duration else (c.duration or 0) / av.time_base
        return {"frames": frames, "duration_s": duration, "codec": s.codec_context.name,
                "width": s.codec_context.width, "height": s.codec_context.height}
