"""Benchmark readers on converted layouts built in temp folders; get_dataset; paper configs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reclip_core.datasets import DATASET_NAMES, get_dataset
from reclip_core.datasets.benchmarks import (BENCHMARKS, BenchmarkImages, BenchmarkSegmentation,
                                             reduce_zero_label)

from .benchmark_fixtures import H, W, layout

CLASS_DIR = Path(__file__).resolve().parents[1] / "reclip_core" / "class_names"


def test_class_lists_counts_unique():
    for name, (n, _) in BENCHMARKS.items():
        names = [ln.strip() for ln in (CLASS_DIR / f"{name}.txt").read_text().splitlines() if ln.strip()]
        assert len(names) == n, name
        assert len(set(names)) == n, f"{name} has duplicate names"
    voc = (CLASS_DIR / "voc.txt").read_text().split("\n")
    assert voc[0] == "aeroplane" and voc[10] == "dining table" and voc[15] == "potted plant" and voc[19] == "tv monitor"
    ctx = (CLASS_DIR / "context.txt").read_text().split("\n")
    assert ctx[0] == "aeroplane" and ctx[49] == "table" and ctx[58] == "wood"
    cs = (CLASS_DIR / "cityscapes.txt").read_text().split("\n")
    assert cs[0] == "road" and cs[13] == "car" and cs[18] == "bicycle"
    ade = (CLASS_DIR / "ade.txt").read_text().split("\n")
    assert ade[0] == "wall" and ade[7] == "bed" and ade[149] == "flag"
    coco = (CLASS_DIR / "coco_stuff27.txt").read_text().split("\n")
    assert coco[:3] == ["electronic", "appliance", "food"] and coco[14] == "food-stuff" and coco[26] == "water"


def test_train_split_holds_no_labels(tmp_path):
    root = layout(tmp_path / "voc", ["b", "a", "c"], ["v1"])
    ds = get_dataset("voc", "train", root=root)
    assert isinstance(ds, BenchmarkImages) and not isinstance(ds, BenchmarkSegmentation)
    assert ds.ids == ["a", "b", "c"]
    for item in ds:
        assert set(item) == {"id", "image"}
    held = json.dumps({k: str(v) for k, v in vars(ds).items()})
    assert "labels" not in held and not hasattr(ds, "label_path") and not hasattr(ds, "_labels")
    with pytest.raises(ValueError, match="only read for the 'val' split"):
        BenchmarkSegmentation("voc", "train", root)


@pytest.mark.parametrize("name,reduced", [("voc", True), ("context", True), ("ade", True),
                                          ("cityscapes", False), ("coco_stuff27", False)])
def test_val_labels_int64_and_reduce_zero_label(tmp_path, name, reduced):
    root = layout(tmp_path / name, ["t"], ["v2", "v1"], label_value=5)
    ds = get_dataset(name, "val", root=root)
    assert ds.ids == ["v1", "v2"] and len(ds) == 2
    item = ds[0]
    assert set(item) == {"id", "image", "label"} and item["id"] == "v1"
    y = item["label"]
    assert y.dtype == np.int64 and y.shape == (H, W)
    if reduced:
        assert y[0, :4].tolist() == [255, 0, 19, 255] and y[1, 0] == 4
    else:
        assert y[0, :4].tolist() == [0, 1, 20, 255] and y[1, 0] == 5
    assert ds.num_classes == BENCHMARKS[name][0] == len(ds.class_names)
    assert ds.ignore_index == 255


def test_reduce_zero_label_function():
    assert reduce_zero_label(np.array([0, 1, 2, 254, 255], np.uint8)).tolist() == [255, 0, 1, 253, 255]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB"])
def test_images_are_rgb(tmp_path, mode):
    root = layout(tmp_path / "ade", ["t"], ["v"], image_mode=mode, suffix=".png")
    for split in ("train", "val"):
        img = get_dataset("ade", split, root=root)[0]["image"]
        assert img.mode == "RGB" and img.size == (W, H)
    if mode == "P":
        assert get_dataset("ade", "train", root=root)[0]["image"].getpixel((0, 0)) == (200, 100, 50)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_missing_root_names_the_data_prep_command(tmp_path, name):
    root = tmp_path / "nowhere" / name
    with pytest.raises(FileNotFoundError) as ei:
        get_dataset(name, "val", root=root)
    assert f"python -m data_prep {name} --root {root}" in str(ei.value)
    if name == "cityscapes":
        assert "--archives" in str(ei.value)


def test_default_root_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLIP_DATA", str(tmp_path))
    layout(tmp_path / "cityscapes", ["t"], ["v"])
    assert len(get_dataset("cityscapes", "train")) == 1
    monkeypatch.delenv("RECLIP_DATA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m data_prep voc --root data/voc"):
        get_dataset("voc", "train")


def test_missing_val_label_and_manifest_mismatch(tmp_path):
    root = layout(tmp_path / "coco", ["t1", "t2"], ["v1", "v2"])
    (root / "labels" / "val" / "v2.png").unlink()
    with pytest.raises(FileNotFoundError, match="v2.png"):
        get_dataset("coco_stuff27", "val", root=root)
    (root / "images" / "train" / "t2.jpg").unlink()
    with pytest.raises(ValueError, match="manifest records 2"):
        get_dataset("coco_stuff27", "train", root=root)


def test_get_dataset_unknown_name_and_options(tmp_path):
    with pytest.raises(ValueError) as ei:
        get_dataset("pascal", "val")
    for n in DATASET_NAMES:
        assert n in str(ei.value)
    root = layout(tmp_path / "voc", ["t"], ["v"])
    with pytest.raises(ValueError, match="unexpected options"):
        get_dataset("voc", "val", root=root, preset="biased")
    with pytest.raises(ValueError, match="split"):
        get_dataset("voc", "test", root=root)
    ds = get_dataset("voc", "val", root=root)
    with pytest.raises(IndexError):
        ds[5]
    assert ds[-1]["id"] == "v"
    assert ds.by_id("v")["id"] == "v" and ds.index("v") == 0
    with pytest.raises(KeyError, match="nope"):
        ds.by_id("nope")


def test_get_dataset_toyworld_dispatch(monkeypatch):
    import reclip_core.datasets.toyworld as tw

    calls = {}

    class Fake:
        def __init__(self, split, preset="biased", root=None, **kw):
            calls.update(split=split, preset=preset, root=root, **kw)

    monkeypatch.setattr(tw, "ToyWorld", Fake)
    ds = get_dataset("toyworld", "val", root="/tmp/tw", preset="fair")
    assert isinstance(ds, Fake) and calls == {"split": "val", "preset": "fair", "root": "/tmp/tw"}
