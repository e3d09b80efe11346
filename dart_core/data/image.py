"""Decode one image, normalise it to RGB, resize, re-encode as JPEG. Runs in worker processes."""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dart_core.data import records as R

# Pillow's own limit (~89.5 Mpx) is the default: beyond it an image is treated as a
# decompression bomb and rejected from its header, before any pixel is decoded.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageFailure(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Encoded:
    jpg: bytes
    width: int          # original size (after EXIF rotation)
    height: int
    out_width: int
    out_height: int
    mode: str           # original PIL mode, kept for provenance


def _to_rgb(im: Image.Image) -> Image.Image:
    """Every mode to 8-bit RGB: 16-bit scaled (not clipped), alpha composited on white."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im.convert("I") if mode != "I" else im, dtype=np.int64)
        # 16-bit data: keep the top byte. 32-bit "I" images are assumed 16-bit-ranged PNGs.
        a = np.clip(a >> 8 if a.max(initial=0) > 255 else a, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = np.nan_to_num((a - lo) / (hi - lo) * 255 if hi > lo else a * 0)
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def draft_size(w: int, h: int, size: int) -> tuple[int, int]:
    """The smallest (w, h) JPEG DCT scaling may decode to while the shorter side stays >= size."""
    s = size / min(w, h)
    return max(1, math.ceil(w * s)), max(1, math.ceil(h * s))


def resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """Shorter side to `size`, keeping the aspect ratio; never upscale (it only adds bytes)."""
    short = min(w, h)
    if short <= size:
        return w, h
    s = size / short
    return max(1, round(w * s)), max(1, round(h * s))


def normalise(data: bytes, *, size: int = 256, quality: int = 90,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> Encoded:
    if not data:
        raise ImageFailure(R.EMPTY_FILE, "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we check the size ourselves
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageFailure(R.NOT_AN_IMAGE, "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageFailure(R.DECOMPRESSION_BOMB, str(e)) from None
    except Exception as e:  # noqa: BLE001 - any header parse failure is this input's problem
        raise ImageFailure(R.DECODE_ERROR, f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageFailure(R.DECODE_ERROR, f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise ImageFailure(R.DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    mode = im.mode
    hdr = im.size
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not worth failing the image
        orientation = 1
    if orientation in (5, 6, 7, 8):  # transposed / rotated by 90 or 270 degrees
        w, h = h, w
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if im.format == "JPEG" and mode in ("RGB", "L", "CMYK", "YCbCr"):
                # DCT-domain downscaling: decode at >= the target size, much cheaper than full size.
                im.draft("RGB" if mode != "L" else "L", draft_size(hdr[0], hdr[1], size))
            im = ImageOps.exif_transpose(im)  # loads the pixels; also drops the orientation tag
            im = _to_rgb(im)
            tw, th = resized_size(im.size[0], im.size[1], size)
            if (tw, th) != im.size:
                im = im.resize((tw, th), Image.Resampling.BICUBIC, reducing_gap=3.0)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
    except ImageFailure:
        raise
    except Exception as e:  # noqa: BLE001 - truncated / corrupt pixel data
        raise ImageFailure(R.DECODE_ERROR, f"{type(e).__name__}: {e}") from None
    return Encoded(buf.getvalue(), w, h, tw, th, mode)
