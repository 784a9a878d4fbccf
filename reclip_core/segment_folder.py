"""Segment a whole folder: ``python -m reclip_core segment --images DIR --out OUT [--checkpoint RUN]``.

For every image ``<DIR>/<id>.<ext>`` (the ids, nesting and skipping rules of the ``folder``
dataset, ``datasets/folder.py``) it writes

    <OUT>/masks/<id>.png      palette PNG: pixel value i = class i (np.array(Image.open(p)) gives the map),
                              shown in the class colours
    <OUT>/overlays/<id>.png   the image with the coloured mask over it and a legend of the classes present
    <OUT>/legend.png          every class with its colour
    <OUT>/segment.json        what made them (classes, checkpoint, model, sizes)

The model is built once for the folder. Outputs are written atomically, mask and overlay together,
so an interrupted run leaves whole pairs; running the command again skips the images whose pair
exists (resumable). An ``OUT`` made for other classes or another checkpoint is refused rather
than mixed. Colours: ``palette.class_colours``, the colours of the single-image overlay and of
the notebooks' figures (matplotlib tab20 up to 20 classes; gist_ncar beyond, where tab20 would repeat).
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .atomic_io import atomic_write_bytes, atomic_write_files, atomic_write_json
from .clip_loading import load_clip, resolve_device
from .datasets.folder import LABELS_DIR, scan_images
from .model import MaskCLIP
from .palette import class_colours
from .segment import _load_for_checkpoint, predict_mask
from .text import PROMPT_TEMPLATES, display_name, validate_class_names
from .transforms import open_image

SUFFIX = ".png"


@dataclass
class FolderResult:
    """What one call did: ids written now, ids whose outputs already existed, unreadable files."""

    out: Path
    written: List[str] = field(default_factory=list)
    existing: List[str] = field(default_factory=list)
    unreadable: List[Tuple[str, str]] = field(default_factory=list)
    model: str = "maskclip"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def mask_image(mask: np.ndarray, colours: np.ndarray) -> Image.Image:
    """A palette ("P") PNG whose pixel values are the class ids and whose palette is the class colours."""
    if len(colours) > 256:
        raise ValueError(f"{len(colours)} classes do not fit an 8-bit mask PNG (at most 256).")
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    pal = np.zeros((256, 3), np.uint8)
    pal[:len(colours)] = colours
    im.putpalette(pal.reshape(-1).tolist())
    return im


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def legend_panel(classes: Sequence[int], names: Sequence[str], colours: np.ndarray, height: int,
                 font_size: int = 12) -> Image.Image:
    """A white panel listing ``classes`` (swatch + first name), at least ``height`` pixels tall."""
    font = _font(font_size)
    row = font_size + 6
    labels = [display_name(names[c]) for c in classes]
    width = 16 + font_size + max((int(font.getlength(t)) for t in labels), default=0) + 8
    panel = Image.new("RGB", (width, max(height, row * len(classes) + 8)), "white")
    draw = ImageDraw.Draw(panel)
    for k, (c, text) in enumerate(zip(classes, labels)):
        y = 4 + k * row
        draw.rectangle([6, y, 6 + font_size, y + font_size], fill=tuple(int(v) for v in colours[c]), outline="black")
        draw.text((12 + font_size, y), text, fill="black", font=font)
    return panel


def overlay_image(image: Image.Image, mask: np.ndarray, names: Sequence[str], colours: np.ndarray,
                  alpha: float = 0.5) -> Image.Image:
    """The image at its own size blended with the class colours, a legend of the classes present beside it."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    blend = ((1 - alpha) * rgb + alpha * colours[mask].astype(np.float32)).round().clip(0, 255).astype(np.uint8)
    over = Image.fromarray(blend, "RGB")
    font_size = int(np.clip(over.height // 24, 10, 24))
    panel = legend_panel([int(c) for c in np.unique(mask)], names, colours, over.height, font_size)
    canvas = Image.new("RGB", (over.width + panel.width, max(over.height, panel.height)), "white")
    canvas.paste(over, (0, 0))
    canvas.paste(panel, (over.width, 0))
    return canvas


def _check_manifest(path: Path, record: dict) -> None:
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        old = None
    if not isinstance(old, dict) or any(old.get(k) != v for k, v in record.items()):
        raise ValueError(f"{path.parent} holds masks made with other settings ({path.name} records "
                         f"{old}); pass another --out, or delete that folder to redo it.")


def load_segmenter(names: Sequence[str], checkpoint: Optional[Union[str, os.PathLike]],
                   clip: Optional[torch.nn.Module], device: Any, templates: Optional[Sequence[str]],
                   allow_legacy: bool) -> Tuple[torch.nn.Module, str, Optional[int]]:
    """(eval-mode model, its kind, the checkpoint's test size): MaskCLIP without a checkpoint, else the
    trained run (the same loading and class check as ``segment.segment``)."""
    if checkpoint is None:
        clip = clip if clip is not None else load_clip(device=device)
        model, kind, size = MaskCLIP(clip, names, templates=templates or PROMPT_TEMPLATES).to(device), "maskclip", None
    else:
        model, kind, size = _load_for_checkpoint(checkpoint, names, clip, device, allow_legacy)
    return model.eval(), kind, size


@torch.no_grad()
def segment_folder(images: Union[str, os.PathLike], out: Union[str, os.PathLike], class_names: Sequence[str],
                   checkpoint: Optional[Union[str, os.PathLike]] = None, *,
                   clip: Optional[torch.nn.Module] = None, test_size: Optional[int] = None,
                   pd_threshold: Optional[float] = None, device: Any = "auto",
                   templates: Optional[Sequence[str]] = None, allow_legacy: bool = False,
                   progress: bool = True) -> FolderResult:
    """Write a mask and an overlay PNG for every readable image under ``images`` (module doc).

    ``checkpoint`` None: MaskCLIP with ``clip``; otherwise a trained run or checkpoint file, which
    must have been trained for ``class_names``. ``test_size``: the short side the model sees
    (default: the checkpoint's, else each image's own short side up to 448)."""
    names = validate_class_names(class_names)
    src, dst = Path(images), Path(out)
    exclude = [src / LABELS_DIR]
    if dst.resolve().is_relative_to(src.resolve()):
        exclude.append(dst)  # never segment our own outputs on a second run
    ids, paths, _, unreadable = scan_images(src, exclude)
    dev = resolve_device(device)
    model, kind, ck_size = load_segmenter(names, checkpoint, clip, dev, templates, allow_legacy)
    size = test_size or ck_size
    record = {"class_names": list(names), "model": kind, "test_size": size, "pd_threshold": pd_threshold,
              "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve())}
    _check_manifest(dst / "segment.json", record)
    colours = class_colours(len(names))
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write_json(dst / "segment.json", record)
    atomic_write_bytes(dst / "legend.png", _png(legend_panel(list(range(len(names))), names, colours, 0)))
    res = FolderResult(out=dst, unreadable=unreadable, model=kind)
    for rid, path in tqdm(list(zip(ids, paths)), desc="segment", unit="img", disable=not progress):
        mask_path, over_path = dst / "masks" / f"{rid}{SUFFIX}", dst / "overlays" / f"{rid}{SUFFIX}"
        if mask_path.is_file() and over_path.is_file():
            res.existing.append(rid)
            continue
        image = open_image(path)
        mask = predict_mask(model, image, size, pd_threshold, dev)
        atomic_write_files({over_path: _png(overlay_image(image, mask, names, colours)),
                            mask_path: _png(mask_image(mask, colours))})
        res.written.append(rid)
    return res


__all__ = ("segment_folder", "FolderResult", "class_colours", "mask_image", "overlay_image", "legend_panel",
           "load_segmenter")
