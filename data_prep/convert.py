"""Label conversions to the on-disk format the readers use.

All converted labels are single-channel 8-bit PNGs (mode ``L``) with 255 = ignore.
What the values mean on disk, per dataset (the readers in
``reclip_core.datasets.benchmarks`` turn them into class indices):

=============  =======================================  =====================
dataset        on-disk value                            reader
=============  =======================================  =====================
voc            0 background, 1..20 classes, 255 border  reduce-zero-label
context        0 background, 1..59 classes              reduce-zero-label
ade            0 "other", 1..150 classes (official)     reduce-zero-label
cityscapes     trainIds 0..18, 255 ignore               as is
coco_stuff27   coarse ids 0..26, 255 unlabeled          as is
=============  =======================================  =====================

reduce-zero-label: 0 -> 255 (ignore), v -> v - 1 for 1..254, 255 stays 255.

The mapping tables are data files next to this module (``coco_stuff27.csv``,
``cityscapes_labels.csv``, ``context59.csv``), not code.
"""
from __future__ import annotations

import csv
import io
from functools import lru_cache
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "CONVERTER_VERSION",
    "IGNORE",
    "read_table",
    "coco_stuff27_lut",
    "cityscapes_lut",
    "context59_lut",
    "apply_lut",
    "voc_palette",
    "voc_label",
    "ade_label",
    "cityscapes_label",
    "coco_stuff27_label",
    "rle_decode",
    "context_raw_mask",
    "context_label",
    "png_bytes",
]

CONVERTER_VERSION = "1"
IGNORE = 255
_HERE = Path(__file__).parent


def read_table(name: str) -> List[dict]:
    """Rows of a CSV data table next to this module (lines starting with '#' skipped)."""
    text = (_HERE / name).read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return list(csv.DictReader(lines))


def _lut(pairs: Iterable[tuple], default: int = IGNORE) -> np.ndarray:
    lut = np.full(256, default, dtype=np.uint8)
    for src, dst in pairs:
        if 0 <= int(src) <= 255:
            lut[int(src)] = int(dst)
    return lut


@lru_cache(maxsize=None)
def coco_stuff27_lut() -> np.ndarray:
    """stuffthingmaps value (0..181 fine ids, 255 unlabeled) -> coarse id 0..26 / 255."""
    rows = read_table("coco_stuff27.csv")
    if [int(r["fine_id"]) for r in rows] != list(range(182)):
        raise ValueError("coco_stuff27.csv must list fine ids 0..181 once each, in order.")
    return _lut((r["fine_id"], r["coarse_id"]) for r in rows)


@lru_cache(maxsize=None)
def cityscapes_lut() -> np.ndarray:
    """Cityscapes labelId -> trainId (255 for void / unlisted ids)."""
    return _lut((r["label_id"], r["train_id"]) for r in read_table("cityscapes_labels.csv"))


@lru_cache(maxsize=None)
def context59_lut() -> dict:
    """PASCAL in Detail category_id -> on-disk value 0..59 (0 = background)."""
    return {int(r["category_id"]): int(r["label_value"]) for r in read_table("context59.csv")}


def apply_lut(arr: np.ndarray, lut: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"label values out of 0..255 (min {arr.min()}, max {arr.max()})")
        arr = arr.astype(np.uint8)
    return lut[arr]


