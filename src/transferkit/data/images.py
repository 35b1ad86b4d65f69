"""Decode any image file into an upright 8-bit RGB picture, or say why it cannot be."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class BadImage(Exception):
    """A file that cannot be decoded; the message says why."""


@contextmanager
def open_image(source: str | Path | IO[bytes]) -> Iterator[Image.Image]:
    """Image.open with PIL's pixel limit as the file's own error: an image over Image.MAX_IMAGE_PIXELS
    (PIL warns) or twice that (PIL raises) is a BadImage saying so, like any other undecodable file;
    every other PIL warning (odd EXIF and the like) is silenced. Header only: call .load() to decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                yield im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"too many pixels to decode safely: {str(exc).split(',')[0]}") from None


def image_files(folder: Path) -> list[Path]:
    """Every image file under `folder`, at any depth, in sorted order (so runs are repeatable)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def to_rgb(im: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK, 16-bit and alpha images to RGB; transparency is laid on white."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        if im.mode != "F" and arr.max(initial=0) > 255:
            arr = arr / 257.0 if arr.max() <= 65535 else arr * (255.0 / arr.max())
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(source: str | Path | IO[bytes], draft: int | None = None) -> Image.Image:
    """Open, apply the EXIF orientation, and convert to RGB. Raises BadImage.

    With `draft`, a JPEG whose shorter side is at least twice `draft` is decoded at 1/2, 1/4 or 1/8
    scale (the DCT does the reduction, several times faster) keeping the shorter side >= `draft`."""
    try:
        with open_image(source) as im:
            if draft and im.format == "JPEG" and min(im.size) >= 2 * draft:
                w, h = im.size
                short = min(w, h)
                im.draft("RGB", (math.ceil(w * draft / short), math.ceil(h * draft / short)))
            im.load()
            upright = ImageOps.exif_transpose(im)
            return to_rgb(upright if upright is not None else im)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        raise BadImage(str(exc) or type(exc).__name__) from None


def decoded_from(size: tuple[int, int], width: int, height: int) -> bool:
    """Whether an image load_rgb gave at `size` is one of width x height: whole, or drafted at 1/2,
    1/4 or 1/8 (the JPEG draft rounds each side up)."""
    return any(size == (math.ceil(width / k), math.ceil(height / k)) for k in (1, 2, 4, 8))


def shrink_shorter_side(im: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize so the shorter side is `size`, only ever making the image smaller."""
    w, h = im.size
    short = min(w, h)
    if short <= size:
        return im
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return im.resize(new, resample)
