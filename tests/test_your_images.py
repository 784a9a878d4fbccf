"""Notebook 06's library: the toy-folder export, the session's settings, and what the executed
notebook wrote (checked here rather than by nbval: its trained numbers move with the CPU)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reclip_core import your_images
from reclip_core.atomic_io import StaleFileError
from reclip_core.datasets import toyworld_export
from reclip_core.datasets.class_lists import read_class_file
from reclip_core.datasets.folder import folder_dataset
from reclip_core.datasets.toyworld import load_preset
from reclip_core.datasets.toyworld_export import MANIFEST, export_toy_folder

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "toy" / "your_images"


def _small_preset(n_val: int) -> dict:
    preset = load_preset("biased")
    preset["name"] = "exportworld"
    for split, size in (("pretrain", 1), ("train", 2), ("val", n_val)):
        preset["splits"][split]["size"] = size
    return preset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return {"preset": _small_preset(6), "root": tmp_path_factory.mktemp("world")}


def test_export_writes_the_folder_layout_and_reuses_an_equal_export(tmp_path, world):
    out = export_toy_folder(tmp_path / "photos", 5, world["preset"], root=world["root"], groups=2)
    ids = [d["id"] for d in folder_dataset("train", out)]
    assert ids == sorted(ids) and [i.split("/")[0] for i in ids] == ["group0"] * 3 + ["group1"] * 2
    val = folder_dataset("val", out, num_classes=len(read_class_file(out / "classes.txt")))
    assert len(val) == 5 and set(np.unique(val[0]["label"])) <= set(range(10)) | {255}
    record = json.loads((out / MANIFEST).read_text())
    assert record["n"] == 5 and record["preset"] == "exportworld" and record["labels"] is True
    stamp = (out / MANIFEST).stat().st_mtime_ns
    assert export_toy_folder(out, 5, world["preset"], root=world["root"], groups=2) == out
    assert (out / MANIFEST).stat().st_mtime_ns == stamp  # reused, not rewritten


def test_export_refuses_other_settings_and_folders_of_other_files(tmp_path, world):
    out = export_toy_folder(tmp_path / "photos", 3, world["preset"], root=world["root"])
    with pytest.raises(StaleFileError, match="n: 3 -> 4"):
        export_toy_folder(out, 4, world["preset"], root=world["root"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"not an export")
    with pytest.raises(ValueError, match="not a toy-world export"):
        export_toy_folder(mine, 3, world["preset"], root=world["root"])
    assert (mine / "holiday.jpg").read_bytes() == b"not an export"
    with pytest.raises(ValueError, match="fewer than 7"):
        export_toy_folder(tmp_path / "big", 7, world["preset"], root=world["root"])


def test_an_interrupted_export_leaves_no_folder(tmp_path, world, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(toyworld_export, "atomic_write_json", fail)
    with pytest.raises(KeyboardInterrupt):
        export_toy_folder(tmp_path / "photos", 3, world["preset"], root=world["root"])
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its partial sibling


def test_setup_checks_its_inputs_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown profile"):
        your_images.setup("toys")
    with pytest.raises(ValueError, match="is not a folder"):
        your_images.setup("toy", data_root=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no class file"):
        your_images.setup("toy", data_root=str(tmp_path))


def test_setup_builds_the_folder_config_from_the_parameters(tmp_path, monkeypatch):
    monkeypatch.setattr(your_images, "RESULTS_DIR", tmp_path / "results")
    (tmp_path / "classes.txt").write_text("cat\ndog, puppy\n")
    lab = your_images.setup("toy", data_root=str(tmp_path), size=96, window=24, epochs=3, lr=0.02)
    cfg = lab.cfg
    assert (cfg["test_size"], cfg["crop"], cfg["hypothesis_window"], cfg["hypothesis_stride"]) == (96, 96, 24, 12)
    assert (cfg["epoch"], cfg["lr"], cfg["batch_size"], cfg["feature_cache"]) == (3, 0.02, 16, True)
    assert cfg["clip"]["arch"] == "toy" and lab.class_names == ["cat", "dog, puppy"]
    assert lab.run_dir == tmp_path / "results" / "toy" / "your_images" / "runs" and not lab.has_labels
    paper = your_images.setup("paper", data_root=str(tmp_path), size=96).cfg  # the CLIP loads at first use
    assert (paper["hypothesis_window"], paper["epoch"], paper["clip"]["arch"]) == (16, 10, "ViT-B-16-quickgelu")


def _executed() -> Path:
    results = os.environ.get("RECLIP_RESULTS")
    folder = Path(results) / "toy" / "your_images" if results else None
    if folder is None or not (folder / "06_miou.csv").is_file():
        if os.environ.get("RECLIP_REQUIRE_RESULTS"):
            pytest.fail(f"notebook 06 wrote no tables under RECLIP_RESULTS={results!r}: did the notebooks run?")
        pytest.skip("runs after the notebooks: `make test` (pytest tests notebooks --nbval-lax ...)")
    return folder


@pytest.mark.after_notebooks
def test_notebook_06_ran_the_whole_chain_on_the_exported_folder():
    folder = _executed()
    table = pd.read_csv(folder / "06_miou.csv").set_index("head")
    assert list(table.index) == list(your_images.HEAD_NAMES.values())
    assert ((table >= 0) & (table <= 100)).all().all()
    # MaskCLIP is training-free: the same number as committed, up to the printed precision
    committed = pd.read_csv(COMMITTED / "06_miou.csv").set_index("head")
    assert abs(table.loc["MaskCLIP", "mIoU"] - committed.loc["MaskCLIP", "mIoU"]) <= 0.05
    loss = pd.read_csv(folder / "runs" / "loss.csv")
    by_epoch = loss.groupby("epoch")["loss"].mean()
    assert by_epoch.index.max() == your_images.PROFILE_SETTINGS["toy"]["epochs"]
    assert by_epoch.iloc[-1] < by_epoch.iloc[0]  # the loss went down
    n = your_images.PROFILE_SETTINGS["toy"]["n_images"]
    for kind in ("maskclip", "reclip++"):
        masks = sorted((folder / "runs" / f"segment_{kind}" / "masks").rglob("*.png"))
        assert len(masks) == n and len(list((folder / "runs" / f"segment_{kind}" / "overlays").rglob("*.png"))) == n
        with Image.open(masks[0]) as m:
            assert m.size == (64, 64) and np.array(m).max() < 10
    for figure in ("06_loss.png", "06_overlays.png", "06_bias_map.png"):
        assert (folder / figure).stat().st_size > 1000


def _hub_cache(cache: Path, repo_id: str, filename: str) -> Path:
    """A file in the Hugging Face hub cache layout (``models--org--name/snapshots/<rev>/``), as
    open_clip's download leaves it."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    path = folder / "snapshots" / ("0" * 40) / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    return path


def test_auto_clip_is_the_paper_clip_only_when_its_weights_are_cached(tmp_path, monkeypatch):
    from open_clip import pretrained as oc_pretrained

    from reclip_core import clip_choice
    from reclip_core.config import load_config

    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path))
    cfg = load_config("folder", ["data_root=x", "class_names=[a, b]"])
    assert (cfg["clip"]["arch"], cfg["clip"]["pretrained"]) == ("toy", "biased")
    repo_id = os.path.split(oc_pretrained.get_pretrained_cfg("ViT-B-16-quickgelu", "openai")["hf_hub"])[0]
    path = _hub_cache(tmp_path / "clip", repo_id, "open_clip_model.safetensors")
    assert clip_choice.cached_weights("ViT-B-16-quickgelu", "openai") == path
    cfg = load_config("folder", ["data_root=x", "class_names=[a, b]"])
    assert (cfg["clip"]["arch"], cfg["clip"]["pretrained"]) == ("ViT-B-16-quickgelu", "openai")
    assert load_config("folder", ["clip.arch=toy", "data_root=x", "class_names=[a]"])["clip"]["arch"] == "toy"
