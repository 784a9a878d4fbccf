"""Per-dataset pipelines: fetch -> verify -> extract -> convert -> manifest.

Converted layout of a dataset root (what ``reclip_core.datasets.benchmarks`` reads)::

    <root>/images/train/<id>.<jpg|png>   unlabeled training images
    <root>/images/val/<id>.<jpg|png>     evaluation images
    <root>/labels/val/<id>.png           evaluation labels, 8-bit, 255 = ignore (see convert.py)
    <root>/manifest.json                 files, counts, checksums, converter version
    <root>/raw/                          extracted archives (kept unless --remove-raw)

Training labels are never converted nor linked: the unsupervised method must
not see them, and the train split's folder holds images only. Images are
hard-linked from ``raw/`` when possible (no extra disk space), else copied.
Every id read from a split list or annotation file passes ``safe_relative_id``
before it becomes a path, so no list can make a run write outside its root.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from reclip_core.atomic_io import atomic_write_bytes, atomic_write_json
from reclip_core.datasets import safe_relative_id

from . import DATASETS, convert
from .download import dataset_archives, fetch
from .extract import safe_extract

__all__ = ["DATASETS", "SPECS", "Item", "prepare", "write_split", "write_manifest",
           "gather_voc", "gather_context", "gather_ade", "gather_cityscapes", "gather_coco_stuff27",
           "prepare_from_raw"]



@dataclass(frozen=True)
class Spec:
    num_classes: int
    reduce_zero_label: bool
    label_values: str
    official_splits: str


SPECS: Dict[str, Spec] = {
    "voc": Spec(20, True, "0 background, 1..20 classes, 255 border",
                "train = ImageSets/Segmentation/train.txt (1,464), val = val.txt (1,449)"),
    "context": Spec(59, True, "0 background, 1..59 classes (mmseg 59-class order)",
                    "train/val = the 'phase' of trainval_merged.json (4,998 / 5,105)"),
    "ade": Spec(150, True, "0 other, 1..150 classes (official SceneParse150 values)",
                "train = images/training (20,210), val = images/validation (2,000)"),
    "cityscapes": Spec(19, False, "trainIds 0..18, 255 ignore",
                       "train = leftImg8bit/train (2,975), val = leftImg8bit/val (500)"),
    "coco_stuff27": Spec(27, False, "coarse ids 0..26, 255 unlabeled",
                         "train = train2017 (118,287), val = val2017 (5,000)"),
}


@dataclass
class Item:
    id: str
    image: Path
    label: Optional[Callable[[], np.ndarray]] = None  # val only


def _log(msg: str) -> None:
    print(f"[data_prep] {msg}", file=sys.stderr, flush=True)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"expected {what} at {path}, not found: the archive is incomplete or "
                                "of another release. Delete the raw/ folder and rerun the same command.")
    return path


def _redo(name: str, raw: Path) -> str:
    """What to do when an archive's list holds an unsafe id (ends the error message)."""
    return (f"Nothing was converted. Get the archive from a trusted source (data_prep/archives.yaml), delete "
            f"{raw} and rerun `python -m data_prep {name} --root {raw.parent} --force`.")


def _read_ids(path: Path, folder: Path, suffix: str, fix: str) -> List[str]:
    """Ids of a split list, one a line; each must name a file ``<id><suffix>`` inside ``folder``."""
    lines = _require(path, "a split list").read_text().splitlines()
    return [safe_relative_id(ln.strip(), f"the split list {path} line {n}", root=folder, suffix=suffix, fix=fix)
            for n, ln in enumerate(lines, start=1) if ln.strip()]


# --- gathering: find the images (and val label sources) in the extracted archives -----------

