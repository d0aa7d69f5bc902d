"""Request image decoding for the reward server, bounded *before* anything is decoded.

Two phases, so a hostile request cannot make the server allocate more than it allows:

1. ``plan_images`` base64-decodes every item and reads only its header -- the PNG ``IHDR`` chunk (width, height,
   bit depth, colour type; PNG spec section 11.2.2) or the NPY header (``numpy.lib.format.read_magic`` +
   ``read_array_header_*``: shape, dtype, order). It sums the pixels of the whole request (images x frames x H x W)
   and raises 413 naming ``max_image_pixels`` when the sum is over it. Sizes, channel counts and dtypes are checked
   here too, so a refused request never decodes a single pixel.
2. ``ImagePlan.decode`` writes every image straight into one preallocated float32 array ``B,C,H,W``
   (video ``B,T,C,H,W``): the decoded size is exactly ``pixels x C x 4`` bytes plus one image in flight.

Conversions (explicit, never silent):

* 8-bit (and 1/2/4-bit) PNG: ``v / 255``; palette PNGs become RGB.
* 16-bit greyscale PNG and ``uint16`` NPY: ``v / 65535`` (one correctly rounded float32 division: exact to float32);
  a 16-bit greyscale PNG with a ``tRNS`` colour key is refused (422).
* 16-bit colour PNG (RGB, RGBA, grey+alpha at depth 16): refused with 422, because Pillow reduces them to 8 bits on
  load; send ``npy`` (``uint16`` or float) instead.
* Alpha (RGBA, grey+alpha, palette or ``tRNS`` transparency) is composited on white:
  ``(c * a + 255 * (255 - a)) / 65025`` for 8-bit ``c, a``, one float32 division of an exact integer, so an opaque
  pixel gives exactly ``c / 255``. The result has 3 channels (1 for grey+alpha).
* NPY: ``uint8`` -> ``v / 255``, ``uint16`` -> ``v / 65535``, float16/32/64 -> float32 as sent; anything else is 422.

Every failure is a ``RequestError`` with an HTTP status and a message: 400 unreadable (base64, PNG, NPY), 413 over
the pixel budget, 422 well-formed but unusable (dtype, shape, channels, 16-bit colour).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_DTYPES = {"uint8": 255.0, "uint16": 65535.0, "float16": None, "float32": None, "float64": None}
# IHDR colour type -> (name, output channels); PNG spec table 11.1
PNG_COLOUR = {0: ("grey", 1), 2: ("RGB", 3), 3: ("palette", 3), 4: ("grey+alpha", 1), 6: ("RGBA", 3)}


class RequestError(Exception):
    """A client error: HTTP ``status`` with a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def b64(data: Any, what: str) -> bytes:
    """Strict base64 -> bytes (400 on bad characters or padding)."""
    if not isinstance(data, str):
        raise RequestError(422, f"{what} must be a base64 string, got {type(data).__name__}")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{what} is not valid base64: {e}") from None


@dataclass
class PngItem:
    """One PNG, header read: ``raw`` bytes, ``h, w``, output ``channels``, IHDR ``depth`` and ``ctype``."""

    raw: bytes
    what: str
    h: int
    w: int
    channels: int
    depth: int
    ctype: int


def png_header(raw: bytes, what: str) -> PngItem:
    """Read the IHDR chunk only (the first chunk of every PNG: ``>IIBBBBB`` width, height, depth, colour type,
    compression, filter, interlace). Nothing is decompressed."""
    if raw[:8] != PNG_SIGNATURE:
        raise RequestError(400, f"{what} is not a PNG image (bad signature)")
    if len(raw) < 33 or raw[12:16] != b"IHDR":
        raise RequestError(400, f"{what} is not a readable PNG: missing or truncated IHDR header")
    w, h, depth, ctype = struct.unpack(">IIBB", raw[16:26])
    if ctype not in PNG_COLOUR or w == 0 or h == 0:
        raise RequestError(400, f"{what} is not a readable PNG: IHDR says {w}x{h}, colour type {ctype}")
    name, channels = PNG_COLOUR[ctype]
    if depth == 16 and ctype != 0:
        raise RequestError(422, f"{what} is a 16-bit {name} PNG; only 16-bit greyscale PNGs are decoded exactly "
                                "(Pillow reduces 16-bit colour to 8 bits): send 8-bit PNGs or format 'npy' "
                                "(uint16 or float)")
    return PngItem(raw, what, h, w, channels, depth, ctype)


