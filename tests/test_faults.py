"""Fault and bad-input suite: nothing is lost, and every error says what to do.

One place for every fault case; each test asserts the exact behaviour — a ``ValueError`` /
``FileNotFoundError`` whose message names the fix, or a correct recovery. Fixtures and helpers
come from the other test modules (tiny CLIP, in-test image sets and configs, archive builders,
the loopback HTTP server). Everything is tiny: 32-px images, a random 2-layer CLIP.

Cases (numbered as in README's "Reliability" section):
 1 corrupt JPEG                        10 truncated checkpoint file
 2 greyscale PNG                       11 non-finite loss
 3 RGBA PNG                            12 process killed during a checkpoint write
 4 palette PNG                         13 resume after a kill == uninterrupted run
 5 16-bit PNG (and other bit depths)   14 disk full while writing results
 6 label size != image size            15 archive with a bad checksum
 7 missing dataset root                16 archive with ../ or absolute members
 8 unknown profile / dataset / key     17 untrusted pickle in torch.load
 9 class list != checkpoint's          18 invalid papermill parameter / profile
                                       19 notebook run dying mid-notebook
                                       20 derived files from other settings or CLIP weights
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from reclip_core import atomic_io
from reclip_core.checkpoint import LATEST, convert_release_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from reclip_core.datasets import get_dataset
from reclip_core.transforms import eval_preprocess, to_image_tensor

from .atomic_io_fixtures import assert_untouched
from .benchmark_fixtures import H, W, layout
from .checkpoint_fixtures import optim_state
from .data_prep_fixtures import registry, run_cli, tar_bytes, write_tar, write_zip
from .train_fixtures import NAMES, ImageSet, hypotheses_for, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ["a photo of a {}."]


# ------------------------------------------------------------------------------------------------
# image files in every mode
# ------------------------------------------------------------------------------------------------
def _jpeg_bytes(size=(W, H)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (greyscale for H×W, RGB for H×W×3) written by hand: PIL cannot write 16-bit RGB."""
    arr = np.asarray(arr, dtype=np.uint16)
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0 if arr.ndim == 2 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _palette_image(transparent: bool) -> Image.Image:
    img = Image.new("P", (W, H), 1)
    img.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60] + [0] * (256 * 3 - 9))
    if transparent:
        img.info["transparency"] = 0
    return img


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **({"transparency": img.info["transparency"]} if "transparency" in img.info else {}))
    return buf.getvalue()


GREY16 = np.full((H, W), 0x8000, np.uint16)  # mid grey: 128 in 8 bits (Image.convert clips it to 255)
RGB16 = np.stack([np.full((H, W), v, np.uint16) for v in (0x1000, 0x8000, 0xFF00)], axis=-1)

#: file bytes on disk → the RGB value every reader must return for pixel (0, 0)
MODES = {
    "L": (lambda: _png_bytes(Image.new("L", (W, H), 77)), (77, 77, 77)),
    "LA": (lambda: _png_bytes(Image.new("LA", (W, H), (77, 0))), (77, 77, 77)),
    "RGBA": (lambda: _png_bytes(Image.new("RGBA", (W, H), (255, 0, 0, 40))), (255, 0, 0)),
    "P": (lambda: _png_bytes(_palette_image(False)), (10, 20, 30)),
    "P+transparency": (lambda: _png_bytes(_palette_image(True)), (10, 20, 30)),
    "grey16": (lambda: _png16(GREY16), (128, 128, 128)),
    "rgb16": (lambda: _png16(RGB16), (16, 128, 255)),
}


def _val_root(tmp_path, image_bytes: bytes, suffix=".png", label_hw=(H, W)) -> Path:
    """A prepared 'voc' layout (reader test helper) whose one val image is ``image_bytes``."""
    root = layout(tmp_path / "voc", ["a"], ["v"], suffix=suffix, manifest=False)
    for p in (root / "images" / "val").iterdir():
        p.unlink()
    (root / "images" / "val" / f"v{suffix}").write_bytes(image_bytes)
    if label_hw != (H, W):
        Image.fromarray(np.zeros(label_hw, np.uint8)).save(root / "labels" / "val" / "v.png")
    return root


