"""Ids read from files (split lists, annotation JSON, registries, hub rows, presets) are checked
by ``safe_relative_id`` before they become paths: no list can make a run write outside its root."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from reclip_core.datasets import safe_relative_id

REPO = Path(__file__).resolve().parents[1]
VOC_TAR = "VOCtrainval_11-May-2012.tar"


# --------------------------------------------------------------------------------------------
# the helper
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["2007_000032", "frankfurt/frankfurt_000000_000294", "ADE_val_00000001",
                                  "000000000139", "a.b-c_d", "name with space"])
def test_ordinary_ids_are_accepted(text):
    assert safe_relative_id(text, "the list L line 1") == text


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("   ", "empty"),
    ("/etc/passwd", "absolute path"),
    ("..", "'..' component"),
    ("../../../../x/y", "'..' component"),
    ("a/../../x", "'..' component"),
    ("a/..", "'..' component"),
    ("a\\..\\..\\x", "backslash"),
    ("\\\\server\\share", "backslash"),
    ("C:x", "drive letter"),
    ("c:/windows/x", "drive letter"),
    ("a\x00b", "NUL character"),
    ("a\nb", "control character"),
    ("a\x1bb", "control character"),
    ("a\x7f", "control character"),
    ("a//b", "empty or '.' component"),
    ("./a", "empty or '.' component"),
    ("a/", "empty or '.' component"),
    (5, "not a text"),
    (None, "not a text"),
])
def test_unsafe_ids_are_refused_with_file_line_and_next_step(text, reason):
    with pytest.raises(ValueError) as err:
        safe_relative_id(text, "the split list /d/train.txt line 3", fix="Re-download the archive.")
    msg = str(err.value)
    assert reason in msg and "the split list /d/train.txt line 3 holds" in msg and repr(text) in msg
    assert "ids must be relative names inside the dataset" in msg and msg.endswith("Re-download the archive.")


def test_flat_ids_refuse_any_slash():
    assert safe_relative_id("VOCtrainval_11-May-2012.tar", "registry", flat=True) == "VOCtrainval_11-May-2012.tar"
    with pytest.raises(ValueError, match="single file name"):
        safe_relative_id("sub/x.tar", "registry", flat=True)


def test_ids_resolving_outside_the_root_through_a_link_are_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "inner").mkdir(parents=True)
    outside.mkdir()
    (root / "out").symlink_to(outside, target_is_directory=True)
    (root / "alias").symlink_to(root / "inner", target_is_directory=True)
    (root / "inner" / "trap.jpg").symlink_to(outside / "victim.jpg")
    assert safe_relative_id("alias/x", "list", root=root, suffix=".jpg") == "alias/x"  # a link inside is fine
    assert safe_relative_id("x", "list", root=root / "out") == "x"  # the root itself may be a link
    for text, suffix in (("out/x", ""), ("out", ""), ("inner/trap", ".jpg")):
        with pytest.raises(ValueError, match="outside"):
            safe_relative_id(text, "list", root=root, suffix=suffix)


# --------------------------------------------------------------------------------------------
# through the real CLI: a VOC archive whose member names are clean but whose split list is not
# --------------------------------------------------------------------------------------------
def _jpg(color):
    buf = io.BytesIO()
    Image.new("RGB", (12, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def _palette_png():
    img = Image.new("P", (12, 8))
    img.putdata([0] * 96)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _voc_archive(folder: Path, train_list: bytes, color=(200, 30, 30)) -> Path:
    """A tiny VOCtrainval tar with ``train_list`` as its train split list, in ``folder``."""
    pre = "VOCdevkit/VOC2012/"
    members = {pre + "ImageSets/Segmentation/train.txt": train_list,
               pre + "ImageSets/Segmentation/val.txt": b"2007_000003\n"}
    for i in ("2007_000001", "2007_000002", "2007_000003"):
        members[pre + f"JPEGImages/{i}.jpg"] = _jpg(color)
        members[pre + f"SegmentationClass/{i}.png"] = _palette_png()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / VOC_TAR
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _registry(path: Path, archive: Path) -> Path:
    data = archive.read_bytes()
    path.write_text(yaml.safe_dump({"archives": {VOC_TAR: {
        "filename": VOC_TAR, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        "urls": [], "login": True, "login_url": "https://example.invalid/login"}}, "datasets": {"voc": [VOC_TAR]}}))
    return path


def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "data_prep", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _outside(folder: Path, root: Path) -> dict:
    """Files under ``folder`` but not under ``root``, but for the stamps fetch leaves next to --archives."""
    return {k: v for k, v in _tree(folder).items()
            if not k.startswith(root.name + "/") and not k.endswith(".verified")}


def test_cli_refuses_a_split_list_with_dotdot_and_touches_nothing_outside_root(tmp_path):
    root = tmp_path / "voc"
    # the bad line points from images/train/ at this file, outside --root (and the
    # extracted JPEGImages/2007_000001.jpg, inside it, is what would replace it)
    sentinel = tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000001.jpg"
    sentinel.parent.mkdir(parents=True)
    sentinel.write_bytes(b"sentinel: must survive")
    good = _voc_archive(tmp_path / "good", b"2007_000001\n2007_000002\n")
    proc = _cli("voc", "--root", root, "--registry", _registry(tmp_path / "good.yaml", good),
                "--archives", good.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = _tree(root / "images") | _tree(root / "labels")
    manifest = (root / "manifest.json").read_bytes()

    bad_line = "../../../VOCdevkit/VOC2012/JPEGImages/2007_000001"
    bad = _voc_archive(tmp_path / "bad", f"2007_000001\n\n{bad_line}\n".encode(), color=(10, 10, 10))
    reg = _registry(tmp_path / "bad.yaml", bad)
    outside = _outside(tmp_path, root)
    proc = _cli("voc", "--root", root, "--registry", reg, "--archives", bad.parent, "--force")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = proc.stderr
    assert "train.txt line 3 holds" in err and repr(bad_line) in err and "'..' component" in err
    assert f"python -m data_prep voc --root {root} --force" in err
    assert sentinel.read_bytes() == b"sentinel: must survive"
    assert _outside(tmp_path, root) == outside
    assert (root / "manifest.json").read_bytes() == manifest  # the earlier preparation is kept
    assert _tree(root / "images") | _tree(root / "labels") == before


def test_registry_filename_with_a_path_exits_1_through_the_cli(tmp_path):
    reg = tmp_path / "reg.yaml"
    reg.write_text(yaml.safe_dump({"archives": {VOC_TAR: {"filename": "../../escape.tar", "urls": []}},
                                   "datasets": {"voc": [VOC_TAR]}}))
    proc = _cli("voc", "--root", tmp_path / "voc", "--registry", reg)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"the archive registry {reg}, archive {VOC_TAR!r}, key 'filename', holds '../../escape.tar'" in proc.stderr
    assert [p.name for p in tmp_path.rglob("*") if not p.is_dir()] == ["reg.yaml"]


# --------------------------------------------------------------------------------------------
# the other places where an id read from a file becomes a path
# --------------------------------------------------------------------------------------------
def test_context_json_file_name_with_dotdot_is_refused(tmp_path):
    from data_prep.prepare import gather_context

    raw = tmp_path / "ctx" / "raw"
    (raw / "VOCdevkit" / "VOC2010" / "JPEGImages").mkdir(parents=True)
    js = tmp_path / "trainval_merged.json"
    js.write_text(json.dumps({"images": [
        {"image_id": 1, "file_name": "2008_000001.jpg", "height": 8, "width": 12, "phase": "train"},
        {"image_id": 2, "file_name": "../../../../../secret.jpg", "height": 8, "width": 12, "phase": "val"}]}))
    with pytest.raises(ValueError, match=r"trainval_merged.json entry images\[1\] \(image_id 2\), key 'file_name', "
                                         r"holds '../../../../../secret.jpg'"):
        gather_context(raw, {"trainval_merged.json": js})


def test_write_split_checks_every_id_before_writing(tmp_path):
    from data_prep.prepare import Item, write_split

    src = tmp_path / "a.jpg"
    src.write_bytes(_jpg((1, 2, 3)))
    root = tmp_path / "root"
    label = lambda: np.zeros((8, 12), np.uint8)  # noqa: E731
    items = [Item("a", src, label), Item("../../b", src, label)]
    with pytest.raises(ValueError, match="the val split's item list .* holds '../../b'"):
        write_split(root, "val", items, progress=False)
    assert not root.exists() and not (tmp_path / "b.jpg").exists()


@pytest.mark.parametrize("path, expect", [("/data/ADE_val_00000001.jpg", "ADE_val_00000001"),
                                          ("x\\..\\..\\evil.jpg", None), ("a/..", None), ("bad\x00.jpg", None)])
def test_hub_row_ids_are_checked(tmp_path, path, expect):
    from data_prep.hf import _row_id

    if expect is not None:
        assert _row_id({"path": path}, 0, "val", tmp_path) == expect
    else:
        with pytest.raises(ValueError, match="the Hugging Face val row 0"):
            _row_id({"path": path}, 0, "val", tmp_path)


def test_toy_world_preset_name_must_be_a_plain_folder_name(tmp_path):
    from reclip_core.datasets.toyworld import load_preset, world_dir

    preset = load_preset("biased")
    assert world_dir(preset, tmp_path).parent == tmp_path
    yml = tmp_path / "evil.yaml"
    yml.write_text(yaml.safe_dump(dict(preset, name="../../escape")))
    with pytest.raises(ValueError, match=f"the toy-world preset {yml}, key 'name', holds '../../escape'"):
        load_preset(yml)
    with pytest.raises(ValueError, match="key 'name', holds '/tmp/x'"):
        world_dir(dict(preset, name="/tmp/x"), tmp_path)


def test_benchmark_reader_refuses_image_names_that_are_not_plain_ids(tmp_path):
    from reclip_core.datasets.benchmarks import BenchmarkImages

    (tmp_path / "images" / "train").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "train" / "ok.png")
    assert BenchmarkImages("voc", "train", tmp_path).ids == ["ok"]
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "train" / "a\\..\\b.png")
    with pytest.raises(ValueError, match=r"voc: the image file .* holds 'a\\\\..\\\\b', which holds a backslash"):
        BenchmarkImages("voc", "train", tmp_path)
