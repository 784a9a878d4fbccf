"""Small in-test datasets and configs for the training-machinery tests (hypothesis, training,
evaluation, checkpoint, CLI, DDP). Items follow docs/architecture.md: ``{"id", "image"}`` for
training splits, ``{"id", "image", "label"}`` for evaluation splits."""
from __future__ import annotations

import subprocess

from pathlib import Path
from typing import Any, Dict

import numpy as np
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
TINY_CLIP_JSON = str(FIXTURES / "tiny_clip.json")
NAMES = ["cat", "dog", "car"]


def scene(i: int, h: int = 40, w: int = 48) -> tuple:
    """A grey image with one coloured square; label = square's class (0..2), 255 elsewhere."""
    rng = np.random.default_rng(i)
    img = np.full((h, w, 3), 128, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
    label = np.full((h, w), 255, np.int64)
    c = i % 3
    y, x = int(rng.integers(0, h - 16)), int(rng.integers(0, w - 16))
    img[y:y + 16, x:x + 16] = [(220, 30, 30), (30, 200, 30), (30, 30, 220)][c]
    label[y:y + 16, x:x + 16] = c
    return Image.fromarray(img), label


class ImageSet:
    """``n`` synthetic images; ``labels=True`` makes it an evaluation split."""

    def __init__(self, n: int, labels: bool = False, sizes=((40, 48), (48, 40), (32, 32))):
        self.n, self.labels, self.sizes = n, labels, sizes
        self.reads = []  # indices read, in order (resume tests count them)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.reads.append(i)
        img, label = scene(i, *self.sizes[i % len(self.sizes)])
        item = {"id": f"img{i:03d}", "image": img}
        if self.labels:
            item["label"] = label
        return item


def tiny_config(run_dir, **overrides):
    """A validated config for the tiny random CLIP (tests/fixtures/tiny_clip.json, 32 px, patch 8)."""
    from reclip_core.config import load_config

    raw = {"dataset": "toyworld", "profile": "custom", "class_names": list(NAMES), "test_size": 32, "crop": 32,
           "pd_threshold": 0.5, "max_epoch": 4, "epoch": 2, "batch_size": 4, "lr": 0.01, "templates": "single",
           "device": "cpu", "clip": {"arch": TINY_CLIP_JSON, "pretrained": None},
           "hypothesis_window": 16, "hypothesis_stride": 8, "output_dir": str(run_dir), "log_every": 1}
    raw.update(overrides)
    return load_config(raw)


def hypotheses_for(n: int) -> Dict[str, list]:
    """Fixed hypotheses (the true class and, for every 4th image, none) without running CLIP."""
    return {f"img{i:03d}": ([] if i % 4 == 3 else [i % 3]) for i in range(n)}


def write_tiny_world_config(tmp: Path, train_size: int = 16, val_size: int = 4, **overrides) -> Path:
    """A run config over a toy world of a few images (generated on first use) and the tiny CLIP."""
    import yaml

    from reclip_core.datasets.toyworld import load_preset

    preset = load_preset("biased")
    preset["name"] = "testworld"
    for split, n in (("pretrain", 1), ("train", train_size), ("val", val_size)):
        preset["splits"][split]["size"] = n
    (tmp / "preset.yaml").write_text(yaml.safe_dump(preset))
    cfg = {"dataset": "toyworld", "profile": "custom", "test_size": 32, "crop": 32, "pd_threshold": 0.5,
           "max_epoch": 4, "epoch": 2, "batch_size": 4, "lr": 0.01, "templates": "single", "device": "cpu",
           "hypothesis_window": 32, "hypothesis_stride": 16, "data_root": str(tmp / "world"),
           "dataset_kwargs": {"preset": str(tmp / "preset.yaml")}, "output_dir": str(tmp / "run"),
           "clip": {"arch": TINY_CLIP_JSON, "pretrained": None}, "log_every": 1}
    cfg.update(overrides)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def refused(proc: subprocess.CompletedProcess, status: int = 2) -> str:
    """The one ``error:`` line of a refused CLI command (and no traceback)."""
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]