# ------------------------------------------------------------------------------------------------
# 1. corrupt JPEG
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_01_corrupt_jpeg_names_the_file_and_the_fix(tmp_path, tiny_clip, damage):
    from reclip_core.segment import segment

    good = _jpeg_bytes()
    bad = good[: len(good) // 2] if damage == "truncated" else b"this is not a JPEG" * 20
    root = _val_root(tmp_path, bad, suffix=".jpg")
    val = get_dataset("voc", "val", root=root)
    with pytest.raises(ValueError) as err:
        val[0]
    msg = str(err.value)
    assert "v.jpg" in msg and "corrupt, truncated" in msg
    assert f"python -m data_prep voc --root {root} --force" in msg
    with pytest.raises(ValueError, match=r"cannot read image .*v\.jpg"):
        segment(root / "images" / "val" / "v.jpg", NAMES, clip=tiny_clip, templates=TEMPLATES)


# ------------------------------------------------------------------------------------------------
# 2-5. greyscale, RGBA, palette and 16-bit PNGs: converted to 8-bit RGB (not clipped), or refused
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
def test_02_05_png_modes_are_converted_through_reader_transforms_and_segment(tmp_path, tiny_clip, mode):
    from reclip_core.segment import segment

    make, rgb = MODES[mode]
    data = make()
    root = _val_root(tmp_path, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's "Palette images with Transparency" warning
        item = get_dataset("voc", "val", root=root)[0]
        img = item["image"]
        assert img.mode == "RGB" and img.size == (W, H)
        assert img.getpixel((0, 0)) == rgb
        raw = Image.open(io.BytesIO(data))  # the image as PIL opens it, any mode
        t = to_image_tensor(raw)
        assert t.dtype == torch.uint8 and t.shape == (3, H, W) and tuple(t[:, 0, 0].tolist()) == rgb
        x = eval_preprocess(raw, 16)
        assert x.shape[:2] == (1, 3) and min(x.shape[-2:]) == 16 and torch.isfinite(x).all()
    path = tmp_path / "in.png"
    path.write_bytes(data)
    res = segment(path, NAMES, clip=tiny_clip, templates=TEMPLATES, test_size=16)
    assert res.mask.shape == (H, W)
    res = segment(Image.open(io.BytesIO(data)), NAMES, clip=tiny_clip, templates=TEMPLATES, test_size=16)
    assert res.mask.shape == (H, W)


def test_05_16bit_arrays_scaled_and_unknown_ranges_refused(tiny_clip):
    from reclip_core.segment import segment

    # 16-bit data is scaled to 8 bits, not wrapped or clipped
    t = to_image_tensor(np.full((4, 5, 3), 0x8000, np.uint16))
    assert t.dtype == torch.uint8 and int(t[0, 0, 0]) == 128
    assert tuple(to_image_tensor(np.full((4, 5), 9, np.uint8)).shape) == (3, 4, 5)  # greyscale array
    assert torch.equal(to_image_tensor(torch.full((1, 4, 5), 9, dtype=torch.uint8)), torch.full((3, 4, 5), 9, dtype=torch.uint8))
    assert torch.equal(to_image_tensor(np.zeros((4, 5, 4), np.uint8) + 7), torch.full((3, 4, 5), 7, dtype=torch.uint8))
    # a float image outside [0, 1], integers outside 0..255, 32-bit float PIL images: refused, with the fix
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*divide 8-bit values by 255"):
        eval_preprocess(torch.full((3, 8, 8), 200.0), 8)
    with pytest.raises(ValueError, match=r"0\.\.255"):
        to_image_tensor(np.full((4, 4, 3), 300, np.int64))
    with pytest.raises(ValueError, match="mode F.*convert it to 8-bit"):
        segment(Image.new("F", (W, H), 0.5), NAMES, clip=tiny_clip, templates=TEMPLATES)
    with pytest.raises(ValueError, match="H x W x 3"):
        to_image_tensor(np.zeros((4, 4, 2), np.uint8))


# ------------------------------------------------------------------------------------------------
# 6. label size != image size
# ------------------------------------------------------------------------------------------------
class _MisSized:
    """An evaluation split whose second label is the wrong size (a buggy custom reader)."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        img = Image.new("RGB", (48, 40), (120, 120, 120))
        return {"id": f"im{i}", "image": img, "label": np.zeros((40, 48) if i == 0 else (20, 24), np.int64)}


def test_06_label_size_mismatch_is_refused(tmp_path, tiny_clip):
    from reclip_core.evaluation import evaluate
    from reclip_core.model import MaskCLIP

    model = MaskCLIP(tiny_clip, NAMES, templates=TEMPLATES)
    with pytest.raises(ValueError) as err:
        evaluate(model, _MisSized(), test_size=32, pd_threshold=0.5, progress=False)
    msg = str(err.value)
    assert "'im1' is 40x48" in msg and "(20, 24)" in msg and "python -m data_prep" in msg
    # the benchmark reader refuses it too, naming the command that rewrites the labels
    root = _val_root(tmp_path, _png_bytes(Image.new("RGB", (W, H))), label_hw=(H + 1, W))
    with pytest.raises(ValueError, match=r"does not match image.*python -m data_prep voc --root .* --force"):
        get_dataset("voc", "val", root=root)[0]


# ------------------------------------------------------------------------------------------------
# 7. missing dataset root
# ------------------------------------------------------------------------------------------------
def test_07_missing_dataset_root_names_the_data_prep_command(tmp_path, capsys, monkeypatch):
    from reclip_core.cli import main
    from reclip_core.reproduce import preflight

    missing = tmp_path / "nowhere"
    for split in ("train", "val"):
        with pytest.raises(FileNotFoundError, match=f"python -m data_prep voc --root {missing}"):
            get_dataset("voc", split, root=missing)
    with pytest.raises(FileNotFoundError, match="--archives"):  # Cityscapes needs the user's own zips
        get_dataset("cityscapes", "val", root=missing)
    # the CLI: status 2 and the command, before any CLIP is loaded
    assert main(["evaluate", "--config", "voc", "--set", f"data_root={missing}", "--set",
                 f"output_dir={tmp_path / 'run'}", "--quiet"]) == 2
    assert f"python -m data_prep voc --root {missing}" in capsys.readouterr().err
    # `make reproduce PROFILE=paper` fails in its preflight, before any notebook
    monkeypatch.setenv("RECLIP_DATA", str(missing))
    with pytest.raises(FileNotFoundError, match=f"python -m data_prep voc --root {missing / 'voc'}"):
        preflight("paper", "voc")


# ------------------------------------------------------------------------------------------------
# 8. unknown profile / dataset / config key: the message lists the valid ones
# ------------------------------------------------------------------------------------------------
def test_08_unknown_names_list_the_valid_ones(capsys):
    from reclip_core import lab
    from reclip_core.cli import main
    from reclip_core.config import load_config
    from reclip_core.reproduce import check_parameters

    with pytest.raises(ValueError, match=r"unknown config key 'max_epochs'; valid keys: .*max_epoch"):
        load_config("toy", ["max_epochs=3"])
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*voc, context, ade"):
        load_config("toy", ["dataset=imagenet"])
    with pytest.raises(ValueError, match=r"unknown profile 'fancy'.*paper"):
        load_config("toy", ["profile=fancy"])
    with pytest.raises(ValueError, match=r"unknown config 'pascal'; valid: .*voc"):
        load_config("pascal")
    assert main(["train", "--config", "toy", "--set", "clip.archh=x"]) == 2
    assert "unknown config key 'clip.archh'" in capsys.readouterr().err
    # the notebooks' entry point, before any heavy work
    with pytest.raises(ValueError, match="valid profiles: toy, paper"):
        lab.setup("papr")
    with pytest.raises(ValueError, match="valid: voc, context, ade, cityscapes, coco_stuff27"):
        lab.setup("paper", "imagenet", device="cpu")
    with pytest.raises(ValueError, match=r"unknown config key 'max_epochs'; valid keys"):
        lab.setup("toy", device="cpu", max_epochs=3)
    with pytest.raises(ValueError, match=r"unknown config key 'max_val_image'; valid keys"):
        lab.setup("toy", device="cpu", max_val_image=None)  # a None value is not a free pass
    with pytest.raises(ValueError, match="is not part of profile 'toy'; valid: known, toyworld"):
        check_parameters("toy", "voc", "cpu")


# ------------------------------------------------------------------------------------------------
# 9. class list that does not match a checkpoint
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_clip):
    from reclip_core.training import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(run, epoch=1), dataset=ImageSet(8), hypotheses=hypotheses_for(8), clip=tiny_clip, progress=False)
    return run


def test_09_class_list_mismatch_with_checkpoint(trained_run, tiny_clip):
    from reclip_core.evaluation import evaluate_run
    from reclip_core.model import ReCLIPPP
    from reclip_core.segment import segment

    other = ["cat", "dog", "bus"]  # same count: the tensors fit, the classes do not
    with pytest.raises(ValueError, match=r"trained for the classes \['cat', 'dog', 'car'\].*train for these"):
        load_model_weights(ReCLIPPP(tiny_clip, other, templates=TEMPLATES), trained_run)
    with pytest.raises(ValueError, match="trained for the classes"):
        evaluate_run(tiny_config(trained_run, class_names=other), run_dir=trained_run, clip=tiny_clip,
                     dataset=ImageSet(2, labels=True), progress=False, save=False)
    with pytest.raises(ValueError, match="trained for the classes"):
        segment(ImageSet(1)[0]["image"], other, checkpoint=trained_run, clip=tiny_clip)
    with pytest.raises(ValueError, match="trained for the classes"):  # another class count
        load_model_weights(ReCLIPPP(tiny_clip, NAMES + ["bus"], templates=TEMPLATES), trained_run)
    # the matching list loads
    assert load_model_weights(ReCLIPPP(tiny_clip, NAMES, templates=TEMPLATES), trained_run)["class_names"] == NAMES


# ------------------------------------------------------------------------------------------------
# 10. truncated checkpoint file
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["weights", "optimizer", "latest"])
def test_10_truncated_checkpoint_says_what_to_do(tmp_path, trained_run, tiny_clip, which):
    import shutil

    from reclip_core.training import train

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # a finished 1-epoch run (2 steps)
    cfg = tiny_config(run, epoch=1)
    folder = run / "checkpoints"
    state = json.loads((folder / LATEST).read_text())
    victim = folder / {"weights": state["weights"], "optimizer": state["optimizer"], "latest": LATEST}[which]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as err:
        load_checkpoint(run)
    msg = str(err.value)
    assert str(victim) in msg and "truncated" in msg and "--no-resume" in msg
    # resuming hits the same message (not a raw decoder error); --no-resume starts over
    with pytest.raises(ValueError, match="truncated"):
        train(cfg, dataset=ImageSet(8), hypotheses=hypotheses_for(8), clip=tiny_clip, progress=False)
    if which == "weights":  # --no-resume starts over and writes a good checkpoint
        res = train(cfg, dataset=ImageSet(8), hypotheses=hypotheses_for(8), clip=tiny_clip, progress=False,
                    resume=False)
        assert res.steps == 2 and load_checkpoint(run).state["step"] == 2


# ------------------------------------------------------------------------------------------------
# 11. non-finite loss: training stops, the last good checkpoint is kept, the message says so
# ------------------------------------------------------------------------------------------------
class _NanGrad(torch.autograd.Function):
    """Identity forward (a finite loss), NaN backward (a non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_11_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_clip, monkeypatch, poison):
    from reclip_core.model import ReCLIPPP
    from reclip_core.training import NonFiniteLossError, train

    calls = {"n": 0}
    real = ReCLIPPP.loss

    def poisoned(self, out, hyp, generator=None, return_masks=False):
        calls["n"] += 1
        loss = real(self, out, hyp, generator=generator)
        if calls["n"] <= 8:  # 4 images per step: steps 1-2 are fine, step 3 is poisoned
            return loss
        return loss * float("nan") if poison == "loss" else _NanGrad.apply(loss)

    monkeypatch.setattr(ReCLIPPP, "loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:  # 2 steps per epoch: epoch 1 checkpointed at step 2
        train(tiny_config(run, epoch=2), dataset=ImageSet(8), hypotheses=hypotheses_for(8), clip=tiny_clip,
              progress=False)
    msg = str(err.value)
    assert "non-finite" in msg and "step 3" in msg and str(run / "checkpoints" / LATEST) in msg
    assert "lower learning rate" in msg
    ck = load_checkpoint(run)
    assert ck.state["step"] == 2 and ck.state["finished"] is False
    assert all(torch.isfinite(v.float()).all() for v in ck.weights.values())
    log = pd.read_csv(run / "loss.csv")
    assert list(log["step"]) == [1, 2] and np.isfinite(log["loss"]).all()
    assert not (run / "train_summary.json").exists()  # the run is not reported as complete


# ------------------------------------------------------------------------------------------------
# 12-13. a training process SIGKILLed in the middle of a checkpoint write
# ------------------------------------------------------------------------------------------------
KILLED_TRAINER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(int(sys.argv[2]))  # the test process's count: bitwise-equal arithmetic

    from tests.write_faults import fdopen_failing

    def die(fh):  # make the half written durable, then die without any cleanup
        os.fsync(fh.fileno())
        print("killing", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    os.fdopen = fdopen_failing(os.fdopen, "step00000003.safetensors", die)
    import reclip_core
    from reclip_core.training import train
    from tests.train_fixtures import ImageSet, hypotheses_for, tiny_config, TINY_CLIP_JSON

    torch.manual_seed(0)  # as the tiny_clip fixture
    clip = reclip_core.load_clip(TINY_CLIP_JSON, pretrained=None, device="cpu")
    train(tiny_config(sys.argv[1], epoch=2, checkpoint_every=2), dataset=ImageSet(12), hypotheses=hypotheses_for(12),
          clip=clip, progress=False, callback=lambda ev: print("step", ev["step"], flush=True))
    print("finished without being killed", flush=True)
""")


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run (12 images, batch 4: 3 steps per epoch, checkpoints at steps 2 and 3) killed with
    SIGKILL halfway through writing the weights of step 3. Returns (run folder, stdout)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to find which file is being written")
    run = tmp_path_factory.mktemp("killed") / "run"
    script = run.parent / "trainer.py"
    script.write_text(KILLED_TRAINER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script), str(run), str(torch.get_num_threads())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    return run, proc.stdout


def test_12_kill_during_checkpoint_write_keeps_previous_checkpoint(killed_run, tmp_path):
    run, out = killed_run
    assert out.splitlines()[-1] == "killing" and "step 3" in out
    folder = run / "checkpoints"
    ck = load_checkpoint(run)  # the previous checkpoint: complete and loadable
    assert (ck.state["step"], ck.state["epoch"], ck.state["step_in_epoch"]) == (2, 0, 2)
    assert ck.optimizer is not None and all(torch.isfinite(v.float()).all() for v in ck.weights.values())
    names = sorted(p.name for p in folder.iterdir())
    # the half-written file never got its real name: only a hidden temporary file remains
    assert "step00000003.safetensors" not in names
    assert [n for n in names if n.endswith(".tmp")] and all(n.startswith(".step00000003.safetensors.")
                                                          for n in names if n.endswith(".tmp"))
    # the next checkpoint written in that folder (here: a copy) clears the stale temporary file
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    save_checkpoint(copy, ck.weights, dict(ck.state, step=3), ck.optimizer)
    assert not [p for p in copy.iterdir() if p.name.endswith(".tmp")]
    assert load_checkpoint(copy).state["step"] == 3


def test_13_resume_after_kill_equals_uninterrupted_run(killed_run, tmp_path, tiny_clip):
    import shutil

    from reclip_core.training import train

    run = tmp_path / "resumed"
    shutil.copytree(killed_run[0], run)
    after = []
    resumed = train(tiny_config(run, epoch=2, checkpoint_every=2), dataset=ImageSet(12), hypotheses=hypotheses_for(12),
                    clip=tiny_clip, progress=False, callback=lambda ev: after.append(ev["step"]))
    assert after == [3, 4, 5, 6] and resumed.steps == 6  # from the batch after the surviving checkpoint
    full = tmp_path / "full"
    train(tiny_config(full, epoch=2, checkpoint_every=2), dataset=ImageSet(12), hypotheses=hypotheses_for(12),
          clip=tiny_clip, progress=False)
    a, b = load_checkpoint(full), load_checkpoint(run)
    assert a.weights.keys() == b.weights.keys()
    for k in a.weights:
        assert torch.equal(a.weights[k], b.weights[k]), k
    for i in a.optimizer["state"]:
        assert torch.equal(a.optimizer["state"][i]["momentum_buffer"], b.optimizer["state"][i]["momentum_buffer"])
    la, lb = pd.read_csv(full / "loss.csv"), pd.read_csv(run / "loss.csv")
    assert list(lb["step"]) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(la["loss"].to_numpy(), lb["loss"].to_numpy())
    assert b.state["finished"] is True
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------
# 14. disk full while writing results: no partial file, previous files intact, a clear message
#     (the ``disk_full`` and ``existing`` fixtures are in conftest.py)
# ------------------------------------------------------------------------------------------------
def _no_space(err) -> None:
    assert err.value.errno == errno.ENOSPC
    assert "no space left" in str(err.value) and "previous version is unchanged" in str(err.value)


def test_14_disk_full_in_atomic_io_keeps_previous_file(existing, disk_full):
    disk_full(existing.name)
    with pytest.raises(OSError) as err:
        atomic_io.atomic_write_json(existing, {"new": list(range(1000))})
    _no_space(err)
    assert_untouched(existing)
    with pytest.raises(OSError) as err:
        atomic_io.atomic_torch_save({"w": torch.zeros(10_000)}, existing)
    _no_space(err)
    assert_untouched(existing)
    with pytest.raises(OSError) as err:
        atomic_io.atomic_write_files({existing: b"new", existing.parent / "other.txt": b"x"})
    _no_space(err)
    assert_untouched(existing)


def _report(value: int):
    from reclip_core.evaluation import EvalReport
    from reclip_core.metrics import SegMetric

    metrics = {}
    for head in ("maskclip", "reclip++"):
        metrics[head] = {}
        for tag in ("no_pd", "pd"):
            m = SegMetric(3)
            m.update(torch.full((1, 4, 4), value % 3), torch.tensor([[[0, 1, 2, 255]] * 4]))
            metrics[head][tag] = m
    return EvalReport(list(NAMES), metrics, images=value, pd_threshold=0.5)


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_14_disk_full_in_eval_report_save_keeps_every_previous_file(tmp_path, disk_full):
    folder = tmp_path / "eval"
    _report(1).save(folder)
    before = _snapshot(folder)
    assert len(before) == 6 and json.loads(before["metrics.json"])["images"] == 1
    disk_full("per_class_reclippp_no_pd.csv")  # the 5th of 6 files: metrics.json and summary.csv come first
    with pytest.raises(OSError) as err:
        _report(2).save(folder)
    _no_space(err)
    assert _snapshot(folder) == before  # all old, none new: never a new metrics.json beside old tables
    # a first save that fails leaves nothing that looks complete
    with pytest.raises(OSError):
        _report(2).save(tmp_path / "fresh")
    assert not any(p.is_file() for p in (tmp_path / "fresh").rglob("*"))


def test_14_disk_full_in_lab_save_table_keeps_both_files(tmp_path, disk_full):
    from reclip_core.lab import Lab

    lab = Lab("toy", "toyworld", torch.device("cpu"), 0, None, tmp_path)
    lab.save_table(pd.DataFrame({"model": ["MaskCLIP"], "mIoU": [40.0]}), "table")
    before = _snapshot(tmp_path)
    assert set(before) == {"table.csv", "table.md"}
    disk_full("table.md")
    with pytest.raises(OSError) as err:
        lab.save_table(pd.DataFrame({"model": ["ReCLIP++"], "mIoU": [50.0]}), "table")
    _no_space(err)
    assert _snapshot(tmp_path) == before


def test_14_disk_full_during_checkpoint_keeps_previous(tmp_path, disk_full):
    save_checkpoint(tmp_path, {"w": torch.ones(3)}, {"step": 1}, optim_state(1))
    disk_full(".step00000002.optim.pt.")
    with pytest.raises(OSError) as err:
        save_checkpoint(tmp_path, {"w": torch.full((3,), 2.0)}, {"step": 2}, optim_state(2))
    _no_space(err)
    ck = load_checkpoint(tmp_path)
    assert ck.state["step"] == 1 and torch.equal(ck.weights["w"], torch.ones(3))
    assert not (tmp_path / "step00000002.optim.pt").exists()


# ------------------------------------------------------------------------------------------------
# 15. archive with a bad checksum
# ------------------------------------------------------------------------------------------------
def test_15_archive_with_bad_checksum_is_refused(server, tmp_path):
    from data_prep.download import Archive, ChecksumError, verify_file

    f = tmp_path / "VOCtrainval_11-May-2012.tar"
    f.write_bytes(b"tampered" * 100)
    want = hashlib.sha256(b"the real archive").hexdigest()
    arch = Archive(name=f.name, filename=f.name, urls=("https://example.invalid/voc.tar",), checksums={"sha256": want})
    with pytest.raises(ChecksumError) as err:
        verify_file(arch, f, progress=False)
    msg = str(err.value)
    assert want in msg and f"{f}.bad" in msg and "run the same command again" in msg
    assert not f.exists() and Path(f"{f}.bad").read_bytes() == b"tampered" * 100  # moved aside, never used
    # end to end: `python -m data_prep voc` exits 1 and writes no dataset
    reg = registry(tmp_path, server, "voc", {"VOCtrainval_11-May-2012.tar": tar_bytes({"x.txt": b"x"})})
    server.files["/VOCtrainval_11-May-2012.tar"] = b"X" * len(server.files["/VOCtrainval_11-May-2012.tar"])
    assert run_cli("voc", "--root", tmp_path / "voc", "--registry", reg) == 1
    assert not (tmp_path / "voc" / "manifest.json").exists() and not (tmp_path / "voc" / "images").exists()


# ------------------------------------------------------------------------------------------------
# 16. archive with ../ or absolute members
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tar", "zip"])
@pytest.mark.parametrize("member", ["../escape.txt", "a/../../escape.txt", "ABSOLUTE"])
def test_16_traversal_or_absolute_members_refuse_the_whole_archive(tmp_path, kind, member):
    from data_prep.extract import UnsafeArchiveError, safe_extract

    outside = tmp_path / "escape.txt"
    name = str(outside) if member == "ABSOLUTE" else member
    make = write_tar if kind == "tar" else write_zip
    arc = make(tmp_path / f"evil.{kind}", [("ok.txt", b"fine"), (name, b"pwned")])
    dest = tmp_path / "out" / "inner"
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(arc, dest, progress=False)
    msg = str(err.value)
    assert repr(name) in msg and "nothing was written" in msg
    assert not outside.exists() and not (tmp_path / "out" / "escape.txt").exists()
    assert not (dest / "ok.txt").exists()


def test_16_traversal_archive_fails_data_prep(server, tmp_path):
    reg = registry(tmp_path, server, "voc", {"VOCtrainval_11-May-2012.tar": tar_bytes({"../../escape.txt": b"x"})})
    assert run_cli("voc", "--root", tmp_path / "voc", "--registry", reg) == 1
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "voc" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------
# 17. torch.load of an untrusted pickle is refused (weights_only)
# ------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this would create ``path`` (stands in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_17_untrusted_pickle_in_checkpoint_is_not_executed(tmp_path, trained_run, tiny_clip):
    import shutil

    from reclip_core.training import train

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    state = json.loads((run / "checkpoints" / LATEST).read_text())
    sentinel = tmp_path / "code_was_executed"
    optim = run / "checkpoints" / state["optimizer"]
    torch.save({"state": {}, "param_groups": [], "extra": _Payload(sentinel)}, optim)
    with pytest.raises(ValueError, match=r"weights_only=True.*--no-resume") as err:
        load_checkpoint(run)
    assert str(optim) in str(err.value)
    assert not sentinel.exists()
    with pytest.raises(ValueError, match="weights_only"):  # resuming reads the same file
        train(tiny_config(run, epoch=1), dataset=ImageSet(8), hypotheses=hypotheses_for(8), clip=tiny_clip,
              progress=False)
    assert not sentinel.exists()
    # a "released" best_weight.pth carrying a payload
    pth = tmp_path / "best_weight.pth"
    torch.save({"state_dict": {"pe_proj.weight": torch.zeros(1)}, "x": _Payload(sentinel)}, pth)
    with pytest.raises(ValueError, match="weights_only"):
        convert_release_checkpoint(pth)
    assert not sentinel.exists()


# ------------------------------------------------------------------------------------------------
# 18. papermill run with an invalid parameter or profile: fails before any heavy work
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["-p", "bogus", "1"], "unknown notebook parameter(s) ['bogus']; valid: class_names, data_root, dataset, device, epochs, grid, n_images, n_val"),
    (["--profile", "bogus"], "unknown profile 'bogus'; valid profiles: toy, paper"),
    (["--profile", "toy", "--dataset", "voc"], "dataset 'voc' is not part of profile 'toy'; valid: known, toyworld"),
    (["-p", "profile", "paper"], "set profile with --profile"),
])
def test_18_reproduce_rejects_bad_parameters_in_well_under_a_second(tmp_path, args, expected):
    env = dict(os.environ, RECLIP_RESULTS=str(tmp_path / "results"), PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "reclip_core.reproduce", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert not (tmp_path / "results").exists()  # no notebook executed, nothing written
    assert seconds < 3.0, f"took {seconds:.1f}s: the checks must not import papermill or torch first"


def test_18_no_notebook_starts_and_nothing_heavy_is_imported(monkeypatch, tmp_path):
    from reclip_core import reproduce

    executed = []
    fake = type(sys)("papermill")
    fake.execute_notebook = lambda *a, **k: executed.append(a)
    monkeypatch.setitem(sys.modules, "papermill", fake)
    monkeypatch.setattr(reproduce, "RESULTS_DIR", tmp_path / "results")
    for extra, match in (({"bogus": 1}, "unknown notebook parameter"), ({"dataset": "voc"}, "--dataset")):
        with pytest.raises(ValueError, match=match):
            reproduce.run("toy", None, "cpu", extra=extra)
    assert executed == [] and not (tmp_path / "results").exists()
    # the checks themselves import neither papermill nor torch (seconds each on a busy machine)
    code = ("import sys; from reclip_core.reproduce import check_parameters, check_parameter_names; "
            "check_parameters('toy', None, 'auto'); check_parameter_names({'n_val': 3}); "
            "print(sorted(m for m in ('torch', 'papermill') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.strip() == "[]", out.stderr


# ------------------------------------------------------------------------------------------------
# 19. a notebook run that dies mid-notebook leaves no half-executed copy under the real name
# ------------------------------------------------------------------------------------------------
def test_19_failed_notebook_run_leaves_no_partial_notebook(monkeypatch, tmp_path):
    from reclip_core import reproduce

    COMPLETE = '{"cells": [], "metadata": {"ran": "complete"}, "nbformat": 4, "nbformat_minor": 5}\n'

    out = tmp_path / "results" / "toy" / "notebooks"
    out.mkdir(parents=True)
    second = reproduce.notebooks()[1].name
    (out / second).write_text("previous complete run\n")

    def execute_notebook(src, dst, **kw):  # papermill writes its output cell by cell
        Path(dst).write_text("half-executed\n")
        if Path(src).name == second:
            raise RuntimeError("kernel died")
        Path(dst).write_text(COMPLETE)

    fake = type(sys)("papermill")
    fake.execute_notebook = execute_notebook
    monkeypatch.setitem(sys.modules, "papermill", fake)
    monkeypatch.setattr(reproduce, "RESULTS_DIR", tmp_path / "results")
    with pytest.raises(RuntimeError, match="kernel died"):
        reproduce.run("toy", None, "cpu")
    first = reproduce.notebooks()[0].name
    assert json.loads((out / first).read_text())["metadata"] == {"ran": "complete"}
    assert (out / second).read_text() == "previous complete run\n"  # the previous copy is intact
    assert (out / f".{Path(second).stem}.partial.ipynb").is_file()  # kept for inspection, under a name that never looks complete
    assert not (tmp_path / "results" / "toy" / "summary.md").exists()


def test_11_and_14_cli_reports_runtime_faults_without_a_traceback(monkeypatch, capsys, tmp_path):
    """Through ``python -m reclip_core train``: status 1 and the library's message, no traceback."""
    import reclip_core.training as training
    from reclip_core.cli import main

    def nan_train(*a, **k):
        raise training.NonFiniteLossError("training stopped: non-finite loss ... the last good checkpoint is X")

    monkeypatch.setattr(training, "train", nan_train)
    argv = ["train", "--config", "toy", "--set", f"output_dir={tmp_path}", "--set", "device=cpu",
            "--set", "num_threads=null", "--quiet"]  # (toy.yaml sets 1 thread for the whole process)
    assert main(argv) == 1
    assert "error: training stopped: non-finite loss" in capsys.readouterr().err

    def full_train(*a, **k):
        raise OSError(errno.ENOSPC, "no space left on the device ... free space and run the step again")

    monkeypatch.setattr(training, "train", full_train)
    assert main(argv) == 1
    assert "no space left" in capsys.readouterr().err
    monkeypatch.setattr(training, "train", lambda *a, **k: 1 / 0)  # anything else still raises
    with pytest.raises(ZeroDivisionError):
        main(argv)


# ------------------------------------------------------------------------------------------------
# 20 derived files from other settings or CLIP weights
# ------------------------------------------------------------------------------------------------
def test_notebook_lab_sets_a_stale_run_aside_and_retrains(tmp_path, tiny_clip, capsys):
    # 20: after `make toy-clip` the notebooks' Lab sets the old run aside (kept) and retrains
    import copy

    from reclip_core.lab import recompute_if_stale
    from reclip_core.training import train

    run = tmp_path / "r"
    train(tiny_config(run, epoch=1), dataset=ImageSet(8), hypotheses=hypotheses_for(8), clip=tiny_clip, progress=False)
    old_weights = load_checkpoint(run).weights
    other = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        other.visual.conv1.weight.mul_(1.01)
    res = recompute_if_stale(lambda: train(tiny_config(run, epoch=1), dataset=ImageSet(8),
                                           hypotheses=hypotheses_for(8), clip=other, progress=False))
    assert res.steps == 2 and load_checkpoint(run).state["finished"] is True
    (aside,) = tmp_path.glob("r.stale-*")  # the old run is kept beside, untouched
    kept = load_checkpoint(aside).weights
    assert kept.keys() == old_weights.keys() and all(torch.equal(kept[k], old_weights[k]) for k in kept)
    assert "moved to r.stale-" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fewer than one global batch"):  # other errors are not caught
        recompute_if_stale(lambda: train(tiny_config(tmp_path / "q", batch_size=16), dataset=ImageSet(8),
                                         hypotheses=hypotheses_for(8), clip=tiny_clip, progress=False))

