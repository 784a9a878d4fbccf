"""``--source hf``: build the reader layout from a Hugging Face ``datasets`` copy.

Only copies known to be *faithful* to the official release are offered:

* ``ade``: ``zhoubolei/scene_parse_150`` (config ``scene_parsing``), whose loading
  script downloads the official ``ADEChallengeData2016.zip``; its ``annotation``
  column holds the official SceneParse150 PNGs (0 other, 1..150). Datasets >= 4
  refuse loading scripts, so the auto-converted parquet branch
  (``refs/convert/parquet``) is read. This call needs the internet and was not
  exercised in this project's tests (no network there); the writer it feeds is.

The hub copies of VOC, Context and COCO-Stuff have unverified label encodings, and
Cityscapes must not be redistributed; for those ``--source hf`` refuses with a
message pointing at ``--source official``.

:func:`write_hf_split` (rows -> ``images/<split>/``, ``labels/val/``) works on any
``datasets.Dataset`` and is what the tests run, on a fixture saved with
``Dataset.save_to_disk``.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable, Dict, Optional

from PIL import Image

from reclip_core.datasets import safe_relative_id

from . import convert

__all__ = ["HF_SOURCES", "load_hf_split", "write_hf_split", "prepare_hf"]

HF_SOURCES: Dict[str, dict] = {
    "ade": {
        "repo": "zhoubolei/scene_parse_150",
        "revision": "refs/convert/parquet",
        "data_dir": "scene_parsing",
        "splits": {"train": "train", "val": "validation"},
        "image": "image",
        "label": "annotation",
        "convert": "ade_label",
    },
}


def _unsupported(name: str) -> ValueError:
    return ValueError(
        f"--source hf is not offered for {name!r}: no Hugging Face copy is known to keep the "
        f"official labels ({'licence forbids redistribution' if name == 'cityscapes' else 'label encoding unverified'}). "
        f"Use: python -m data_prep {name} --root DIR --source official")


def load_hf_split(name: str, split: str, **kwargs):
    """``datasets.load_dataset`` for the registered copy (needs the internet)."""
    if name not in HF_SOURCES:
        raise _unsupported(name)
    import datasets

    spec = HF_SOURCES[name]
    return datasets.load_dataset(spec["repo"], revision=spec["revision"], data_dir=spec["data_dir"],
                                 split=spec["splits"][split], **kwargs)


def _row_id(raw: dict, index: int, split: str, root: Path) -> str:
    """The row's image file stem (checked: it becomes a file name in ``root``), else ``<split>_<index>``."""
    path = (raw or {}).get("path") if isinstance(raw, dict) else None
    if path:
        return safe_relative_id(Path(path).stem, f"the Hugging Face {split} row {index} (image path {path!r})",
                                root=root, flat=True, fix="Use a faithful copy of the dataset (see data_prep/hf.py) "
                                "or `--source official`.")
    return f"{split}_{index:06d}"


def _image_bytes(raw) -> tuple:
    """(bytes, suffix) of an undecoded ``datasets.Image`` value, without re-encoding when possible."""
    if isinstance(raw, dict) and raw.get("bytes"):
        data = raw["bytes"]
    elif isinstance(raw, dict) and raw.get("path") and os.path.exists(raw["path"]):
        data = Path(raw["path"]).read_bytes()
    elif isinstance(raw, Image.Image):
        buf = io.BytesIO()
        raw.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise ValueError(f"cannot read image value of type {type(raw).__name__}")
    fmt = (Image.open(io.BytesIO(data)).format or "PNG").lower()
    return data, {"jpeg": ".jpg", "png": ".png"}.get(fmt, "." + fmt)


def write_hf_split(ds, root: os.PathLike, split: str, *, image_column: str = "image",
                   label_column: Optional[str] = None, label_fn: Callable = convert.ade_label,
                   progress: bool = True, limit: Optional[int] = None) -> dict:
    """Write a ``datasets.Dataset`` split into the reader layout; returns the manifest entry.

    For ``split="train"`` the label column is dropped before any row is read.
    """
    import datasets
    from tqdm.auto import tqdm

    from reclip_core.atomic_io import atomic_write_bytes

    from .prepare import Item, write_split

    root = Path(root)
    keep = [image_column] + ([label_column] if split == "val" and label_column else [])
    ds = ds.select_columns(keep)
    for col in keep:
        ds = ds.cast_column(col, datasets.Image(decode=False))
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    staging = root / "raw" / "hf" / split
    items = []
    for i, row in enumerate(tqdm(ds, desc=f"hf {split}", unit="row", disable=not progress, leave=False)):
        rid = _row_id(row[image_column], i, split, staging)
        data, suffix = _image_bytes(row[image_column])
        img_path = staging / f"{rid}{suffix}"
        if not img_path.exists() or img_path.stat().st_size != len(data):
            atomic_write_bytes(img_path, data)
        label = None
        if split == "val":
            lab_data, _ = _image_bytes(row[label_column])
            label = (lambda b=lab_data: label_fn(Image.open(io.BytesIO(b))))
        items.append(Item(rid, img_path, label))
    return write_split(root, split, items, progress=progress)


def prepare_hf(name: str, root: os.PathLike, *, progress: bool = True, limit: Optional[int] = None,
               loader: Optional[Callable[[str], object]] = None) -> dict:
    """Build ``root`` from the registered hub copy. ``loader(split) -> Dataset`` overrides the download."""
    from .prepare import write_manifest

    if name not in HF_SOURCES:
        raise _unsupported(name)
    spec = HF_SOURCES[name]
    load = loader or (lambda split: load_hf_split(name, split))
    splits = {}
    for split in ("train", "val"):
        splits[split] = write_hf_split(load(split), root, split, image_column=spec["image"],
                                       label_column=spec["label"], label_fn=getattr(convert, spec["convert"]),
                                       progress=progress, limit=limit)
    extra = {"hf": {k: spec[k] for k in ("repo", "revision", "data_dir")}}
    if limit is not None:
        extra["limit"] = limit
    return write_manifest(Path(root), name, splits, source="hf", extra=extra)
