"""Tests for reclip_core.atomic_io: failures never leave partial or stray files."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pandas as pd
import pytest
import torch

from reclip_core import atomic_io
from reclip_core.atomic_io import (
    atomic_open,
    atomic_save_figure,
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
)

from .atomic_io_fixtures import assert_untouched


def test_write_creates_parents_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "b" / "x.bin"
    assert atomic_write_bytes(path, b"\x00\x01hello") == path
    assert path.read_bytes() == b"\x00\x01hello"
    assert os.listdir(path.parent) == ["x.bin"]


def test_successful_write_replaces(existing):
    atomic_write_bytes(existing, b"new")
    assert existing.read_bytes() == b"new"
    assert os.listdir(existing.parent) == ["out.bin"]


def test_exception_midway_keeps_previous_file(existing):
    def chunks():
        yield b"half of the new "
        yield b"content "
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        with atomic_open(existing, "wb") as fh:
            for chunk in chunks():
                fh.write(chunk)
                fh.flush()  # the partial bytes really are in the temp file
    assert_untouched(existing)


def test_keyboard_interrupt_keeps_previous_file(existing):
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(existing, "w") as fh:
            fh.write("partial")
            raise KeyboardInterrupt
    assert_untouched(existing)


def test_failing_replace_keeps_previous_file(existing, monkeypatch):
    def boom(src, dst):
        raise OSError("disk vanished")

    monkeypatch.setattr(atomic_io.os, "replace", boom)
    with pytest.raises(OSError, match="disk vanished"):
        atomic_write_bytes(existing, b"new content")
    assert_untouched(existing)


def test_failing_torch_save_keeps_previous_file(existing):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    big = {"w": torch.zeros(10_000), "bad": Unpicklable()}
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save(big, existing)
    assert_untouched(existing)


def test_temp_file_is_fsynced_in_same_folder_before_replace(existing, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", fd))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.dirname(os.fspath(src)), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_io.os, "fsync", fsync)
    monkeypatch.setattr(atomic_io.os, "replace", replace)
    atomic_write_bytes(existing, b"new")
    kinds = [e[0] for e in events]
    assert "fsync" in kinds and "replace" in kinds
    assert kinds.index("fsync") < kinds.index("replace")
    rep = next(e for e in events if e[0] == "replace")
    assert rep[1] == str(existing.parent) and rep[2] == str(existing)
    assert existing.read_bytes() == b"new"


def test_permissions_new_and_preserved(tmp_path):
    umask = os.umask(0o022)
    try:
        new = atomic_write_text(tmp_path / "new.txt", "x")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644  # not mkstemp's 0o600
        old = tmp_path / "old.txt"
        old.write_text("y")
        old.chmod(0o640)
        atomic_write_text(old, "z")
        assert stat.S_IMODE(old.stat().st_mode) == 0o640
    finally:
        os.umask(umask)


def test_text_written_verbatim(tmp_path):
    path = atomic_write_text(tmp_path / "t.txt", "héllo\r\nworld\n")
    assert path.read_bytes() == "héllo\r\nworld\n".encode("utf-8")


def test_json_format(tmp_path):
    path = atomic_write_json(tmp_path / "m.json", {"b": 1, "a": {"d": [1, 2], "c": "é"}})
    expected = '{\n  "a": {\n    "c": "é",\n    "d": [\n      1,\n      2\n    ]\n  },\n  "b": 1\n}\n'
    assert path.read_text(encoding="utf-8") == expected
    assert json.loads(path.read_text(encoding="utf-8"))["a"]["d"] == [1, 2]


def test_unserialisable_json_touches_nothing(existing):
    with pytest.raises(TypeError):
        atomic_write_json(existing, {"x": object()})
    assert_untouched(existing)


def test_csv_round_trip(tmp_path):
    df = pd.DataFrame({"class": ["sky", "road"], "iou": [12.5, float("nan")], "gt_pixels": [3, 4]})
    path = atomic_write_csv(tmp_path / "t.csv", df)
    back = pd.read_csv(path)
    pd.testing.assert_frame_equal(back, df)
    assert path.read_text().splitlines()[0] == "class,iou,gt_pixels"  # no index column


def test_figure_round_trip(tmp_path):
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    fig = Figure(figsize=(2, 1), dpi=50)
    ax = fig.add_subplot()
    ax.imshow(np.arange(12).reshape(3, 4))
    png = atomic_save_figure(fig, tmp_path / "figs" / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(png).shape[:2] == (50, 100)
    pdf = atomic_save_figure(fig, tmp_path / "figs" / "f.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert sorted(os.listdir(tmp_path / "figs")) == ["f.pdf", "f.png"]
    with pytest.raises(ValueError, match="suffix"):
        atomic_save_figure(fig, tmp_path / "noext")


def test_safetensors_round_trip(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = {
        "pe_proj.weight": torch.randn(4, 6),
        "transposed": torch.randn(3, 5).t(),  # non-contiguous
        "ref": torch.arange(7, dtype=torch.int64),
    }
    path = atomic_save_safetensors(tensors, tmp_path / "ckpt.safetensors", metadata={"epoch": "3"})
    back = load_file(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(back[k], v)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"epoch": "3"}
    with pytest.raises(ValueError, match="str to str"):
        atomic_save_safetensors(tensors, tmp_path / "bad.safetensors", metadata={"epoch": 3})
    assert not (tmp_path / "bad.safetensors").exists()


def test_torch_save_round_trip(tmp_path):
    obj = {"step": 5, "w": torch.randn(3, 3)}
    path = atomic_torch_save(obj, tmp_path / "state.pt")
    back = torch.load(path, weights_only=True)
    assert back["step"] == 5 and torch.equal(back["w"], obj["w"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="append"):
        with atomic_open(tmp_path / "x", "a"):
            pass
    with pytest.raises(ValueError, match="is a folder"):
        atomic_write_bytes(tmp_path, b"x")
    with pytest.raises(ValueError, match="atomic_write_text"):
        atomic_write_bytes(tmp_path / "x", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="atomic_write_bytes"):
        atomic_write_text(tmp_path / "x", b"bytes")  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []
