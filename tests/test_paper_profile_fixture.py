"""The paper profile runs end to end on a fixture-sized fake of VOC.

data_prep (from a VOC-format tar given with --archives) -> readers -> hypothesis -> train ->
evaluate, with the paper config ``voc`` and random CLIP weights (mIoU meaningless).
"""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _voc_tar(path: Path, H: int = 40, W: int = 56) -> bytes:
    from data_prep.convert import voc_palette

    def jpg(seed):
        rng = np.random.default_rng(seed)
        buf = io.BytesIO()
        Image.fromarray((rng.random((H, W, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG")
        return buf.getvalue()

    def pal(arr):
        img = Image.new("P", (W, H))
        img.putdata(list(arr.ravel()))
        img.putpalette(voc_palette().ravel().tolist())
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    pre = "VOCdevkit/VOC2012/"
    members = {pre + "ImageSets/Segmentation/train.txt": b"2007_000001\n2007_000002\n",
               pre + "ImageSets/Segmentation/val.txt": b"2007_000003\n2007_000004\n"}
    for k, i in enumerate(["2007_000001", "2007_000002", "2007_000003", "2007_000004"]):
        lab = np.zeros((H, W), np.uint8)
        lab[:, : W // 2] = k + 1
        lab[0, :] = 255
        members[pre + f"JPEGImages/{i}.jpg"] = jpg(k)
        members[pre + f"SegmentationClass/{i}.png"] = pal(lab)
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path.read_bytes()


@pytest.mark.slow
def test_paper_profile_voc_fixture_end_to_end(tmp_path):
    pytest.importorskip("open_clip")
    data = _voc_tar(tmp_path / "VOCtrainval_11-May-2012.tar")
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({
        "archives": {"VOCtrainval_11-May-2012.tar": {"filename": "VOCtrainval_11-May-2012.tar", "urls": [],
                                                     "login": True, "size": len(data),
                                                     "sha256": hashlib.sha256(data).hexdigest()}},
        "datasets": {"voc": ["VOCtrainval_11-May-2012.tar"]}}))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")

    def run(*args):
        r = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout + r.stderr

    run("data_prep", "voc", "--root", "data/voc", "--archives", str(tmp_path), "--registry", str(reg),
        "--no-progress")
    assert (tmp_path / "data" / "voc" / "manifest.json").is_file()
    common = ["--config", "voc", "--set", "clip.pretrained=null", "--set", "epoch=1", "--set", "max_epoch=1",
              "--set", "crop=48", "--set", "test_size=48", "--set", "templates=single",
              "--set", "hypothesis_input_size=64", "--set", "hypothesis_window=16", "--set", f"output_dir={tmp_path / 'run'}", "--quiet"]
    run("reclip_core", "hypothesis", *common)
    run("reclip_core", "train", *common)
    out = run("reclip_core", "evaluate", *common)
    assert "reclip++" in out and "2 images" in out
