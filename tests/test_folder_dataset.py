"""Your own folder of images (``dataset: folder``): ids, nesting, extensions, sorting, class-name
files with synonyms, optional labels, every bad-folder case, training that never opens a label,
and hypothesis → train → evaluate → segment through the real CLI on an exported toy-world folder."""
from __future__ import annotations

import builtins
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reclip_core.config import load_config
from reclip_core.datasets import get_dataset
from reclip_core.datasets.class_lists import read_class_file
from reclip_core.datasets.folder import FolderImages, FolderSegmentation
from reclip_core.run_inputs import build_dataset, resolve_class_names
from reclip_core.text import display_name, synonyms, text_embeddings, tokenize

from .folder_fixtures import export_toy_folder, folder_overrides, repo_env

NAMES = ["red circle", "blue square", "green triangle"]


def _img(path: Path, size=(24, 16), colour=(200, 30, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _label(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)
    return path


def _labelled(root: Path, ids=("a", "sub/b"), size=(24, 16)) -> Path:
    for i in ids:
        _img(root / f"{i}.png", size)
        _label(root / "labels" / f"{i}.png", np.full((size[1], size[0]), 1))
    return root


@pytest.fixture(scope="module")
def toy_clip():
    from reclip_core import load_clip

    return load_clip("toy", "biased", device="cpu")


# --- ids, nesting, extensions, sorting --------------------------------------------------------------
def test_ids_are_sorted_relative_posix_paths_without_extension(tmp_path):
    _img(tmp_path / "b.png")
    _img(tmp_path / "a" / "c.jpg", fmt="JPEG")
    _img(tmp_path / "a" / "b" / "d.jpeg", fmt="JPEG")
    _img(tmp_path / "Z.webp", fmt="WEBP")
    _img(tmp_path / "e.PNG", fmt="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    _img(tmp_path / ".hidden.png")
    _img(tmp_path / ".thumbs" / "x.png")
    _label(tmp_path / "labels" / "b.png", np.zeros((16, 24)))  # the labels folder holds no training image
    ds = get_dataset("folder", "train", root=tmp_path)
    assert isinstance(ds, FolderImages) and not isinstance(ds, FolderSegmentation)
    assert ds.ids == ["Z", "a/b/d", "a/c", "b", "e"]
    item = ds[2]
    assert set(item) == {"id", "image"} and item["id"] == "a/c" and item["image"].mode == "RGB"
    assert item["image"].size == (24, 16) and ds[-1]["id"] == "e" and len(list(ds)) == 5
    with pytest.raises(IndexError):
        ds[5]


def test_two_files_with_one_id_are_refused(tmp_path):
    _img(tmp_path / "x" / "a.png")
    _img(tmp_path / "x" / "a.jpg", fmt="JPEG")
    with pytest.raises(ValueError, match="share the id 'x/a'"):
        get_dataset("folder", "train", root=tmp_path)


def test_a_link_out_of_the_folder_is_refused(tmp_path):
    outside = _img(tmp_path / "outside" / "o.png")
    root = tmp_path / "imgs"
    _img(root / "ok.png")
    os.symlink(outside, root / "link.png")
    with pytest.raises(ValueError, match="outside"):
        get_dataset("folder", "train", root=root)


def test_empty_or_missing_folder_and_missing_root(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image file"):
        get_dataset("folder", "train", root=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_dataset("folder", "train", root=tmp_path / "nope")
    with pytest.raises(ValueError, match="data_root"):
        get_dataset("folder", "train")
    with pytest.raises(ValueError, match="split"):
        get_dataset("folder", "test", root=tmp_path)


def test_unreadable_images_are_skipped_with_a_count_and_a_list(tmp_path, capsys):
    _img(tmp_path / "good.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated
    ds = get_dataset("folder", "train", root=tmp_path)
    assert ds.ids == ["good"]
    assert [rel for rel, _ in ds.skipped] == ["cut.jpg", "junk.png"]
    err = capsys.readouterr().err
    assert "skipped 2 of 3 image files" in err and "cut.jpg" in err and "junk.png" in err
    (tmp_path / "good.png").unlink()
    with pytest.raises(ValueError, match="no readable image.*cut.jpg"):
        get_dataset("folder", "train", root=tmp_path)


def test_a_subfolder_that_cannot_be_listed_gives_one_line_through_the_cli(tmp_path, monkeypatch, capsys):
    """Permissions do not stop root from listing, so the walk's error is raised by hand, as
    ``os.walk`` reports an unreadable subfolder."""
    import reclip_core.datasets.folder as folder_mod
    from reclip_core.cli import main

    _img(tmp_path / "imgs" / "a.png")
    (tmp_path / "classes.txt").write_text("red circle\nblue square\n")
    real_walk = os.walk

    def walk(top, onerror=None, **kw):
        yield from real_walk(top, onerror=onerror, **kw)
        onerror(PermissionError(13, "Permission denied", str(Path(top) / "locked")))

    monkeypatch.setattr(folder_mod.os, "walk", walk)
    code = main(["hypothesis", "--config", "folder", "--set", f"data_root={tmp_path / 'imgs'}", "--set",
                 f"class_names={tmp_path / 'classes.txt'}", "--set", f"output_dir={tmp_path / 'run'}", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert f"cannot list {tmp_path / 'imgs' / 'locked'} (Permission denied)" in err and "make it readable" in err


# --- labels -------------------------------------------------------------------------------------------
def test_labels_are_optional_and_read_only_by_the_evaluation_split(tmp_path):
    _img(tmp_path / "a.png")
    assert get_dataset("folder", "train", root=tmp_path).ids == ["a"]
    with pytest.raises(FileNotFoundError, match="no labels folder"):
        get_dataset("folder", "val", root=tmp_path)
    _labelled(tmp_path, ids=("b", "sub/c"))
    lab = np.full((16, 24), 255)
    lab[:8] = 2
    _label(tmp_path / "labels" / "b.png", lab)
    val = get_dataset("folder", "val", root=tmp_path, num_classes=3)
    assert val.ids == ["b", "sub/c"] and val.unlabelled == ["a"]  # evaluation covers the labelled images
    item = val[0]
    assert set(item) == {"id", "image", "label"} and item["label"].dtype == np.int64
    assert np.array_equal(item["label"], lab)


def test_labels_may_live_in_another_folder(tmp_path):
    root = _img(tmp_path / "imgs" / "a.png").parent
    _label(root / "masks" / "a.png", np.zeros((16, 24)))  # inside the image folder: not an image there
    assert get_dataset("folder", "train", root=root, labels=root / "masks").ids == ["a"]
    cfg = load_config("folder", [f"data_root={root}", "class_names=[cat, dog]",
                                 f"dataset_kwargs.labels={root / 'masks'}"])
    assert build_dataset(cfg, "val").ids == ["a"] and build_dataset(cfg, "val").num_classes == 2


def test_bad_labels_are_refused(tmp_path):
    root = _labelled(tmp_path / "size")
    _label(root / "labels" / "a.png", np.zeros((10, 10)))
    with pytest.raises(ValueError, match=r"a.png: size 10x10 but the image is 24x16"):
        get_dataset("folder", "val", root=root, num_classes=3)

    root = _labelled(tmp_path / "ids")
    lab = np.zeros((16, 24))
    lab[0, 0], lab[1, 1] = 7, 255
    _label(root / "labels" / "sub" / "b.png", lab)
    with pytest.raises(ValueError, match=r"sub/b.png: class ids \[7\] but there are only 3 classes"):
        get_dataset("folder", "val", root=root, num_classes=3)

    root = _labelled(tmp_path / "orphan")
    _label(root / "labels" / "ghost.png", np.zeros((16, 24)))
    with pytest.raises(ValueError, match="1 labels .* have no image.*ghost"):
        get_dataset("folder", "val", root=root, num_classes=3)

    root = _labelled(tmp_path / "rgb")
    Image.new("RGB", (24, 16)).save(root / "labels" / "a.png")
    with pytest.raises(ValueError, match="mode RGB"):
        get_dataset("folder", "val", root=root, num_classes=3)

    root = _labelled(tmp_path / "jpg")
    _img(root / "labels" / "a.jpg", fmt="JPEG")
    with pytest.raises(ValueError, match="not a PNG"):
        get_dataset("folder", "val", root=root, num_classes=3)

    root = _labelled(tmp_path / "none")
    for p in (root / "labels").rglob("*.png"):
        p.unlink()
    with pytest.raises(ValueError, match="none of the 2 images has a label"):
        get_dataset("folder", "val", root=root, num_classes=3)


def test_the_label_of_an_unreadable_image_is_not_an_orphan(tmp_path, capsys):
    root = _labelled(tmp_path)
    (root / "a.png").write_bytes(b"broken")
    val = get_dataset("folder", "val", root=root, num_classes=3)
    assert val.ids == ["sub/b"] and "a.png" in capsys.readouterr().err


# --- class names and synonyms ----------------------------------------------------------------------------
def test_class_file_format(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\nred circle\n\n  blue square ,blue box, cube \ngreen triangle\n")
    assert read_class_file(path) == ["red circle", "blue square, blue box, cube", "green triangle"]
    assert synonyms("blue square, blue box, cube") == ["blue square", "blue box", "cube"]
    assert synonyms(" plain ") == [" plain "] and display_name("blue square, blue box") == "blue square"
    path.write_text("cat, kitty\ndog, kitty\n")
    with pytest.raises(ValueError, match="line 2: 'kitty' is already a name of class 'cat'"):
        read_class_file(path)
    path.write_text("cat,, kitty\n")
    with pytest.raises(ValueError, match="line 1.*empty synonym"):
        read_class_file(path)
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no class"):
        read_class_file(path)
    with pytest.raises(FileNotFoundError, match="one class per line"):
        read_class_file(tmp_path / "missing.txt")


def test_config_reads_class_files_and_needs_them_for_a_folder(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(NAMES) + "\n")
    cfg = load_config("folder", [f"data_root={tmp_path}", f"class_names={path}"])
    assert resolve_class_names(cfg) == NAMES
    with pytest.raises(ValueError, match="needs your class names"):
        resolve_class_names(load_config("folder", [f"data_root={tmp_path}"]))
    with pytest.raises(ValueError, match="neither a dataset name"):
        resolve_class_names(load_config("folder", ["class_names=no_such_file.txt"]))
    assert resolve_class_names(load_config("voc")) == resolve_class_names(load_config("voc", ["class_names=voc"]))


def _template_means(clip, words, templates):
    tokens = tokenize(clip, [t.format(w) for w in words for t in templates])
    return F.normalize(clip.encode_text(tokens).float(), dim=-1).view(len(words), len(templates), -1).mean(1)


@torch.no_grad()
def test_synonyms_average_their_text_features_and_plain_lists_are_unchanged(toy_clip):
    templates = ["a photo of a {}.", "there is a {} in the scene."]
    plain = text_embeddings(toy_clip, NAMES, templates)
    assert torch.equal(plain, F.normalize(_template_means(toy_clip, NAMES, templates), dim=-1))  # today's formula
    mixed = text_embeddings(toy_clip, ["red circle, pink star", "blue square"], templates)
    parts = _template_means(toy_clip, ["red circle", "pink star", "blue square"], templates)
    assert torch.allclose(mixed[0], F.normalize(parts[:2].mean(0), dim=-1), atol=1e-6)
    assert torch.allclose(mixed[1], plain[1], atol=1e-6)

    from reclip_core.reference_prompt import ReferencePrompt

    a = ReferencePrompt(toy_clip, ["red circle, pink star", "blue square"])
    b = ReferencePrompt(toy_clip, ["red circle", "blue square"])
    assert torch.equal(a.name_ids, b.name_ids)  # the Reference prompt reads the first name


# --- training never opens a label ----------------------------------------------------------------------------
def test_training_never_opens_the_labels_folder(tmp_path, monkeypatch, toy_clip):
    from reclip_core.hypothesis import hypotheses_from_config
    from reclip_core.training import train

    root = export_toy_folder(tmp_path / "imgs", 8, tmp_path)
    labels = (root / "labels").resolve()
    assert len(list(labels.rglob("*.png"))) == 8
    touched = []

    def spy(fn):
        def wrapped(path, *a, **k):
            if isinstance(path, (str, os.PathLike)):
                touched.append(Path(os.path.abspath(os.fspath(path))))
            return fn(path, *a, **k)
        return wrapped

    for mod, name in ((builtins, "open"), (io, "open"), (os, "open"), (os, "scandir"), (os, "listdir"),
                      (Image, "open")):
        monkeypatch.setattr(mod, name, spy(getattr(mod, name)))
    cfg = load_config("folder", folder_overrides(root, tmp_path / "run"))
    ds = build_dataset(cfg, "train")
    assert len(ds) == 8 and set(ds[0]) == {"id", "image"}
    assert not any("labels" in str(v) for v in vars(ds).values())  # no label path held
    hypotheses_from_config(cfg, toy_clip, "train", tmp_path / "run" / "hypotheses.json", progress=False)
    res = train(cfg, clip=toy_clip, run_dir=tmp_path / "run", progress=False)
    assert res.epochs_done == 1
    assert any(p.is_relative_to(root.resolve()) for p in touched)  # the spy sees the images being read
    opened = [p for p in touched if p == labels or p.is_relative_to(labels)]
    assert opened == [], f"training opened {opened}"


# --- segment a folder -------------------------------------------------------------------------------------
def test_mask_png_holds_class_ids_in_the_palette_of_the_overlays(tmp_path):
    from reclip_core.plots import palette
    from reclip_core.segment_folder import class_colours, mask_image, overlay_image

    mask = np.array([[0, 1, 2], [2, 1, 0]])
    mask_image(mask, class_colours(3)).save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "P" and np.array_equal(np.array(im), mask)
        assert np.array_equal(np.array(im.getpalette()[:9]).reshape(3, 3), class_colours(3))
    assert np.array_equal(class_colours(12), palette(12)[:12])  # one palette for <= 20 classes
    over = overlay_image(Image.new("RGB", (3, 2)), mask, NAMES, class_colours(3))
    assert over.width > 3 and over.height >= 2


def test_segment_folder_is_resumable_and_refuses_other_settings(tmp_path, toy_clip, capsys):
    from reclip_core.segment_folder import segment_folder

    src = tmp_path / "imgs"
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30)]):
        _img(src / ("nested" if i else "") / f"im{i}.png", (40, 32), colour)
    (src / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    out = src / "out"  # inside the image folder: never segmented itself
    kw = dict(clip=toy_clip, test_size=64, templates=["a photo of a {}."], device="cpu", progress=False)
    res = segment_folder(src, out, NAMES, **kw)
    assert sorted(res.written) == ["im0", "nested/im1", "nested/im2"] and res.unreadable[0][0] == "broken.jpg"
    with Image.open(out / "masks" / "nested" / "im1.png") as m:
        assert m.size == (40, 32) and np.array(m).max() < 3
    assert (out / "overlays" / "im0.png").is_file() and (out / "legend.png").is_file()
    assert json.loads((out / "segment.json").read_text())["class_names"] == NAMES
    (out / "overlays" / "nested" / "im2.png").unlink()
    again = segment_folder(src, out, NAMES, **kw)
    assert again.written == ["nested/im2"] and sorted(again.existing) == ["im0", "nested/im1"]
    with pytest.raises(ValueError, match="other settings"):
        segment_folder(src, out, NAMES[:2], **kw)


@pytest.mark.timeout(600)
def test_cli_chain_on_an_exported_folder(tmp_path):
    root = export_toy_folder(tmp_path / "imgs", 12, tmp_path)
    run = tmp_path / "run"
    sets = [a for kv in folder_overrides(root, run) for a in ("--set", kv)]

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "reclip_core", *args], cwd=tmp_path, env=repo_env(),
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    assert "hypotheses: 12 images of split 'train'" in cli("hypothesis", "--config", "folder", *sets, "--quiet")
    assert "trained 1 epochs" in cli("train", "--config", "folder", *sets, "--quiet")
    out = cli("evaluate", "--config", "folder", *sets, "--quiet")
    assert "reclip++" in out and "(12 images" in out
    results = json.loads((run / "eval" / "metrics.json").read_text())["results"]
    assert set(results) == {"maskclip", "rectified", "reclip++"}
    seg = tmp_path / "seg"
    out = cli("segment", "--config", "folder", *sets, "--checkpoint", str(run), "--images", str(root),
              "--out", str(seg), "--quiet")
    assert "reclip++: 12 images segmented, 0 already done" in out
    masks = sorted(p.relative_to(seg / "masks").as_posix() for p in (seg / "masks").rglob("*.png"))
    assert len(masks) == 12 and masks[0].startswith("group0/")
    assert len(list((seg / "overlays").rglob("*.png"))) == 12
    n = len(read_class_file(root / "classes.txt"))
    with Image.open(seg / "masks" / masks[0]) as m, Image.open(root / masks[0]) as im:
        assert m.size == im.size and np.array(m).max() < n