def gather_voc(raw: Path, files: Dict[str, Path]) -> Dict[str, List[Item]]:
    voc = _require(raw / "VOCdevkit" / "VOC2012", "VOCdevkit/VOC2012")
    out = {}
    for split in ("train", "val"):
        ids = _read_ids(voc / "ImageSets" / "Segmentation" / f"{split}.txt", voc / "JPEGImages", ".jpg",
                        _redo("voc", raw))
        items = []
        for i in ids:
            img = voc / "JPEGImages" / f"{i}.jpg"
            lab = voc / "SegmentationClass" / f"{i}.png"
            items.append(Item(i, img, (lambda p=lab: convert.voc_label(p)) if split == "val" else None))
        out[split] = items
    return out


def gather_context(raw: Path, files: Dict[str, Path]) -> Dict[str, List[Item]]:
    voc = _require(raw / "VOCdevkit" / "VOC2010", "VOCdevkit/VOC2010")
    js = files["trainval_merged.json"]
    _log(f"reading {js.name} (large; this takes a while)")
    with open(js, "r", encoding="utf-8") as fh:
        data = json.load(fh)
    anns: Dict[int, list] = {}
    for a in data.get("annos_segmentation", []):
        anns.setdefault(a["image_id"], []).append(a)
    table = convert.context59_lut()
    out = {"train": [], "val": []}
    for k, img in enumerate(data["images"]):
        phase = img.get("phase")
        if phase not in out:
            continue
        safe_relative_id(img.get("file_name"), f"{js} entry images[{k}] (image_id {img.get('image_id')}), "
                         "key 'file_name',", root=voc / "JPEGImages", fix=_redo("context", raw))
        stem = Path(img["file_name"]).stem
        path = voc / "JPEGImages" / img["file_name"]
        label = None
        if phase == "val":
            img_anns = anns.get(img["image_id"], [])
            h, w = int(img["height"]), int(img["width"])
            label = (lambda h=h, w=w, a=img_anns: convert.context_label(convert.context_raw_mask(h, w, a), table))
        out[phase].append(Item(stem, path, label))
    del data
    return out


def gather_ade(raw: Path, files: Dict[str, Path]) -> Dict[str, List[Item]]:
    ade = _require(raw / "ADEChallengeData2016", "ADEChallengeData2016")
    out = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        imgs = sorted(_require(ade / "images" / folder, f"images/{folder}").glob("*.jpg"))
        items = []
        for p in imgs:
            lab = ade / "annotations" / folder / f"{p.stem}.png"
            items.append(Item(p.stem, p, (lambda q=lab: convert.ade_label(q)) if split == "val" else None))
        out[split] = items
    return out


def gather_cityscapes(raw: Path, files: Dict[str, Path]) -> Dict[str, List[Item]]:
    out = {}
    for split in ("train", "val"):
        base = _require(raw / "leftImg8bit" / split, f"leftImg8bit/{split}")
        items = []
        for p in sorted(base.glob("*/*_leftImg8bit.png")):
            i = p.name[: -len("_leftImg8bit.png")]
            lab = raw / "gtFine" / split / p.parent.name / f"{i}_gtFine_labelIds.png"
            items.append(Item(i, p, (lambda q=lab: convert.cityscapes_label(q)) if split == "val" else None))
        out[split] = items
    return out


def gather_coco_stuff27(raw: Path, files: Dict[str, Path]) -> Dict[str, List[Item]]:
    out = {}
    for split, folder in (("train", "train2017"), ("val", "val2017")):
        imgs = sorted(_require(raw / "images" / folder, f"images/{folder}").glob("*.jpg"))
        items = []
        for p in imgs:
            lab = raw / "stuffthingmaps" / folder / f"{p.stem}.png"
            items.append(Item(p.stem, p, (lambda q=lab: convert.coco_stuff27_label(q)) if split == "val" else None))
        out[split] = items
    return out


GATHER = {"voc": gather_voc, "context": gather_context, "ade": gather_ade,
          "cityscapes": gather_cityscapes, "coco_stuff27": gather_coco_stuff27}

