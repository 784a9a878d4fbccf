"""Toy-world images (and their labels) written as plain files in the ``folder`` dataset's layout.

``export_toy_folder(out, n)`` gives ``out/<id>.png`` (or ``out/group<k>/<id>.png`` with
``groups``), ``out/labels/<id>.png`` (8-bit, value i = class i, 255 = ignore; labelled splits
only, unless ``labels=False``), ``out/classes.txt`` (one class per line) and ``out/export.json``
(what the folder was exported from). It is a folder of "your own images" whose truth is known:
notebook 06, the tests and docs/your-images.md run hypothesis → train → evaluate → segment on it.

The folder is written beside ``out`` and renamed into place when complete, so an interrupted
export leaves no half folder. An existing export of the same world and settings is reused; one
of other settings is refused (``StaleFileError``), as is a folder that is not an export.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
from PIL import Image

from ..atomic_io import StaleFileError, atomic_write_json
from .toyworld import ToyWorld
from .toyworld_presets import GENERATOR_VERSION

FORMATS = ("png", "jpg", "webp")
MANIFEST = "export.json"


def export_record(world: ToyWorld, n: int, labels: bool, groups: int, fmt: str) -> Dict[str, Any]:
    """What an exported folder's files depend on: the world (preset hash, generator) and the settings."""
    return {"preset": world.preset["name"], "preset_hash": world.preset_hash, "generator": GENERATOR_VERSION,
            "split": world.split, "n": int(n), "labels": bool(labels), "groups": int(groups), "format": fmt}


def _write(world: ToyWorld, dest: Path, n: int, labels: bool, groups: int, fmt: str) -> None:
    for i in range(n):
        item = world[i]
        rel = f"group{i % groups}/{item['id']}" if groups > 1 else str(item["id"])
        img_path = dest / f"{rel}.{fmt}"
        img_path.parent.mkdir(parents=True, exist_ok=True)
        item["image"].save(img_path, **({"quality": 95} if fmt == "jpg" else {}))
        if labels and "label" in item:
            lab_path = dest / "labels" / f"{rel}.png"
            lab_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(item["label"]).astype(np.uint8), mode="L").save(lab_path)
    (dest / "classes.txt").write_text("\n".join(world.class_names) + "\n", encoding="utf-8")


def _existing(out: Path, record: Mapping[str, Any]) -> bool:
    """True when ``out`` is already this export; raises when it is another one or not an export."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder: choose another output folder.")
    manifest = out / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text(encoding="utf-8"))
        if old == dict(record):
            return True
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in record.items() if old.get(k) != v)
        raise StaleFileError(out, f"{out} was exported from another world or with other settings ({diff}): "
                                  "delete it or choose another output folder.")
    if any(out.iterdir()):
        raise ValueError(f"{out} exists and holds files that are not a toy-world export: choose another "
                         "output folder (an export never writes into a folder of other files).")
    out.rmdir()
    return False


def export_toy_folder(out: Union[str, os.PathLike], n: int, preset: Union[str, os.PathLike, Mapping] = "biased",
                      split: str = "val", root: Optional[Union[str, os.PathLike]] = None, labels: bool = True,
                      groups: int = 1, fmt: str = "png") -> Path:
    """Export the first ``n`` images of a toy-world split into ``out`` (module doc); returns ``out``.

    The world is generated first when it is not built yet."""
    if n < 1 or groups < 1:
        raise ValueError(f"the number of images and of groups must be >= 1, got {n} and {groups}.")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}.")
    world = ToyWorld(split, preset=preset, root=root)
    if n > len(world):
        raise ValueError(f"the toy-world {split} split has {len(world)} images, fewer than {n}; ask for fewer.")
    out = Path(out)
    record = export_record(world, n, labels and split != "train", groups, fmt)
    if _existing(out, record):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        _write(world, partial, n, record["labels"], groups, fmt)
        atomic_write_json(partial / MANIFEST, record)
        os.replace(partial, out)  # a folder appears whole or not at all
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


__all__ = ("export_toy_folder", "export_record", "FORMATS", "MANIFEST")
