"""OCR accuracy reward (Flow-GRPO's edit-distance formulation) on the tesseract engine.

target ``t`` = ``metadata["text"]`` if given, else the text between the first pair of double quotes in the prompt
(Flow-GRPO: ``prompt.split('"')[1]``), else the whole prompt. Recognised ``r`` = tesseract words with confidence > 0
(``image_to_data``, ``--psm 11``), concatenated. Both lower-cased with spaces removed; then

    d = 0 if t ⊂ r else Levenshtein(r, t);   reward = 1 − min(d, |t|) / |t|   ∈ [0, 1]

Video (``B,T,C,H,W``, Flow-GRPO ``video_ocr``): every ``frame_stride``-th frame, no substring shortcut, mean of the
per-frame rewards that are > 0 (0 if none). Source: flow_grpo ``ocr.py`` (PaddleOCR there); tesseract replaces
PaddleOCR so the reward runs offline (``apt-get install tesseract-ocr``; reference/rewards.md §2.7, §5).
Absolute values are not comparable with PaddleOCR's. ``backend`` may be any callable ``uint8 HWC -> str``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from flowalign.rewards._image import to_uint8_hwc
from flowalign.rewards.base import REWARDS, Reward


def target_text(prompt: str, metadata: dict | None = None) -> str:
    """``metadata['text']``, else the first double-quoted span of the prompt, else the prompt."""
    if metadata and metadata.get("text") is not None:
        return str(metadata["text"])
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 else prompt


def normalize_text(s: str) -> str:
    """Flow-GRPO normalisation: drop spaces, lower-case."""
    return s.replace(" ", "").lower()


def ocr_edit_reward(recognized: str, target: str, substring_shortcut: bool = True) -> float:
    """``1 − min(lev(r, t), |t|) / |t|`` on normalised strings (0 when the target is empty)."""
    import Levenshtein

    r, t = normalize_text(recognized), normalize_text(target)
    if not t:
        return 0.0
    d = 0 if (substring_shortcut and t in r) else Levenshtein.distance(r, t)
    return 1.0 - min(d, len(t)) / len(t)


class TesseractReader:
    """Read text with the tesseract binary through pytesseract: greyscale, dark-on-light (inverted when the image
    is mostly dark), upscaled so glyphs reach tesseract's preferred 20–40 px; words with confidence > 0 joined."""

    def __init__(self, lang: str = "eng", psm: int = 11, min_side: int = 512) -> None:
        import pytesseract

        try:
            pytesseract.get_tesseract_version()
        except pytesseract.TesseractNotFoundError as e:
            raise RuntimeError("the OCR reward needs the tesseract binary: apt-get install tesseract-ocr "
                               "(`make sysdeps` does it)") from e
        self.lang, self.psm, self.min_side = lang, psm, min_side

    def __call__(self, image: np.ndarray) -> str:
        import pytesseract

        img = Image.fromarray(image).convert("L")
        if np.asarray(img).mean() < 128:
            img = ImageOps.invert(img)
        scale = self.min_side / min(img.size)
        if scale > 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        d = pytesseract.image_to_data(img, lang=self.lang, config=f"--psm {self.psm}",
                                      output_type=pytesseract.Output.DICT)
        return "".join(t for t, c in zip(d["text"], d["conf"]) if t.strip() and float(c) > 0)


@REWARDS.register("ocr")
class OCRReward(Reward):
    """Flow-GRPO OCR reward ``1 − min(lev, |t|)/|t|`` with tesseract (or any ``uint8 HWC -> str`` backend)."""

    name = "ocr"
    differentiable = False
    accepts_video = True

    def __init__(self, backend: str | Callable[[np.ndarray], str] = "tesseract", *, lang: str = "eng",
                 psm: int = 11, frame_stride: int = 4, num_workers: int | None = None,
                 device: str | torch.device = "cpu", batch_size: int | None = 64) -> None:
        super().__init__(device=device, batch_size=batch_size)
        if callable(backend):
            self.reader = backend
        elif backend == "tesseract":
            os.environ.setdefault("OMP_THREAD_LIMIT", "1")  # one thread per tesseract process; we run several
            self.reader = TesseractReader(lang=lang, psm=psm)
        else:
            raise ValueError(f"backend must be 'tesseract' or a callable image -> text, got {backend!r}")
        self.frame_stride = frame_stride
        self.num_workers = num_workers or min(4, os.cpu_count() or 1)

    def _read(self, image: np.ndarray) -> str:
        try:
            return self.reader(image)
        except Exception:  # Flow-GRPO: any OCR failure counts as nothing read
            return ""

    def score(self, inputs: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        targets = [target_text(p, m) for p, m in zip(prompts, metadata)]
        if inputs.ndim == 4:
            arrays = list(to_uint8_hwc(inputs))
            with ThreadPoolExecutor(self.num_workers) as pool:
                texts = list(pool.map(self._read, arrays))
            return torch.tensor([ocr_edit_reward(r, t) for r, t in zip(texts, targets)])
        frames = inputs[:, :: self.frame_stride]
        b, f = frames.shape[:2]
        arrays = list(to_uint8_hwc(frames.reshape(b * f, *frames.shape[2:])))
        with ThreadPoolExecutor(self.num_workers) as pool:
            texts = list(pool.map(self._read, arrays))
        out = []
        for i, t in enumerate(targets):
            kept = [r for r in (ocr_edit_reward(x, t, substring_shortcut=False) for x in texts[i * f:(i + 1) * f])
                    if r > 0]
            out.append(sum(kept) / len(kept) if kept else 0.0)
        return torch.tensor(out)
