"""Readers for the five benchmarks in the layout written by ``python -m data_prep``.

Layout of a dataset root (see ``data_prep/prepare.py``)::

    <root>/images/{train,val}/<id>.<jpg|png>
    <root>/labels/val/<id>.png       8-bit, 255 = ignore
    <root>/manifest.json

* Items are sorted by id. ``split="train"`` yields ``{"id", "image"}`` and the
  reader holds no label path at all (training never sees a label);
  ``split="val"`` yields ``{"id", "image", "label"}`` with ``label`` an int64
  array (H, W), 255 = ignore.
* ``reduce_zero_label`` (VOC, Context, ADE20K, whose on-disk 0 is
  background/"other"): 0 -> 255 and 1..254 -> 0..253.
* Images are returned as RGB PIL images whatever their mode on disk.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from .class_lists import class_names
from .ids import safe_relative_id
from .image_files import ImageFiles

__all__ = [
    "BENCHMARKS",
    "IGNORE_INDEX",
    "BenchmarkImages",
    "BenchmarkSegmentation",
    "benchmark",
    "default_root",
    "prepare_command",
    "reduce_zero_label",
]

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# name -> (num_classes, reduce_zero_label); class lists live in class_names/<name>.txt
BENCHMARKS: Dict[str, tuple] = {
    "voc": (20, True),
    "context": (59, True),
    "ade": (150, True),
    "cityscapes": (19, False),
    "coco_stuff27": (27, False),
}


def default_root(name: str) -> Path:
    """``$RECLIP_DATA/<name>`` when that variable is set, else ``data/<name>``."""
    base = os.environ.get("RECLIP_DATA")
    return Path(base) / name if base else Path("data") / name


def prepare_command(name: str, root: os.PathLike) -> str:
    cmd = f"python -m data_prep {name} --root {root}"
    if name == "cityscapes":
        cmd += " --archives DIR_WITH_YOUR_CITYSCAPES_ZIPS"
    return cmd


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 -> 255 (ignore); v -> v - 1 for 1..254; 255 stays 255. Returns int64."""
    lab = np.asarray(label).astype(np.int64)
    out = lab - 1
    out[lab == 0] = IGNORE_INDEX
    out[lab == IGNORE_INDEX] = IGNORE_INDEX
    return out


def _missing(name: str, root: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name}: {what} not found under {root}. Prepare the dataset first with:\n"
        f"    {prepare_command(name, root)}\n"
        "(see docs/datasets.md for disk space and time), or pass root=... pointing at a prepared copy.")


class BenchmarkImages(ImageFiles):
    """One split of a prepared benchmark, images only (the training reader)."""

    def __init__(self, name: str, split: str = "train", root: Optional[os.PathLike] = None):
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}.")
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r} for {name}; use 'train' or 'val'.")
        self.name = name
        self.split = split
        self.root = Path(root) if root is not None else default_root(name)
        self.num_classes, self.reduce_zero_label = BENCHMARKS[name]
        self.class_names = class_names(name)
        self.ignore_index = IGNORE_INDEX
        img_dir = self.root / "images" / split
        if not img_dir.is_dir():
            raise _missing(name, self.root, f"images/{split}")
        files = sorted((p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
                       key=lambda p: p.stem)
        if not files:
            raise _missing(name, self.root, f"any image in images/{split}")
        # ids name label files and outputs; the files themselves may be links (readers only read)
        stems = [safe_relative_id(p.stem, f"{name}: the image file {p}", flat=True,
                                  fix=f"Rerun `{prepare_command(name, self.root)} --force`.") for p in files]
        if len(set(stems)) != len(stems):
            raise ValueError(f"{name}: two images share an id in {img_dir}; rerun "
                             f"`{prepare_command(name, self.root)} --force`.")
        self._check_manifest(len(files))
        self.ids: List[str] = stems
        self._images: List[Path] = files
        self._pos: Dict[str, int] = {i: k for k, i in enumerate(stems)}

    def _check_manifest(self, n: int) -> None:
        path = self.root / "manifest.json"
        if not path.is_file():
            return
        try:
            counts = json.loads(path.read_text(encoding="utf-8")).get("counts", {})
        except ValueError:
            return
        want = counts.get(self.split)
        if want is not None and want != n:
            raise ValueError(f"{self.name}: {n} {self.split} images on disk but the manifest records {want}; "
                             f"the preparation was interrupted or files were changed. Rerun "
                             f"`{prepare_command(self.name, self.root)} --force`.")

    def index(self, id: str) -> int:
        """Position of the item with this id (KeyError naming the split if absent)."""
        try:
            return self._pos[id]
        except KeyError:
            raise KeyError(f"no item with id {id!r} in {self.name} {self.split}") from None

    def by_id(self, id: str) -> dict:
        """The item with this id."""
        return self[self.index(id)]

    def load_image(self, i: int) -> Image.Image:
        try:
            return super().load_image(i)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"{self.name} {self.split} {self.ids[self._index(i)]}: {err} To restore the prepared "
                            f"dataset, rerun `{prepare_command(self.name, self.root)} --force`.") from err

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}, n={len(self)}, root={str(self.root)!r})"


class BenchmarkSegmentation(BenchmarkImages):
    """The evaluation split: images and labels (int64, 255 = ignore)."""

    def __init__(self, name: str, split: str = "val", root: Optional[os.PathLike] = None):
        if split != "val":
            raise ValueError(f"{name}: labels are only read for the 'val' split (got {split!r}); "
                             "training readers hold images only.")
        super().__init__(name, split, root)
        lab_dir = self.root / "labels" / split
        if not lab_dir.is_dir():
            raise _missing(name, self.root, f"labels/{split}")
        labels = [lab_dir / f"{i}.png" for i in self.ids]
        absent = [p.name for p in labels if not p.is_file()]
        if absent:
            raise FileNotFoundError(
                f"{name}: {len(absent)} val labels are missing in {lab_dir} (e.g. {absent[:3]}); rerun "
                f"`{prepare_command(name, self.root)} --force`.")
        self._labels: List[Path] = labels

    def label_path(self, i: int) -> Path:
        return self._labels[self._index(i)]

    def load_label(self, i: int) -> np.ndarray:
        with Image.open(self.label_path(i)) as im:
            if im.mode not in ("L", "P"):
                raise ValueError(f"{self.label_path(i)}: expected an 8-bit single-channel label, got mode {im.mode}; "
                                 f"labels are written by `{prepare_command(self.name, self.root)} --force`.")
            lab = np.array(im)
        if self.reduce_zero_label:
            return reduce_zero_label(lab)
        return lab.astype(np.int64)

    def __getitem__(self, i: int) -> dict:
        i = self._index(i)
        item = {"id": self.ids[i], "image": self.load_image(i), "label": self.load_label(i)}
        if item["label"].shape != (item["image"].height, item["image"].width):
            raise ValueError(f"{self.name} {self.ids[i]}: label {item['label'].shape} does not match image "
                             f"{(item['image'].height, item['image'].width)}; labels must have the image's size. "
                             f"Rerun `{prepare_command(self.name, self.root)} --force`.")
        return item


def benchmark(name: str, split: str, root: Optional[os.PathLike] = None):
    """``BenchmarkImages`` for ``train``, ``BenchmarkSegmentation`` for ``val``."""
    if split == "val":
        return BenchmarkSegmentation(name, split, root)
    return BenchmarkImages(name, split, root)