def decode_png_into(item: PngItem, out: np.ndarray) -> None:
    """Decode ``item`` into ``out`` (float32 ``C,H,W``), with the conversions of the module docstring."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(item.raw), formats=["PNG"])
        img.load()
    except Exception as e:  # truncated data, bad CRC, bad zlib stream...: the client's bytes, never a 500
        raise RequestError(400, f"{item.what} is not a readable PNG: {type(e).__name__}: {e}") from None
    if img.size != (item.w, item.h):
        raise RequestError(400, f"{item.what} decoded to {img.size}, its header said {item.w}x{item.h}")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale
        if "transparency" in img.info:
            raise RequestError(422, f"{item.what} is a 16-bit greyscale PNG with a tRNS colour key, which is not "
                                    "composited; send it without transparency or as format 'npy'")
        out[0] = np.asarray(img, dtype=np.float32)
        out /= 65535.0
        return
    alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    grey = item.channels == 1
    if alpha:
        a = np.asarray(img.convert("LA" if grey else "RGBA"))
        c, al = a[..., :-1].astype(np.float32), a[..., -1:].astype(np.float32)
        v = (c * al + 255.0 * (255.0 - al)) / 65025.0  # integers < 2^24: exact, then one rounded division
    else:
        v = np.asarray(img.convert("L" if grey else "RGB"), dtype=np.float32)
        v = (v[..., None] if grey else v) / np.float32(255.0)
    out[...] = v.transpose(2, 0, 1)


@dataclass
class NpyItem:
    """One ``.npy`` array, header read: ``shape``, ``dtype``, ``fortran`` order and the data ``offset``."""

    raw: bytes
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int


def npy_header(raw: bytes, what: str) -> NpyItem:
    """Read the NPY magic and header only (``numpy.lib.format``); check dtype and the data length."""
    from numpy.lib import format as npf

    fp = io.BytesIO(raw)
    try:
        version = npf.read_magic(fp)
        read = {(1, 0): npf.read_array_header_1_0, (2, 0): npf.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read(fp, max_header_size=10000)
    except Exception as e:
        raise RequestError(400, f"{what} is not a .npy file: {type(e).__name__}: {e}") from None
    if dtype.hasobject:
        raise RequestError(400, f"{what} is not a plain .npy array: object arrays (pickles) are never loaded")
    if dtype.name not in NPY_DTYPES:
        raise RequestError(422, f"images must be float16/32/64 in [0, 1], uint8 or uint16, got dtype {dtype}")
    return NpyItem(raw, tuple(shape), dtype, fortran, fp.tell())


def _check_layout(shape: tuple[int, ...]) -> None:
    if len(shape) not in (4, 5):
        raise RequestError(422, f"images must be B,C,H,W or B,T,C,H,W, got shape {shape}")
    if 0 in shape:
        raise RequestError(422, f"images must not be empty, got shape {shape}")
    if shape[-3] not in (1, 3):
        raise RequestError(422, f"images need 1 or 3 channels in dim -3 (B,C,H,W), got shape {shape}; "
                                "a B,H,W,C array must be transposed to B,C,H,W")


def _over_budget(pixels: int, max_pixels: int, detail: str) -> RequestError:
    return RequestError(413, f"request holds {pixels} pixels ({detail}), more than the limit of {max_pixels} "
                             "pixels per request (max_image_pixels)")


@dataclass
class ImagePlan:
    """A request's images with every header read and the budget checked; ``decode()`` makes the tensor."""

    shape: tuple[int, ...]
    pixels: int
    npy: NpyItem | None = None
    pngs: list[PngItem] | None = None

    def decode(self) -> np.ndarray:
        """float32 ``shape`` in [0, 1], validated (finite, in range)."""
        if self.npy is not None:
            it = self.npy
            src = np.frombuffer(it.raw, it.dtype, math.prod(it.shape), it.offset)
            src = src.reshape(it.shape, order="F" if it.fortran else "C")
            arr = np.array(src, dtype=np.float32, order="C")  # the one allocation; also makes it writable
            scale = NPY_DTYPES[it.dtype.name]
            if scale:
                arr /= np.float32(scale)
        else:
            arr = np.empty(self.shape, np.float32)
            flat = arr.reshape(-1, *self.shape[-3:])
            for i, item in enumerate(self.pngs or []):
                decode_png_into(item, flat[i])
        if not np.isfinite(arr).all():
            raise RequestError(422, "images contain NaN or inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:
            raise RequestError(422, f"images must be in [0, 1], got range [{lo:.3g}, {hi:.3g}]")
        return arr


def plan_images(obj: Any, max_pixels: int) -> ImagePlan:
    """Phase 1: headers of ``{"format": "npy"|"png", "data": ...}``; 413 when the request's pixels (summed over
    images and frames) are over ``max_pixels``. Decodes nothing."""
    if not isinstance(obj, dict):
        raise RequestError(422, 'images must be an object {"format": "npy"|"png", "data": ...}')
    fmt, data = obj.get("format"), obj.get("data")
    if fmt == "npy":
        item = npy_header(b64(data, "images.data"), "images.data")
        _check_layout(item.shape)
        pixels = math.prod(item.shape) // item.shape[-3]
        if pixels > max_pixels:
            raise _over_budget(pixels, max_pixels, f"an array of shape {item.shape}")
        need = math.prod(item.shape) * item.dtype.itemsize
        if len(item.raw) - item.offset != need:
            raise RequestError(400, f"images.data is truncated or padded: shape {item.shape} of {item.dtype} needs "
                                    f"{need} data bytes, got {len(item.raw) - item.offset}")
        return ImagePlan(item.shape, pixels, npy=item)
    if fmt != "png":
        raise RequestError(422, f"images.format must be 'npy' or 'png', got {fmt!r}")
    if not isinstance(data, list) or not data:
        raise RequestError(422, "images.data must be a non-empty list of base64 PNGs (video: list of lists)")
    video = all(isinstance(d, list) for d in data)
    if video and not all(data):
        raise RequestError(422, "every video in images.data needs at least one frame")
    if video and len({len(v) for v in data}) != 1:
        raise RequestError(422, f"all videos must have one frame count, got {sorted({len(v) for v in data})}")
    named = ([(f, f"images.data[{i}][{j}]") for i, v in enumerate(data) for j, f in enumerate(v)] if video
             else [(d, f"images.data[{i}]") for i, d in enumerate(data)])
    items, pixels = [], 0
    for d, what in named:
        item = png_header(b64(d, what), what)
        items.append(item)
        pixels += item.h * item.w
        if pixels > max_pixels:  # stop reading headers as soon as the sum is over
            raise _over_budget(pixels, max_pixels, f"{len(items)} of its {len(named)} PNGs, up to {what} "
                                                   f"of {item.w}x{item.h}")
    sizes = {(it.channels, it.h, it.w) for it in items}
    if len(sizes) != 1:
        raise RequestError(422, f"all {'frames' if video else 'images'} must have one size and channel count "
                                f"(C, H, W), got {sorted(sizes)}")
    c, h, w = sizes.pop()
    shape = (len(data), len(data[0]), c, h, w) if video else (len(data), c, h, w)
    return ImagePlan(shape, pixels, pngs=items)


def decode_images(obj: Any, max_pixels: int) -> np.ndarray:
    """Both phases: ``images`` field -> float32 ``B,C,H,W`` / ``B,T,C,H,W`` in [0, 1] (validated)."""
    return plan_images(obj, max_pixels).decode()
