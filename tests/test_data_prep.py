"""data_prep: downloads over real HTTP on 127.0.0.1, safe extraction, label conversions,
and every dataset command end to end on tiny fixtures in the official on-disk formats."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import convert
from data_prep.download import Archive, ChecksumError, DownloadError, fetch, verify_file
from data_prep.extract import UnsafeArchiveError, safe_extract

from .data_prep_fixtures import registry, run_cli, tar_bytes, write_tar, write_zip, zip_bytes

# the loopback HTTP ``server`` fixture (Range support, "drop the connection mid-way") is in conftest.py


def _archive(name, data, urls, **kw):
    sums = {"md5": hashlib.md5(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest()}
    sums.update(kw.pop("checksums", {}))
    return Archive(name=name, filename=name, urls=tuple(urls), size=kw.pop("size", len(data)), checksums=sums, **kw)


PAYLOAD = os.urandom(300_000)


def test_download_success_and_no_redownload(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    arch = _archive("a.bin", PAYLOAD, [server.url("/a.bin")])
    path = fetch(arch, tmp_path, progress=False, retry_wait=0)
    assert path == tmp_path / "a.bin" and path.read_bytes() == PAYLOAD
    assert not (tmp_path / "a.bin.part").exists()
    assert (tmp_path / "a.bin.verified").exists()
    n = len(server.log)
    assert fetch(arch, tmp_path, progress=False) == path
    assert len(server.log) == n, "a verified file must not be downloaded again"


def test_checksum_mismatch_moves_file_aside(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    wrong = hashlib.md5(b"something else").hexdigest()
    arch = Archive(name="a.bin", filename="a.bin", urls=(server.url("/a.bin"),), size=len(PAYLOAD),
                   checksums={"md5": wrong})
    with pytest.raises(ChecksumError) as ei:
        fetch(arch, tmp_path, progress=False, retry_wait=0)
    msg = str(ei.value)
    assert "a.bin.bad" in msg and wrong in msg and "run the same command again" in msg
    assert (tmp_path / "a.bin.bad").read_bytes() == PAYLOAD
    assert not (tmp_path / "a.bin").exists()


def test_cached_file_corrupted_later_is_refused(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    arch = _archive("a.bin", PAYLOAD, [server.url("/a.bin")])
    path = fetch(arch, tmp_path, progress=False)
    path.write_bytes(PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(ChecksumError):
        fetch(arch, tmp_path, progress=False)
    assert (tmp_path / "a.bin.bad").exists()


def test_interrupted_download_resumes_with_range(server, tmp_path):
    server.files["/big.bin"] = PAYLOAD
    server.drop_once.add("/big.bin")
    arch = _archive("big.bin", PAYLOAD, [server.url("/big.bin")])
    path = fetch(arch, tmp_path, progress=False, retries=2, retry_wait=0)
    assert path.read_bytes() == PAYLOAD
    ranges = [r for p, r in server.log if p == "/big.bin"]
    assert ranges[0] is None and len(ranges) == 2
    assert ranges[1] == f"bytes={len(PAYLOAD) // 2}-", ranges


def test_interrupted_download_resumes_on_next_run(server, tmp_path):
    server.files["/big.bin"] = PAYLOAD
    server.drop_once.add("/big.bin")
    arch = _archive("big.bin", PAYLOAD, [server.url("/big.bin")])
    with pytest.raises(DownloadError) as ei:
        fetch(arch, tmp_path, progress=False, retries=0, retry_wait=0)
    part = tmp_path / "big.bin.part"
    assert ".part" in str(ei.value) and "resume" in str(ei.value)
    assert part.stat().st_size == len(PAYLOAD) // 2
    path = fetch(arch, tmp_path, progress=False, retries=0)
    assert path.read_bytes() == PAYLOAD and not part.exists()
    assert server.log[-1] == ("/big.bin", f"bytes={len(PAYLOAD) // 2}-")


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.files["/big.bin"] = PAYLOAD
    server.honour_range = False
    (tmp_path / "big.bin.part").write_bytes(b"garbage-prefix")
    arch = _archive("big.bin", PAYLOAD, [server.url("/big.bin")])
    assert fetch(arch, tmp_path, progress=False).read_bytes() == PAYLOAD


def test_mirror_fallback_after_404(server, tmp_path):
    server.files["/mirror/a.bin"] = PAYLOAD
    arch = _archive("a.bin", PAYLOAD, [server.url("/gone/a.bin"), server.url("/mirror/a.bin")])
    assert fetch(arch, tmp_path, progress=False).read_bytes() == PAYLOAD
    assert [p for p, _ in server.log] == ["/gone/a.bin", "/mirror/a.bin"]


def test_login_archive_needs_archives_dir(tmp_path):
    arch = Archive(name="gtFine_trainvaltest.zip", filename="gtFine_trainvaltest.zip", login=True,
                   login_url="https://www.cityscapes-dataset.com/file-handling/?packageID=1",
                   checksums={"md5": hashlib.md5(PAYLOAD).hexdigest()})
    with pytest.raises(FileNotFoundError) as ei:
        fetch(arch, tmp_path / "cache", progress=False)
    assert "--archives" in str(ei.value) and "packageID=1" in str(ei.value)
    given = tmp_path / "mine"
    given.mkdir()
    (given / "gtFine_trainvaltest.zip").write_bytes(PAYLOAD)
    assert fetch(arch, tmp_path / "cache", archives_dir=given, progress=False) == given / "gtFine_trainvaltest.zip"
    assert not (tmp_path / "cache" / "gtFine_trainvaltest.zip").exists(), "verified in place, not copied"


def test_unpinned_archive_is_pinned_on_first_use(tmp_path):
    f = tmp_path / "x.json"
    f.write_bytes(b'{"a": 1}')
    arch = Archive(name="x.json", filename="x.json")
    with pytest.warns(UserWarning, match="trust on first use"):
        verify_file(arch, f, progress=False)
    assert (tmp_path / "x.json.sha256").read_text().split()[0] == hashlib.sha256(b'{"a": 1}').hexdigest()
    f.write_bytes(b'{"a": 2}')
    with pytest.raises(ChecksumError):
        verify_file(arch, f, progress=False)
    g = tmp_path / "y.json"
    g.write_bytes(b"{}")
    with pytest.raises(ChecksumError, match="--require-checksum"):
        verify_file(Archive(name="y.json", filename="y.json"), g, progress=False, allow_unpinned=False)


def test_wrong_size_is_refused_before_hashing(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(PAYLOAD[:1000])
    arch = _archive("a.bin", PAYLOAD, [])
    with pytest.raises(ChecksumError, match="size"):
        verify_file(arch, f, progress=False)
    assert (tmp_path / "a.bin.bad").exists()


# --------------------------------------------------------------------------------------------
# safe extraction
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_extract_refuses_dotdot(tmp_path, kind):
    make = write_tar if kind == "tar" else write_zip
    arc = make(tmp_path / f"evil.{kind}", [("ok.txt", b"fine"), ("sub/../../evil.txt", b"pwned")])
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match=r"sub/\.\./\.\./evil\.txt"):
        safe_extract(arc, dest, progress=False)
    assert not (tmp_path / "evil.txt").exists()
    assert not (dest / "ok.txt").exists(), "nothing may be written from a refused archive"


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_extract_refuses_absolute_member(tmp_path, kind):
    target = tmp_path / "abs_target.txt"
    make = write_tar if kind == "tar" else write_zip
    arc = make(tmp_path / f"abs.{kind}", [(str(target), b"pwned")])
    with pytest.raises(UnsafeArchiveError, match="absolute"):
        safe_extract(arc, tmp_path / "out", progress=False)
    assert not target.exists()


def test_extract_refuses_escaping_symlink_and_hardlink(tmp_path):
    arc = write_tar(tmp_path / "link.tar", [("data/a.txt", b"x"), ("data/link", ("symlink", "../../outside"))])
    with pytest.raises(UnsafeArchiveError, match="data/link"):
        safe_extract(arc, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "data").exists()
    arc2 = write_tar(tmp_path / "hard.tar", [("h", ("hardlink", "../secret"))])
    with pytest.raises(UnsafeArchiveError, match="hard"):
        safe_extract(arc2, tmp_path / "out2", progress=False)
    arc3 = write_tar(tmp_path / "abslink.tar", [("l", ("symlink", "/etc/passwd"))])
    with pytest.raises(UnsafeArchiveError, match="symbolic"):
        safe_extract(arc3, tmp_path / "out3", progress=False)
    arc4 = write_zip(tmp_path / "link.zip", [("l", ("symlink", "../../etc/passwd"))])
    with pytest.raises(UnsafeArchiveError, match="outside"):
        safe_extract(arc4, tmp_path / "out4", progress=False)


def test_extract_good_archives_with_filter_and_inner_symlink(tmp_path):
    arc = write_tar(tmp_path / "good.tar", [("d/a.txt", b"A"), ("d/b.txt", b"B"), ("d/l", ("symlink", "a.txt"))])
    out = safe_extract(arc, tmp_path / "o", include=lambda r: not r.endswith("b.txt"), progress=False)
    assert (out / "d" / "a.txt").read_bytes() == b"A" and not (out / "d" / "b.txt").exists()
    assert (out / "d" / "l").is_symlink() and (out / "d" / "l").read_bytes() == b"A"
    z = write_zip(tmp_path / "good.zip", [("z/x.txt", b"X")])
    assert (safe_extract(z, tmp_path / "oz", progress=False) / "z" / "x.txt").read_bytes() == b"X"
    (tmp_path / "oz" / "z" / "x.txt").unlink()
    safe_extract(z, tmp_path / "oz", progress=False)  # stamp: already extracted, skipped
    assert not (tmp_path / "oz" / "z" / "x.txt").exists()
    safe_extract(z, tmp_path / "oz", progress=False, force=True)
    assert (tmp_path / "oz" / "z" / "x.txt").exists()


# --------------------------------------------------------------------------------------------
# label conversions on known pixels
# --------------------------------------------------------------------------------------------
def _palette_png(arr):
    img = Image.new("P", (arr.shape[1], arr.shape[0]))
    img.putdata(list(np.asarray(arr, dtype=np.uint8).ravel()))
    img.putpalette(convert.voc_palette().ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_coco_stuff27_fine_to_coarse_known_pixels():
    # stuffthingmaps values: 0 person, 1 bicycle, 51 banana, 61 chair, 71 tv, 120 food-other,
    # 97 cabinet, 100 carpet, 168 tree, 181 wood, 255 unlabeled
    fine = np.array([[0, 1, 51, 61, 71, 120], [97, 100, 168, 181, 255, 119]], dtype=np.uint8)
    coarse = convert.coco_stuff27_label(Image.fromarray(fine))
    names = [ln.strip() for ln in (Path(convert.__file__).parents[1] / "reclip_core" / "class_names"
                                   / "coco_stuff27.txt").read_text().splitlines()]
    got = [[names[c] if c != 255 else None for c in row] for row in coarse.tolist()]
    assert got == [["person", "vehicle", "food", "furniture", "electronic", "food-stuff"],
                   ["furniture-stuff", "floor", "plant", "solid", None, "water"]]


def test_coco_stuff27_table_consistency():
    rows = convert.read_table("coco_stuff27.csv")
    names = [ln.strip() for ln in (Path(convert.__file__).parents[1] / "reclip_core" / "class_names"
                                   / "coco_stuff27.txt").read_text().splitlines()]
    assert len(rows) == 182 and len(names) == 27
    for r in rows:
        f, c = int(r["fine_id"]), int(r["coarse_id"])
        assert (c < 12) == (f <= 90), r  # things -> thing supercategories, stuff -> stuff ones
        assert r["coarse_name"] == names[c]
    assert {int(r["coarse_id"]) for r in rows} == set(range(27))
    assert rows[0]["fine_name"] == "person" and rows[181]["fine_name"] == "wood"


def test_cityscapes_label_ids_to_train_ids():
    ids = np.array([[0, 7, 8, 26], [33, 4, 34, 24]], dtype=np.uint8)
    assert convert.cityscapes_label(Image.fromarray(ids)).tolist() == [[255, 0, 1, 13], [18, 255, 255, 11]]
    train = [int(r["train_id"]) for r in convert.read_table("cityscapes_labels.csv") if r["train_id"] != "255"]
    assert sorted(train) == list(range(19))


def test_voc_palette_png_to_indices(tmp_path):
    arr = np.array([[0, 1, 15], [20, 255, 0]], dtype=np.uint8)
    p = tmp_path / "l.png"
    p.write_bytes(_palette_png(arr))
    assert Image.open(p).mode == "P"
    assert convert.voc_label(p).tolist() == arr.tolist()
    rgb = Image.open(p).convert("RGB")  # a colour rendering maps back through the palette
    assert tuple(np.array(rgb)[0, 1]) == (128, 0, 0)
    assert convert.voc_label(rgb).tolist() == arr.tolist()


def test_ade_label_checked_and_kept():
    arr = np.array([[0, 1, 150]], dtype=np.uint8)
    assert convert.ade_label(Image.fromarray(arr)).tolist() == [[0, 1, 150]]
    with pytest.raises(ValueError):
        convert.ade_label(Image.fromarray(np.array([[151]], dtype=np.uint8)))


def _rle_string(runs):
    """COCO compressed-RLE encoder (spec inverse of the decoder), for fixtures.

    Checked offline to give the same strings as pycocotools 2.0.11 ``mask.encode``."""
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _runs(mask):
    flat = mask.T.ravel().astype(np.uint8)  # column-major
    runs, cur, n = [], 0, 0
    for v in flat:
        if v == cur:
            n += 1
        else:
            runs.append(n)
            cur, n = v, 1
    runs.append(n)
    return runs


def test_rle_decode_known_and_roundtrip():
    # uncompressed counts, column-major: 2x3 image, runs 1 zero, 2 ones, 3 zeros
    m = convert.rle_decode({"size": [2, 3], "counts": [1, 2, 3]})
    assert m.tolist() == [[False, True, False], [True, False, False]]
    # compressed strings produced by pycocotools 2.0.11 mask.encode (recorded offline)
    want = np.zeros((6, 9), bool)
    want[1:4, 2:7] = True
    want[5, :] = True
    want[0, 8] = True
    got = convert.rle_decode({"size": [6, 9], "counts": "5150L20N020N020N020N020N41OO"})
    assert got.tolist() == want.tolist()
    big = np.zeros((300, 400), bool)
    big[50:250, 100:380] = True
    counts = "R[m0X6T3" + "0" * 557 + "ni5"
    assert convert.rle_decode({"size": [300, 400], "counts": counts}).tolist() == big.tolist()
    rng = np.random.default_rng(0)
    mask = rng.random((7, 11)) > 0.6
    runs = _runs(mask)
    assert convert.rle_decode({"size": [7, 11], "counts": runs}).tolist() == mask.tolist()
    assert convert.rle_decode({"size": [7, 11], "counts": _rle_string(runs)}).tolist() == mask.tolist()
    with pytest.raises(ValueError):
        convert.rle_decode({"size": [2, 3], "counts": [1, 2]})
    with pytest.raises(ValueError, match="pycocotools"):
        convert.rle_decode([[0, 0, 1, 0, 1, 1]])


def test_context_mapping_and_class_order():
    names = [ln.strip() for ln in (Path(convert.__file__).parents[1] / "reclip_core" / "class_names"
                                   / "context.txt").read_text().splitlines()]
    # Detail category ids: 2 aeroplane, 397 table, 458 wood, 284 person, 3 (not among the 59), 0
    raw = np.array([[2, 397, 458, 284, 3, 0]])
    lab = convert.context_label(raw)
    assert lab.tolist() == [[1, 50, 59, 37, 0, 0]]
    assert [names[v - 1] for v in lab[0, :4]] == ["aeroplane", "table", "wood", "person"]
    anns = [{"id": 1, "category_id": 2, "segmentation": {"size": [2, 2], "counts": [0, 4]}},
            {"id": 2, "category_id": 458, "segmentation": {"size": [2, 2], "counts": [3, 1]}}]
    assert convert.context_raw_mask(2, 2, anns).tolist() == [[2, 2], [2, 458]]  # later on top


# --------------------------------------------------------------------------------------------
# every dataset command end to end on fixtures in the official formats
# --------------------------------------------------------------------------------------------
def _jpg(color=(200, 30, 30), size=(12, 8), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 128).save(buf, format="JPEG")
    return buf.getvalue()


def _pngimg(size=(12, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _gray_png(arr):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


H, W = 8, 12


def _check_layout(root, name, n_train, n_val):
    from reclip_core.datasets import get_dataset

    m = json.loads((root / "manifest.json").read_text())
    assert m["dataset"] == name and m["counts"] == {"train": n_train, "val": n_val}
    assert m["converter_version"] == convert.CONVERTER_VERSION
    assert not (root / "labels" / "train").exists(), "train labels must never be written"
    for rec in m["splits"]["val"]["labels"]:
        assert hashlib.sha256((root / rec["file"]).read_bytes()).hexdigest() == rec["sha256"]
    train = get_dataset(name, "train", root=root)
    val = get_dataset(name, "val", root=root)
    assert len(train) == n_train and len(val) == n_val
    assert set(train[0]) == {"id", "image"}
    return m, train, val


def test_prepare_voc_end_to_end(server, tmp_path):
    lab = np.zeros((H, W), np.uint8)
    lab[0, 0], lab[0, 1], lab[0, 2] = 1, 15, 255  # aeroplane, person, border
    pre = "VOCdevkit/VOC2012/"
    members = {pre + "ImageSets/Segmentation/train.txt": b"2007_000001\n2007_000002\n",
               pre + "ImageSets/Segmentation/val.txt": b"2007_000003\n",
               pre + "Annotations/2007_000001.xml": b"<x/>"}
    for i in ("2007_000001", "2007_000002", "2007_000003"):
        members[pre + f"JPEGImages/{i}.jpg"] = _jpg()
        members[pre + f"SegmentationClass/{i}.png"] = _palette_png(lab)
    reg = registry(tmp_path, server, "voc", {"VOCtrainval_11-May-2012.tar": tar_bytes(members)})
    root = tmp_path / "voc"
    assert run_cli("voc", "--root", root, "--registry", reg) == 0
    m, train, val = _check_layout(root, "voc", 2, 1)
    assert train.ids == ["2007_000001", "2007_000002"] and val.ids == ["2007_000003"]
    y = val[0]["label"]
    assert y.dtype == np.int64 and y[0, 0] == 0 and y[0, 1] == 14 and y[0, 2] == 255 and y[1, 1] == 255
    assert not (root / "raw" / "VOCdevkit" / "VOC2012" / "Annotations").exists()  # only needed members
    n = len(server.log)
    assert run_cli("voc", "--root", root, "--registry", reg) == 0  # up to date: no download
    assert len(server.log) == n


def test_prepare_context_end_to_end(server, tmp_path):
    full = {"size": [H, W], "counts": [H * W]}  # all zeros (no pixel)
    left = np.zeros((H, W), bool)
    left[:, :4] = True
    right = np.zeros((H, W), bool)
    right[:, 8:] = True
    data = {
        "images": [
            {"image_id": 2008000001, "file_name": "2008_000001.jpg", "height": H, "width": W, "phase": "train"},
            {"image_id": 2008000002, "file_name": "2008_000002.jpg", "height": H, "width": W, "phase": "val"},
            {"image_id": 2008000003, "file_name": "2008_000003.jpg", "height": H, "width": W, "phase": "test"},
        ],
        "annos_segmentation": [
            {"id": 1, "image_id": 2008000002, "category_id": 458, "segmentation": {"size": [H, W], "counts": _rle_string(_runs(left))}},
            {"id": 2, "image_id": 2008000002, "category_id": 3, "segmentation": {"size": [H, W], "counts": _runs(right)}},
            {"id": 3, "image_id": 2008000001, "category_id": 2, "segmentation": full},
        ],
        "categories": [],
    }
    tar = tar_bytes({f"VOCdevkit/VOC2010/JPEGImages/2008_00000{i}.jpg": _jpg() for i in (1, 2, 3)})
    reg = registry(tmp_path, server, "context", {"VOCtrainval_03-May-2010.tar": tar,
                                                 "trainval_merged.json": json.dumps(data).encode()})
    root = tmp_path / "ctx"
    assert run_cli("context", "--root", root, "--registry", reg) == 0
    _, train, val = _check_layout(root, "context", 1, 1)
    y = val[0]["label"]
    assert (y[:, :4] == 58).all()  # wood, the last of the 59
    assert (y[:, 4:] == 255).all()  # background and the non-59 category are ignored


def test_prepare_ade_end_to_end(server, tmp_path):
    ann = np.zeros((H, W), np.uint8)
    ann[0, :3] = [1, 150, 0]
    pre = "ADEChallengeData2016/"
    members = {pre + "images/training/ADE_train_00000002.jpg": _jpg(), pre + "images/training/ADE_train_00000001.jpg": _jpg(),
               pre + "annotations/training/ADE_train_00000001.png": _gray_png(ann),
               pre + "annotations/training/ADE_train_00000002.png": _gray_png(ann),
               pre + "images/validation/ADE_val_00000001.jpg": _jpg(mode="L"),
               pre + "annotations/validation/ADE_val_00000001.png": _gray_png(ann)}
    reg = registry(tmp_path, server, "ade", {"ADEChallengeData2016.zip": zip_bytes(members)})
    root = tmp_path / "ade"
    assert run_cli("ade", "--root", root, "--registry", reg) == 0
    _, train, val = _check_layout(root, "ade", 2, 1)
    assert train.ids == ["ADE_train_00000001", "ADE_train_00000002"]
    item = val[0]
    assert item["image"].mode == "RGB"
    assert item["label"][0, :3].tolist() == [0, 149, 255]
    assert not (root / "raw" / pre / "annotations" / "training").exists()


def test_prepare_cityscapes_from_user_archives(tmp_path):
    ids = np.full((H, W), 7, np.uint8)
    ids[0, :3] = [26, 0, 33]
    gt = {"gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png": _gray_png(ids),
          "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_color.png": _pngimg(),
          "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png": _gray_png(ids)}
    left = {"leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png": _pngimg(),
            "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png": _pngimg(),
            "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png": _pngimg(),
            "leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png": _pngimg()}
    zips = {"gtFine_trainvaltest.zip": zip_bytes(gt), "leftImg8bit_trainvaltest.zip": zip_bytes(left)}
    reg = registry(tmp_path, None, "cityscapes", zips)
    root = tmp_path / "cs"
    assert run_cli("cityscapes", "--root", root, "--registry", reg) == 2  # no archives given
    mine = tmp_path / "my_downloads"
    mine.mkdir()
    for fn, data in zips.items():
        (mine / fn).write_bytes(data)
    assert run_cli("cityscapes", "--root", root, "--registry", reg, "--archives", mine) == 0
    _, train, val = _check_layout(root, "cityscapes", 2, 1)
    assert train.ids == ["aachen_000000_000019", "bochum_000000_000313"]
    assert val[0]["label"][0, :4].tolist() == [13, 255, 18, 0]
    assert not (root / "raw" / "gtFine" / "train").exists()


def test_prepare_coco_stuff27_end_to_end(server, tmp_path):
    fine = np.full((H, W), 255, np.uint8)
    fine[0, :4] = [0, 168, 51, 181]
    zips = {"val2017.zip": zip_bytes({"val2017/000000000139.jpg": _jpg()}),
            "stuffthingmaps_trainval2017.zip": zip_bytes({"val2017/000000000139.png": _gray_png(fine),
                                                          "train2017/000000000009.png": _gray_png(fine)}),
            "train2017.zip": zip_bytes({"train2017/000000000009.jpg": _jpg(), "train2017/000000000025.jpg": _jpg()})}
    reg = registry(tmp_path, server, "coco_stuff27", zips)
    root = tmp_path / "coco"
    assert run_cli("coco_stuff27", "--root", root, "--registry", reg, "--remove-raw") == 0
    _, train, val = _check_layout(root, "coco_stuff27", 2, 1)
    assert val[0]["label"][0, :5].tolist() == [9, 22, 2, 24, 255]  # person, plant, food, solid, unlabeled
    assert not (root / "raw").exists() and len(train) == 2  # images survive: hard links or copies


def test_prepare_refuses_tampered_archive(server, tmp_path):
    members = {"VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt": b"x\n"}
    reg = registry(tmp_path, server, "voc", {"VOCtrainval_11-May-2012.tar": tar_bytes(members)})
    server.files["/VOCtrainval_11-May-2012.tar"] = b"X" * len(server.files["/VOCtrainval_11-May-2012.tar"])
    assert run_cli("voc", "--root", tmp_path / "voc", "--registry", reg) == 1
    assert (tmp_path / "voc" / "downloads" / "VOCtrainval_11-May-2012.tar.bad").exists()
    assert not (tmp_path / "voc" / "manifest.json").exists()


def test_prepare_refuses_traversal_archive(server, tmp_path):
    reg = registry(tmp_path, server, "voc", {"VOCtrainval_11-May-2012.tar": tar_bytes({"../../escape.txt": b"x"})})
    assert run_cli("voc", "--root", tmp_path / "voc", "--registry", reg) == 1
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()


def test_hf_source_writer_on_local_fixture(tmp_path):
    datasets = pytest.importorskip("datasets")
    from data_prep.hf import prepare_hf

    ann = np.zeros((H, W), np.uint8)
    ann[0, :2] = [5, 0]
    img_path = tmp_path / "ADE_val_00000007.jpg"
    img_path.write_bytes(_jpg())
    feats = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(),
                               "scene_category": datasets.Value("int32")})
    ds = datasets.Dataset.from_dict({"image": [str(img_path)],
                                     "annotation": [Image.fromarray(ann)], "scene_category": [0]}, features=feats)
    ds.save_to_disk(str(tmp_path / "hf_fixture"))
    loaded = datasets.load_from_disk(str(tmp_path / "hf_fixture"))
    root = tmp_path / "ade_hf"
    m = prepare_hf("ade", root, progress=False, loader=lambda split: loaded)
    assert m["source"] == "hf" and m["counts"] == {"train": 1, "val": 1}
    from reclip_core.datasets import get_dataset

    val = get_dataset("ade", "val", root=root)
    assert val.ids == ["ADE_val_00000007"] and val[0]["label"][0, :2].tolist() == [4, 255]
    assert not (root / "labels" / "train").exists()
    with pytest.raises(ValueError, match="--source official"):
        prepare_hf("cityscapes", tmp_path / "cs", progress=False)


def test_cli_toyworld_dispatch_is_lazy(monkeypatch):
    import sys
    import types

    import data_prep
    from data_prep.__main__ import main

    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 0

    fake = types.ModuleType("data_prep.toyworld")
    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "data_prep.toyworld", fake)
    monkeypatch.setattr(data_prep, "toyworld", fake, raising=False)
    assert main(["toyworld", "--preset", "biased"]) == 0
    assert seen["argv"] == ["--preset", "biased"]
