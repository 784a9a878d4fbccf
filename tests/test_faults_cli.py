"""Fault classes found through the real CLI (docs/reliability.md, cases 24-27).

24 derived files keyed incompletely: hypotheses and feature caches record the images they were
   derived from; ``train`` checks the hypotheses file against its config and CLIP; the label guard
   holds even when a feature cache means no view is read.
25 tracebacks instead of messages: malformed YAML, read-only folders, corrupt CLIP weights, a real
   disk-full inside ``torch.save``, a folder or FIFO given as a file, a truncated feature cache.
26 silent nonsense: class names that tokenize identically (unknown words, truncation); EXIF orientation.
27 resource exhaustion: zip bombs and full disks before extraction, huge images, trickling servers.

CLI cases run ``python -m reclip_core`` / ``python -m data_prep`` in a subprocess on a toy world of
8 images of 32 px with the tiny random CLIP, and assert the exit status and the one ``error:`` line.
"""
from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from .data_prep_fixtures import registry
from .train_fixtures import write_tiny_world_config, refused

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--set", "clip.arch=toy", "--set", "clip.pretrained=biased"]


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    env.pop("WORLD_SIZE", None)
    return env


def _cli(*args, module: str = "reclip_core", timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _main(capsys, *args, status: int = 2) -> str:
    """``reclip_core.cli.main`` in this process (the same parsing and error handling as
    ``python -m reclip_core``, without a second interpreter's start-up): its one ``error:`` line."""
    from reclip_core.cli import main

    capsys.readouterr()
    assert main([str(a) for a in args]) == status
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toy world of 8 train / 8 val images, its hypotheses and a 1-epoch run with a feature cache
    (train and val of equal size: a cache keyed without the split would be reused for val)."""
    from reclip_core.cli import main

    tmp = tmp_path_factory.mktemp("world")
    cfg = write_tiny_world_config(tmp, train_size=8, val_size=8, epoch=1)
    assert main(["hypothesis", "--config", str(cfg), "--quiet"]) == 0
    assert main(["train", "--config", str(cfg), "--quiet", "--set", "feature_cache=true"]) == 0
    assert (tmp / "run" / "feature_cache.safetensors").is_file()
    return {"tmp": tmp, "cfg": cfg, "run": tmp / "run"}


# ------------------------------------------------------------------------------------------------
# 24. derived files record what they were derived from
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, named", [("hypothesis_window=16", "window: 32 -> 16"),
                                           ("seed=1", "clip_weights:")])  # seed=1: another random CLIP
def test_24_train_refuses_hypotheses_of_other_settings_or_clip(world, change, named, capsys):
    line = _main(capsys, "train", "--config", world["cfg"], "--quiet", "--no-resume", "--set", change)
    assert str(world["run"] / "hypotheses.json") in line and named in line and "--no-resume" in line


def test_24_hypotheses_of_another_split_are_not_resumed(world, capsys):
    line = _main(capsys, "hypothesis", "--config", world["cfg"], "--quiet", "--set", "train_split=pretrain")
    assert "dataset.split: 'train' -> 'pretrain'" in line and "--no-resume" in line and "hypotheses.json" in line


@pytest.mark.parametrize("sets", [["train_split=val", "feature_cache=true"], ["train_split=test", "val_split=test"]])
def test_24_a_labelled_split_is_refused_for_training_before_any_reader(world, sets, monkeypatch, capsys):
    from reclip_core import run_inputs, training

    for module in (run_inputs, training):
        monkeypatch.setattr(module, "build_dataset", lambda *a, **k: pytest.fail("a reader was built"))
    line = _main(capsys, "train", "--config", world["cfg"], "--quiet", "--no-resume",
                 *[a for kv in sets for a in ("--set", kv)])
    assert "is the labelled evaluation split" in line and "train_split=train" in line


class _Files:
    """A file-backed reader: ids, a root and image files (what ``dataset_identity`` digests)."""

    def __init__(self, root: Path, n: int = 3):
        self.name, self.split, self.root = "folder", "train", root
        self.ids = [f"im{i}" for i in range(n)]
        for i in self.ids:
            if not (root / f"{i}.png").exists():
                Image.new("RGB", (8, 8), (int(i[2:]) * 40, 0, 0)).save(root / f"{i}.png")

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        return self.root / f"{self.ids[i]}.png"


def test_24_dataset_identity_sees_other_roots_splits_and_replaced_files(tmp_path):
    from reclip_core.provenance import dataset_identity

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = _Files(tmp_path / "a"), _Files(tmp_path / "b")
    assert dataset_identity(a) == dataset_identity(_Files(tmp_path / "a"))
    assert dataset_identity(a)["root"] != dataset_identity(b)["root"]
    before = dataset_identity(a)["content"]
    Image.new("RGB", (9, 8)).save(a.image_path(1))  # same id, other image
    assert dataset_identity(a)["content"] != before
    val = _Files(tmp_path / "a")
    val.split = "val"
    assert dataset_identity(val)["split"] == "val"

    class Toy:  # the toy world: identified by its preset (its images are a pure function of it)
        def __init__(self, preset_hash):
            self.split, self.preset_name, self.preset_hash, self.ids = "train", "x", preset_hash, ["t0", "t1"]

        def __len__(self):
            return 2
    assert dataset_identity(Toy("h1")) != dataset_identity(Toy("h2"))


def test_24_feature_cache_key_changes_with_the_images(tmp_path, tiny_clip):
    from reclip_core.model import ReCLIPPP
    from reclip_core.provenance import feature_cache_key
    from reclip_core.views import TrainViews
    from reclip_core.transforms import TrainTransform

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    model = ReCLIPPP(tiny_clip, ["cat", "dog"], templates=["a photo of a {}."])
    hyps = {f"im{i}": [0] for i in range(3)}
    key = [feature_cache_key(model, TrainViews(_Files(tmp_path / d), hyps, 2, TrainTransform(32, (32, 32))), 1)
           for d in ("a", "b")]
    assert key[0] != key[1]


def test_25_truncated_feature_cache_is_rebuilt_with_a_note(world, tmp_path, capsys):
    from reclip_core.cli import main

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    cache = run / "feature_cache.safetensors"
    cache.write_bytes(cache.read_bytes()[:200])
    assert main(["train", "--config", str(world["cfg"]), "--quiet", "--no-resume", "--set", "feature_cache=true",
                 "--set", f"output_dir={run}"]) == 0
    err = capsys.readouterr().err
    assert "is unreadable" in err and "rebuilding it" in err
    from safetensors.torch import load_file

    assert load_file(str(cache))["feats"].shape[1] == 8


# ------------------------------------------------------------------------------------------------
# 25. messages, not tracebacks
# ------------------------------------------------------------------------------------------------
def test_25_malformed_yaml_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: toyworld\nclip: {arch: [1\n")
    line = refused(_cli("train", "--config", bad))
    assert "not valid YAML" in line and str(bad) in line and "line 3" in line


def test_25_folder_or_fifo_given_as_a_file(tmp_path, world, capsys):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    assert "is a named pipe (FIFO), not a file" in refused(_cli("train", "--config", fifo))
    (tmp_path / "d.yaml").mkdir()
    assert "is a folder, not a file" in refused(_cli("train", "--config", tmp_path / "d.yaml"))
    line = _main(capsys, "segment", "--config", world["cfg"], "--image", tmp_path, "--out", tmp_path / "o.png")
    assert f"image {tmp_path} is a folder, not a file" in line


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write into (a read-only tmpfs for root, who ignores modes)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    yield ro
    subprocess.run(["umount", str(ro)], capture_output=True)


def test_25_read_only_run_or_output_folder(world, read_only_dir, capsys):
    line = _main(capsys, "train", "--config", world["cfg"], "--quiet", "--set", f"output_dir={read_only_dir / 'run'}")
    assert f"{read_only_dir / 'run'}" in line and "--set output_dir=" in line
    line = _main(capsys, "hypothesis", "--config", world["cfg"], "--quiet", "--out", read_only_dir / "h.json")
    assert "cannot " in line and str(read_only_dir) in line and "--out PATH" in line


def test_25_corrupt_clip_weights_file(world, tmp_path, capsys):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"\xff" * 64)
    line = _main(capsys, "hypothesis", "--config", world["cfg"], "--quiet", "--set", f"clip.pretrained={bad}",
                 "--out", tmp_path / "h.json")
    assert f"CLIP weights file {bad} cannot be loaded" in line and "SafetensorError" in line


def test_25_disk_full_inside_torch_save_reports_no_space(existing, disk_full):  # noqa: F811
    from reclip_core.atomic_io import atomic_torch_save

    before = existing.read_bytes()
    disk_full(existing.name)
    with pytest.raises(OSError) as err:
        atomic_torch_save({"w": torch.zeros(50_000)}, existing)
    assert err.value.errno == 28 and "no space left" in str(err.value)
    assert existing.read_bytes() == before and not list(existing.parent.glob(f".{existing.name}.*"))


def test_25_real_full_tmpfs_inside_torch_save(tmp_path):
    from reclip_core.atomic_io import atomic_torch_save

    full = tmp_path / "full"
    full.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)],
                                           capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        with pytest.raises(OSError) as err:
            atomic_torch_save({"w": torch.zeros(1_000_000)}, full / "x.pt")
        assert err.value.errno == 28 and not list(full.iterdir())
    finally:
        subprocess.run(["umount", str(full)], capture_output=True)


# ------------------------------------------------------------------------------------------------
# 26. class names that cannot be told apart; EXIF orientation
# ------------------------------------------------------------------------------------------------
def test_26_class_names_unknown_to_the_toy_clip_arerefused(world, tmp_path):
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(img)
    line = refused(_cli("segment", "--config", world["cfg"], *TOY, "--image", img, "--classes", "cat,dog,car",
                         "--out", tmp_path / "o.png"))
    assert "'cat' and 'dog' tokenize to the same tokens" in line and "<unk>" in line
    assert not (tmp_path / "o.png").exists()


def test_26_truncated_or_partly_unknown_names():
    from reclip_core.clip_loading import load_clip
    from reclip_core.text import text_embeddings

    clip = load_clip("toy", "biased")
    long = " ".join(["red"] * 20)
    with pytest.raises(ValueError, match="cut off at the text context of 20 tokens") as err:
        text_embeddings(clip, [f"{long} circle", f"{long} square"], ["a photo of a {}."])
    assert f"{long} circle" in str(err.value)
    with pytest.warns(UserWarning, match="'blue cat' has words unknown"):
        feats = text_embeddings(clip, ["red circle", "blue cat"], ["a photo of a {}."])
    assert feats.shape[0] == 2


def test_26_exif_orientation_is_applied_and_plain_pngs_are_untouched(tmp_path):
    from PIL import ImageOps

    from reclip_core.transforms import open_image

    arr = (np.arange(40 * 48 * 3) % 251).astype(np.uint8).reshape(40, 48, 3)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    im.save(tmp_path / "cam.jpg", exif=exif, quality=95)
    got = open_image(tmp_path / "cam.jpg")
    with Image.open(tmp_path / "cam.jpg") as raw:
        assert raw.size == (48, 40) and got.size == (40, 48)
        assert np.array_equal(np.asarray(got), np.asarray(ImageOps.exif_transpose(raw).convert("RGB")))
    im.save(tmp_path / "plain.png")
    assert np.array_equal(np.asarray(open_image(tmp_path / "plain.png")), arr)


# ------------------------------------------------------------------------------------------------
# 27. resource exhaustion
# ------------------------------------------------------------------------------------------------
def _bomb_zip(path: Path, size: int = 24 << 20) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\0" * size)
    return path


def test_27_zip_bomb_is_refused_before_writing_unless_the_limit_is_raised(tmp_path):
    from data_prep.extract import ArchiveTooLargeError, safe_extract

    bomb = _bomb_zip(tmp_path / "bomb.zip")
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ArchiveTooLargeError, match="decompression bomb; nothing was written.*--max-expansion"):
        safe_extract(bomb, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "zeros.bin").exists()
    safe_extract(bomb, tmp_path / "out", progress=False, max_expansion=1e6)
    assert (tmp_path / "out" / "zeros.bin").stat().st_size == 24 << 20


def test_27_archive_larger_than_the_free_space_isrefused(tmp_path, monkeypatch):
    from data_prep import extract

    arc = tmp_path / "a.tar"
    with tarfile.open(arc, "w") as tf:
        info = tarfile.TarInfo("x.bin")
        info.size = 100_000
        tf.addfile(info, io.BytesIO(os.urandom(100_000)))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(extract.ArchiveTooLargeError, match="GiB free; nothing was written"):
        extract.safe_extract(arc, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "x.bin").exists()


def test_27_data_prep_refuses_a_bomb_with_exit_1(server, tmp_path):  # noqa: F811
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:  # a .tar name, gzip inside: tarfile detects it
        info = tarfile.TarInfo("VOCdevkit/VOC2012/JPEGImages/zeros.jpg")
        info.size = 24 << 20
        tf.addfile(info, io.BytesIO(b"\0" * info.size))
    reg = registry(tmp_path, server, "voc", {"VOCtrainval_11-May-2012.tar": buf.getvalue()})
    line = refused(_cli("voc", "--root", tmp_path / "voc", "--registry", reg, "--no-progress", module="data_prep"), 1)
    assert "decompression bomb" in line and "--max-expansion" in line
    assert not (tmp_path / "voc" / "raw" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "zeros.jpg").exists()


def _png_header(w: int, h: int) -> bytes:
    """A PNG that declares a w × h canvas (what a tiny "pixel flood" file does) without its pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    idat = zlib.compress(b"\0" * (w * 3 + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_27_huge_image_is_refused_before_decoding(world, tmp_path, monkeypatch):
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(9400, 9400))
    t0 = time.monotonic()
    line = refused(_cli("segment", "--config", world["cfg"], "--image", huge, "--out", tmp_path / "o.png"))
    assert "9400 x 9400 = 88,360,000 pixels" in line and "--max-pixels" in line and time.monotonic() - t0 < 60
    from reclip_core.transforms import open_image

    small = tmp_path / "s.png"
    Image.new("RGB", (20, 10)).save(small)
    monkeypatch.setenv("RECLIP_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(ValueError, match="more than the limit of 100"):
        open_image(small)
    monkeypatch.setenv("RECLIP_MAX_IMAGE_PIXELS", "200")
    assert open_image(small).size == (20, 10)


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Announces 1000 bytes and sends one every 0.2 s (a server that never quite stalls)."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                if self.server.stop.is_set():
                    return
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            return


@pytest.fixture
def trickle():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    srv.daemon_threads, srv.stop = True, threading.Event()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/VOCtrainval_11-May-2012.tar"
    srv.stop.set()
    srv.shutdown()
    srv.server_close()


def test_27_trickling_download_gives_up(trickle, tmp_path, monkeypatch):
    from data_prep import download, pace

    arch = download.Archive(name="a", filename="a.bin", urls=(trickle,), size=1000, checksums={})
    monkeypatch.setattr(pace, "RATE_GRACE_S", 1.0)
    monkeypatch.setattr(pace, "MIN_RATE", 100)
    t0 = time.monotonic()
    with pytest.raises(download.DownloadError, match="below the minimum"):
        download.fetch(arch, tmp_path, progress=False, retry_wait=0, timeout=5)
    assert time.monotonic() - t0 < 10 and (tmp_path / "a.bin.part").stat().st_size > 0  # kept for a resume


def test_27_data_prep_max_seconds_stops_a_trickle(trickle, tmp_path):
    reg = {"archives": {"VOCtrainval_11-May-2012.tar": {"filename": "VOCtrainval_11-May-2012.tar", "size": 1000,
                                                        "urls": [trickle]}},
           "datasets": {"voc": ["VOCtrainval_11-May-2012.tar"]}}
    (tmp_path / "reg.yaml").write_text(json.dumps(reg))
    t0 = time.monotonic()
    proc = _cli("voc", "--root", tmp_path / "voc", "--registry", tmp_path / "reg.yaml", "--no-progress",
                "--max-seconds", "1.5", module="data_prep", timeout=60)
    assert "could not download" in refused(proc, 1) and time.monotonic() - t0 < 30
    assert "not finished after" in proc.stderr and "--max-seconds 1.5" in proc.stderr
