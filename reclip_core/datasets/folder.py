"""Reader of your own folder of images (``dataset: folder``, docs/your-images.md).

Layout::

    <data_root>/**/<name>.<jpg|jpeg|png|webp>   images, nested folders allowed
    <data_root>/labels/<id>.png                 optional masks, only for evaluation

* The id of an image is its path relative to ``data_root`` without the extension, with ``/``
  separators (``street/0001``); items are sorted by id. Hidden files and folders (``.name``) and
  the ``labels`` folder are not scanned for images. Two files with one id (``a.jpg``, ``a.png``)
  are refused.
* A label is an 8-bit PNG (mode ``L`` or ``P``) of the image's size whose value ``i`` is class
  ``i`` of ``class_names`` (0-based) and 255 = ignore.
* ``split="train"`` yields ``{"id", "image"}``: the reader never opens, lists or remembers the
  labels folder (training is label-free). ``split="val"`` yields ``{"id", "image", "label"}`` for
  the images that have a label, and refuses labels of the wrong size, with class ids outside
  ``0..num_classes-1`` (255 aside), or without an image.
* Unreadable or corrupt image files are **skipped**, with their count and names printed (once per
  process), so one broken file does not stop a long run; a folder with no readable image is an error.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .ids import safe_relative_id
from .image_files import ImageFiles

__all__ = ["IMAGE_SUFFIXES", "LABELS_DIR", "IGNORE_INDEX", "FolderImages", "FolderSegmentation", "folder_dataset",
           "scan_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LABELS_DIR = "labels"
IGNORE_INDEX = 255
_SHOWN = 10  # file names listed in a message before "... and N more"
_REPORTED: set = set()  # skip reports already printed in this process (a command builds a reader twice)
_CHECKED: Dict[Tuple[str, int, int], Tuple[Optional[str], Tuple[int, int]]] = {}


def _listing(items: Sequence[str]) -> str:
    more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _check_image(path: Path) -> Tuple[Optional[str], Tuple[int, int]]:
    """(why the file cannot be read or None, (height, width)). Decodes the whole file, since a
    truncated JPEG opens fine and fails only on load; JPEGs decode at 1/8 scale (``draft``), which
    still reads every byte, to keep the scan of a large folder fast. Cached per (path, size, mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _CHECKED:
        try:
            with Image.open(path) as im:
                size = (im.height, im.width)
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
            _CHECKED[key] = (None, size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            _CHECKED[key] = (f"{type(err).__name__}: {err}", (0, 0))
    return _CHECKED[key]


def scan_images(root: os.PathLike, exclude: Sequence[os.PathLike] = (), check: bool = True
                ) -> Tuple[List[str], List[Path], List[Tuple[int, int]], List[Tuple[str, str]]]:
    """Image files under ``root`` → (ids, paths, (h, w) sizes, skipped (relative path, reason)).

    ``exclude``: folders not descended into (the labels folder). Ids are checked with
    :func:`safe_relative_id` (a symbolic link leading outside ``root`` is refused)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder; pass the folder that "
                                "holds your images (--set data_root=DIR).")
    skip_dirs = {Path(os.path.abspath(p)) for p in exclude}
    found: Dict[str, Path] = {}
    for folder, dirs, files in os.walk(root, onerror=_walk_error):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(os.path.abspath(here / d)) not in skip_dirs)
        for name in files:
            p = here / name
            if name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rel = p.relative_to(root).with_suffix("").as_posix()
            rid = safe_relative_id(rel, f"folder: the image file {p}", root=root, suffix=p.suffix,
                                   fix="Rename or move that file (no links leading out of the folder).")
            if rid in found:
                raise ValueError(f"folder: the images {found[rid].name} and {p.name} in {here} share the id {rid!r}; "
                                 "rename one of them (ids are paths without the extension).")
            found[rid] = p
    ids, paths, sizes, skipped = [], [], [], []
    for rid in sorted(found):
        reason, size = _check_image(found[rid]) if check else (None, (0, 0))
        if reason is not None:
            skipped.append((found[rid].relative_to(root).as_posix(), reason))
            continue
        ids.append(rid)
        paths.append(found[rid])
        sizes.append(size)
    if not ids:
        what = (f"no readable image ({len(skipped)} unreadable: {_listing([s for s, _ in skipped])})" if skipped
                else f"no image file ({', '.join(IMAGE_SUFFIXES)})")
        raise ValueError(f"folder: {root} holds {what}; put your images there (nested folders are fine) or "
                         "point data_root at the right folder.")
    if skipped:
        _report(root, skipped, len(found))
    return ids, paths, sizes, skipped


def _walk_error(err: OSError) -> None:
    # bad input, as every other fault of the folder (ValueError: the CLI prints it as one line)
    raise ValueError(f"folder: cannot list {err.filename} ({err.strerror}); make it readable or move it "
                     "out of the image folder.") from err


def _report(root: Path, skipped: List[Tuple[str, str]], total: int) -> None:
    key = (str(root), tuple(skipped))
    if key in _REPORTED:
        return
    _REPORTED.add(key)
    lines = [f"folder: skipped {len(skipped)} of {total} image files in {root} that cannot be read "
             "(fix or remove them to use them):"]
    lines += [f"  {rel}: {why}" for rel, why in skipped[:_SHOWN]]
    if len(skipped) > _SHOWN:
        lines.append(f"  ... and {len(skipped) - _SHOWN} more")
    print("\n".join(lines), file=sys.stderr)


class FolderImages(ImageFiles):
    """The images of a folder, no labels (the training reader; ``split="train"``)."""

    def __init__(self, root: os.PathLike, split: str = "train", num_classes: Optional[int] = None,
                 labels: Optional[os.PathLike] = None, check_images: bool = True):
        if split not in ("train", "val"):
            raise ValueError(f"folder: unknown split {split!r}; use 'train' (all images, no labels) or 'val' "
                             "(the images that have a label).")
        self.name, self.split = "folder", split
        self.root = Path(root)
        self.num_classes = num_classes
        self.ignore_index = IGNORE_INDEX
        # The labels folder is pruned from the scan by name only; it is neither listed nor kept.
        exclude = [self.root / LABELS_DIR] + ([Path(labels)] if labels is not None else [])
        self.ids, self._images, self._sizes, self.skipped = scan_images(self.root, exclude, check_images)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)}, root={str(self.root)!r})"


class FolderSegmentation(FolderImages):
    """The images that have a label in ``<data_root>/labels`` (or ``labels``), with their labels."""

    def __init__(self, root: os.PathLike, split: str = "val", num_classes: Optional[int] = None,
                 labels: Optional[os.PathLike] = None, check_images: bool = True):
        if split != "val":
            raise ValueError(f"folder: labels are read only for the 'val' split (got {split!r}).")
        super().__init__(root, split, num_classes, labels, check_images)
        self.labels_dir = Path(labels) if labels is not None else self.root / LABELS_DIR
        if not self.labels_dir.is_dir():
            raise FileNotFoundError(
                f"folder: no labels folder {self.labels_dir}. Evaluation needs masks <data_root>/{LABELS_DIR}/<id>.png "
                "(8-bit PNG, value i = class i, 255 = ignore); hypothesis, train and segment need none.")
        found: Dict[str, Path] = {}
        for folder, dirs, files in os.walk(self.labels_dir, onerror=_walk_error):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                p = Path(folder) / name
                if name.startswith("."):
                    continue
                if p.suffix.lower() != ".png":
                    raise ValueError(f"folder: {p} is not a PNG; labels are 8-bit PNG index maps "
                                     f"{self.labels_dir}/<id>.png. Convert or remove it.")
                rel = p.relative_to(self.labels_dir).with_suffix("").as_posix()
                found[safe_relative_id(rel, f"folder: the label file {p}", root=self.labels_dir, suffix=p.suffix,
                                       fix="Rename or move that file.")] = p
        self._check_pairs(found)

    def _check_pairs(self, found: Dict[str, Path]) -> None:
        known = set(self.ids)
        skipped = {Path(rel).with_suffix("").as_posix() for rel, _ in self.skipped}
        orphans = sorted(set(found) - known - skipped)
        if orphans:
            raise ValueError(f"folder: {len(orphans)} labels in {self.labels_dir} have no image in {self.root}: "
                             f"{_listing(orphans)}. Add the images or remove those labels "
                             "(a label <id>.png belongs to the image <id>.<jpg|jpeg|png|webp>).")
        keep = [k for k, i in enumerate(self.ids) if i in found]
        if not keep:
            raise ValueError(f"folder: none of the {len(self.ids)} images has a label in {self.labels_dir}; "
                             "evaluation needs at least one <id>.png there.")
        self.unlabelled = [i for i in self.ids if i not in found]
        note = (str(self.labels_dir), len(keep), len(self.ids))
        if self.unlabelled and note not in _REPORTED:
            _REPORTED.add(note)
            print(f"folder: evaluating the {len(keep)} of {len(self.ids)} images that have a label in "
                  f"{self.labels_dir}.", file=sys.stderr)
        self.ids = [self.ids[k] for k in keep]
        self._images = [self._images[k] for k in keep]
        self._sizes = [self._sizes[k] for k in keep]
        self._labels = [found[i] for i in self.ids]
        problems = [m for m in (self._check_label(k) for k in range(len(self.ids))) if m]
        if problems:
            raise ValueError(f"folder: {len(problems)} bad labels in {self.labels_dir}:\n  "
                             + "\n  ".join(problems[:_SHOWN]) + (f"\n  ... and {len(problems) - _SHOWN} more"
                                                                 if len(problems) > _SHOWN else "")
                             + "\nLabels must be 8-bit PNGs of the image's size with values 0..C-1 "
                             "(the line order of class_names) or 255 (ignore).")

    def _check_label(self, k: int) -> Optional[str]:
        p = self._labels[k]
        try:
            lab = self._read_label(p)
        except ValueError as err:
            return str(err)
        if self._sizes[k] != (0, 0) and lab.shape != self._sizes[k]:
            (h, w), (ih, iw) = lab.shape, self._sizes[k]
            return f"{self.ids[k]}.png: size {w}x{h} but the image is {iw}x{ih}"
        if self.num_classes is not None:
            bad = sorted(int(v) for v in np.unique(lab) if v != IGNORE_INDEX and v >= self.num_classes)
            if bad:
                return (f"{self.ids[k]}.png: class ids {bad[:5]} but there are only {self.num_classes} classes "
                        f"(0..{self.num_classes - 1})")
        return None

    @staticmethod
    def _read_label(p: Path) -> np.ndarray:
        try:
            with Image.open(p) as im:
                if im.mode not in ("L", "P"):
                    raise ValueError(f"{p}: mode {im.mode}, expected an 8-bit single-channel PNG (L or P)")
                return np.array(im)
        except (OSError, SyntaxError) as err:
            raise ValueError(f"{p}: cannot be read ({err})") from None

    def label_path(self, i: int) -> Path:
        return self._labels[self._index(i)]

    def load_label(self, i: int) -> np.ndarray:
        return self._read_label(self.label_path(i)).astype(np.int64)

    def __getitem__(self, i: int) -> dict:
        i = self._index(i)
        return {"id": self.ids[i], "image": self.load_image(i), "label": self.load_label(i)}


def folder_dataset(split: str, root: Optional[os.PathLike] = None, **kw) -> FolderImages:
    """``FolderImages`` for ``train``, ``FolderSegmentation`` for ``val`` (``get_dataset("folder", ...)``)."""
    if root is None:
        raise ValueError("the folder dataset needs the folder of your images: --set data_root=DIR "
                         "(see docs/your-images.md).")
    unknown = set(kw) - {"num_classes", "labels", "check_images"}
    if unknown:
        raise ValueError(f"folder: unexpected options {sorted(unknown)}; valid: num_classes, labels, check_images.")
    cls = FolderSegmentation if split == "val" else FolderImages
    return cls(root, split, **kw)