# where each archive is extracted (under raw/) and which members are needed
_EXTRACT: Dict[str, Tuple[str, Optional[Callable[[str], bool]]]] = {
    "VOCtrainval_11-May-2012.tar": ("", lambda r: r.startswith(("VOCdevkit/VOC2012/JPEGImages/",
                                                                "VOCdevkit/VOC2012/SegmentationClass/",
                                                                "VOCdevkit/VOC2012/ImageSets/Segmentation/"))),
    "VOCtrainval_03-May-2010.tar": ("", lambda r: r.startswith("VOCdevkit/VOC2010/JPEGImages/")),
    "trainval_merged.json": (None, None),  # not an archive
    "ADEChallengeData2016.zip": ("", lambda r: not r.startswith("ADEChallengeData2016/annotations/training")),
    "gtFine_trainvaltest.zip": ("", lambda r: r.startswith("gtFine/val/") and r.endswith("_labelIds.png")),
    "leftImg8bit_trainvaltest.zip": ("", lambda r: r.startswith(("leftImg8bit/train/", "leftImg8bit/val/"))),
    "train2017.zip": ("images", None),
    "val2017.zip": ("images", None),
    "stuffthingmaps_trainval2017.zip": ("stuffthingmaps", lambda r: r.startswith("val2017/")),
}


# --- writing -------------------------------------------------------------------------------

def _place(src: Path, dst: Path) -> None:
    if dst.exists():
        if dst.stat().st_size == src.stat().st_size:
            return
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _clean_stale(folder: Path, keep: set) -> int:
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and p.name not in keep and not p.name.startswith("."):
                p.unlink()
                n += 1
    return n