def _label_array(path_or_img) -> np.ndarray:
    img = path_or_img if isinstance(path_or_img, Image.Image) else Image.open(path_or_img)
    if img.mode in ("P", "L"):
        return np.array(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        return np.array(img).astype(np.int64)
    raise ValueError(f"expected a single-channel label image (mode L, P or I), got mode {img.mode}")


@lru_cache(maxsize=None)
def voc_palette() -> np.ndarray:
    """The 256-colour PASCAL VOC palette (index -> RGB), built with the VOC devkit's bit rule."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def voc_label(path_or_img) -> np.ndarray:
    """VOC ``SegmentationClass`` PNG -> uint8 indices (0 background, 1..20, 255 border).

    The official files are palette PNGs whose pixel values are already the
    indices. An RGB rendering is mapped back through the VOC palette; colours
    that are not VOC colours become 255.
    """
    img = path_or_img if isinstance(path_or_img, Image.Image) else Image.open(path_or_img)
    if img.mode == "P" or img.mode == "L":
        arr = np.array(img)
        bad = (arr > 20) & (arr != IGNORE)
        if bad.any():
            raise ValueError(f"VOC label has values outside 0..20/255: {sorted(np.unique(arr[bad]))[:10]}")
        return arr.astype(np.uint8)
    rgb = np.array(img.convert("RGB")).astype(np.int32)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    pal = voc_palette().astype(np.int32)
    out = np.full(code.shape, IGNORE, dtype=np.uint8)
    for idx in range(21):
        p = pal[idx]
        out[code == ((p[0] << 16) | (p[1] << 8) | p[2])] = idx
    return out


def ade_label(path_or_img) -> np.ndarray:
    """ADE20K SceneParse150 annotation: kept as is (0 other, 1..150); values checked."""
    arr = _label_array(path_or_img)
    if arr.size and arr.max() > 150:
        raise ValueError(f"ADE20K annotation has values above 150 (max {arr.max()}); is it a SceneParse150 file?")
    return arr.astype(np.uint8)


def cityscapes_label(path_or_img) -> np.ndarray:
    """Cityscapes ``*_gtFine_labelIds.png`` -> trainIds (0..18, 255)."""
    return apply_lut(_label_array(path_or_img), cityscapes_lut())


def coco_stuff27_label(path_or_img) -> np.ndarray:
    """COCO-Stuff-164k stuffthingmaps PNG (fine ids 0..181, 255) -> coarse ids (0..26, 255)."""
    return apply_lut(_label_array(path_or_img), coco_stuff27_lut())


# --- PASCAL Context (PASCAL in Detail json) ------------------------------------------------

def _rle_counts_from_string(s: str) -> List[int]:
    """Decode the COCO compressed RLE string (6-bit chunks, 5 data bits, delta-coded from the 3rd)."""
    counts: List[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(segmentation: Mapping) -> np.ndarray:
    """COCO-style RLE ``{"size": [h, w], "counts": str | list}`` -> bool mask [h, w].

    Runs alternate 0/1 starting with 0, over the pixels in column-major order.
    Uses pycocotools when it is installed, else this pure-numpy decoder.
    """
    if not isinstance(segmentation, Mapping) or "counts" not in segmentation:
        raise ValueError(
            "only RLE segmentations ({'size', 'counts'}) can be decoded without pycocotools; "
            "this annotation is a polygon list. Install pycocotools (pip install pycocotools) "
            "and rerun the same command.")
    try:
        from pycocotools import mask as mask_utils  # type: ignore
    except ImportError:
        mask_utils = None
    h, w = (int(v) for v in segmentation["size"])
    counts = segmentation["counts"]
    if mask_utils is not None:
        rle = dict(segmentation)
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(rle, h, w)
        elif isinstance(counts, str):
            rle["counts"] = counts.encode("ascii")
        return mask_utils.decode(rle).astype(bool)
    if isinstance(counts, (bytes, bytearray)):
        counts = counts.decode("ascii")
    runs = _rle_counts_from_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if sum(runs) != h * w or any(r < 0 for r in runs):
        raise ValueError(f"RLE counts sum to {sum(runs)}, expected h*w = {h * w}: corrupt annotation")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((w, h)).T


def context_raw_mask(height: int, width: int, annotations: Sequence[Mapping]) -> np.ndarray:
    """Paint each annotation's category_id in order (later ones on top), 0 elsewhere.

    This is what the PASCAL in Detail API's ``getMask(img)`` returns for a whole image.
    """
    mask = np.zeros((height, width), dtype=np.int32)
    for ann in annotations:
        m = rle_decode(ann["segmentation"])
        if m.shape != mask.shape:
            raise ValueError(f"annotation {ann.get('id')} has size {m.shape}, image is {mask.shape}")
        mask[m] = int(ann["category_id"])
    return mask


def context_label(raw: np.ndarray, table: Optional[Mapping[int, int]] = None) -> np.ndarray:
    """Detail category ids -> 0..59 via the 60-entry table; other ids -> 0 (background)."""
    table = dict(table if table is not None else context59_lut())
    lut_keys = np.array(sorted(table), dtype=np.int64)
    lut_vals = np.array([table[k] for k in lut_keys], dtype=np.uint8)
    raw = np.asarray(raw, dtype=np.int64)
    pos = np.clip(np.searchsorted(lut_keys, raw), 0, len(lut_keys) - 1)
    hit = lut_keys[pos] == raw
    return np.where(hit, lut_vals[pos], 0).astype(np.uint8)


def png_bytes(label: np.ndarray) -> bytes:
    """Encode a uint8 label map as a single-channel PNG."""
    arr = np.asarray(label)
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise ValueError(f"label must be a 2-D uint8 array, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return buf.getvalue()
