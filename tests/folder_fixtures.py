"""A folder of image files exported from a small toy world (with labels), and the settings that
train on it in seconds: shared by the folder-dataset tests and the DDP test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def repo_env() -> dict:
    """The environment of a subprocess that imports this checkout's library and scripts."""
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def export_toy_folder(out: Path, n: int, tmp: Path, groups: int = 2) -> Path:
    """A toy-world folder of ``n`` labelled images from a small preset (generated in ``tmp``)."""
    from reclip_core.datasets.toyworld import load_preset

    preset = load_preset("biased")
    preset["name"] = "folderworld"
    for split, size in (("pretrain", 1), ("train", 1), ("val", n)):
        preset["splits"][split]["size"] = size
    (tmp / "preset.yaml").write_text(yaml.safe_dump(preset))
    cmd = [sys.executable, "-m", "data_prep.export_folder", "--out", str(out), "--n", str(n), "--preset",
           str(tmp / "preset.yaml"), "--root", str(tmp / "world"), "--groups", str(groups)]
    done = subprocess.run(cmd, cwd=tmp, env=repo_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def folder_overrides(root: Path, run: Path) -> list:
    """``--set`` values of the folder config for an exported toy folder: small sizes, one epoch."""
    return [f"data_root={root}", f"class_names={root / 'classes.txt'}", "test_size=64", "crop=64",
            "hypothesis_window=32", "hypothesis_stride=16", "epoch=1", "max_epoch=2", "batch_size=4",
            "templates=single", "device=cpu", f"output_dir={run}", "log_every=1",
            "clip.arch=toy", "clip.pretrained=biased"]  # not `auto`: the same CLIP where OpenAI's weights are cached