def write_split(root: Path, split: str, items: Sequence[Item], *, progress: bool = True) -> dict:
    """Link/copy the images (and, for val, write converted labels); return the manifest entry."""
    from tqdm.auto import tqdm

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"duplicate ids in the {split} split: {dup}")
    items = sorted(items, key=lambda it: it.id)
    img_dir, lab_dir = root / "images" / split, root / "labels" / split
    for it in items:  # every id is checked before the first file is written
        for folder, suffix in [(img_dir, Path(it.image).suffix.lower())] + [(lab_dir, ".png")] * (split == "val"):
            safe_relative_id(it.id, f"the {split} split's item list (image {it.image})", root=folder, suffix=suffix)
    images, labels = [], []
    for it in tqdm(items, desc=f"{split} split", unit="img", disable=not progress, leave=False):
        src = _require(Path(it.image), f"image {it.id}")
        dst = img_dir / f"{it.id}{src.suffix.lower()}"
        _place(src, dst)
        images.append({"file": dst.relative_to(root).as_posix(), "size": dst.stat().st_size})
        if split == "val":
            if it.label is None:
                raise ValueError(f"val item {it.id} has no label source")
            data = convert.png_bytes(it.label())
            out = lab_dir / f"{it.id}.png"
            atomic_write_bytes(out, data)
            labels.append({"file": out.relative_to(root).as_posix(), "size": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
    _clean_stale(img_dir, {Path(r["file"]).name for r in images})
    if split == "val":
        _clean_stale(lab_dir, {Path(r["file"]).name for r in labels})
    entry = {"count": len(items), "ids_sha256": hashlib.sha256("\n".join(it.id for it in items).encode()).hexdigest(),
             "images": images}
    if split == "val":
        entry["labels"] = labels
    return entry


def write_manifest(root: Path, name: str, splits: Dict[str, dict], *, source: str,
                   archives: Sequence[dict] = (), extra: Optional[dict] = None) -> dict:
    spec = SPECS[name]
    manifest = {
        "dataset": name,
        "converter_version": convert.CONVERTER_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": source,
        "layout": {"images": "images/<split>/<id>.<ext>", "labels": "labels/val/<id>.png"},
        "labels": {"values_on_disk": spec.label_values, "ignore_index": 255,
                   "reduce_zero_label_in_reader": spec.reduce_zero_label,
                   "num_classes": spec.num_classes, "class_names": f"reclip_core/class_names/{name}.txt"},
        "splits_source": spec.official_splits,
        "archives": list(archives),
        "counts": {k: v["count"] for k, v in splits.items()},
        "splits": splits,
    }
    if extra:
        manifest.update(extra)
    atomic_write_json(root / "manifest.json", manifest)
    return manifest


def prepare_from_raw(name: str, root: Path, files: Dict[str, Path], *, progress: bool = True,
                     source: str = "official", archives: Sequence[dict] = (), limit: Optional[int] = None) -> dict:
    """Convert already-extracted archives under ``root/raw`` into the reader layout."""
    root = Path(root)
    groups = GATHER[name](root / "raw", files)
    splits = {}
    for split in ("train", "val"):
        items = sorted(groups[split], key=lambda it: it.id)
        if limit is not None:
            items = items[:limit]
        if not items:
            raise ValueError(f"{name}: no {split} images found under {root / 'raw'}; the archives look "
                             "incomplete. Delete raw/ and rerun the same command.")
        _log(f"{name}: writing {split} split ({len(items)} images{', with labels' if split == 'val' else ''})")
        splits[split] = write_split(root, split, items, progress=progress)
    extra = {"limit": limit} if limit is not None else None
    return write_manifest(root, name, splits, source=source, archives=archives, extra=extra)


def _is_current(root: Path) -> bool:
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return m.get("converter_version") == convert.CONVERTER_VERSION and not m.get("limit")


def prepare(name: str, root: os.PathLike, *, source: str = "official", archives_dir: Optional[os.PathLike] = None,
            cache_dir: Optional[os.PathLike] = None, progress: bool = True, keep_raw: bool = True,
            allow_unpinned: bool = True, force: bool = False, limit: Optional[int] = None,
            registry: Optional[os.PathLike] = None) -> dict:
    """Fetch, verify, extract and convert one dataset into ``root``; returns the manifest."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} (or toyworld).")
    root = Path(root)
    if not force and limit is None and _is_current(root):
        _log(f"{name}: {root / 'manifest.json'} is up to date (converter v{convert.CONVERTER_VERSION}); "
             "nothing to do. Pass --force to redo the conversion.")
        return json.loads((root / "manifest.json").read_text())
    if source == "hf":
        from .hf import prepare_hf

        return prepare_hf(name, root, progress=progress, limit=limit)
    if source != "official":
        raise ValueError(f"--source must be 'official' or 'hf', got {source!r}")
    if cache_dir is None:
        cache_dir = root / "downloads"
    root.mkdir(parents=True, exist_ok=True)
    files, records = {}, []
    for arch in dataset_archives(name, registry):
        _log(f"{name}: archive {arch.filename} ({arch.approx or 'size unknown'})")
        path = fetch(arch, cache_dir, archives_dir=archives_dir, progress=progress, allow_unpinned=allow_unpinned)
        files[arch.name] = path
        rec = {"name": arch.name, "file": str(path), "size": path.stat().st_size}
        stamp = path.with_name(path.name + ".verified")
        if stamp.exists():
            rec["checksums"] = json.loads(stamp.read_text()).get("checksums", {})
        records.append(rec)
        sub, include = _EXTRACT.get(arch.name, ("", None))
        if sub is None:
            continue
        _log(f"{name}: extracting {arch.filename}")
        safe_extract(path, root / "raw" / sub if sub else root / "raw", include=include, progress=progress,
                     tag=f"converter-v{convert.CONVERTER_VERSION}")
    manifest = prepare_from_raw(name, root, files, progress=progress, archives=records, limit=limit)
    if not keep_raw:
        shutil.rmtree(root / "raw", ignore_errors=True)
    _log(f"{name}: done: {manifest['counts']} -> {root}")
    return manifest
