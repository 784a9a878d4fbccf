"""Limits and orientation applied to every image file read (``transforms.open_image``).

* Pixel limit: a small PNG can declare a huge canvas (9400 × 9400 pixels in 86 KB); decoding and
  segmenting it takes many GB and minutes. Files above :func:`pixel_limit` pixels are refused
  before they are decoded, with the way to raise the limit.
* EXIF orientation: a camera JPEG stores its pixels sideways and an Orientation tag; viewers
  show it turned, so a mask computed on the raw pixels would be transposed against what the user
  sees (and against labels drawn on the shown image). The tag is applied; files without one (all
  PNGs written by the toy world) are untouched.
"""
from __future__ import annotations

import os

from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 40_000_000  # ~6300 x 6300: far above every benchmark image, far below a bomb
ENV = "RECLIP_MAX_IMAGE_PIXELS"
ORIENTATION = 0x0112


def pixel_limit() -> int:
    """The largest image (in pixels) read: ``$RECLIP_MAX_IMAGE_PIXELS`` or 40 million."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{ENV}={raw!r} is not a number of pixels; set e.g. {ENV}=100000000.") from None
    if value < 1:
        raise ValueError(f"{ENV}={raw!r} must be a positive number of pixels.")
    return value


def allow_in_pil() -> None:
    """Let PIL open what our limit allows: its own bomb check (at twice ``MAX_IMAGE_PIXELS``) fires
    in ``Image.open`` with a message that names no file and no way out. Only ever raised."""
    limit = pixel_limit()
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit


def check_pixels(im: Image.Image, path: object) -> None:
    """Refuse an opened (not yet decoded) image larger than :func:`pixel_limit`."""
    limit = pixel_limit()
    w, h = im.size
    if w * h > limit:
        raise ValueError(f"image {path} is {w} x {h} = {w * h:,} pixels, more than the limit of {limit:,} "
                         f"(decoding and segmenting it would take about {w * h * 160 / 2**30:.0f} GB). Downscale it, "
                         f"or raise the limit with --max-pixels N (segment) or {ENV}=N.")


def exif_upright(im: Image.Image) -> Image.Image:
    """The image turned as its EXIF Orientation tag says (unchanged, no copy, without a tag)."""
    try:
        orientation = im.getexif().get(ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: keep the pixels as stored
        return im
    return ImageOps.exif_transpose(im) if orientation not in (None, 1) else im


__all__ = ("pixel_limit", "allow_in_pil", "check_pixels", "exif_upright", "DEFAULT_MAX_PIXELS", "ENV")
