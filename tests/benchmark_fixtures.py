"""Shared helpers for the benchmark-reader tests (test_benchmark_readers, test_faults): a converted
benchmark layout (docs/architecture.md) written into a temp folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

H, W = 6, 9


def layout(root: Path, ids_train, ids_val, label_value=0, image_mode="RGB", suffix=".jpg", manifest=True):
    for split, ids in (("train", ids_train), ("val", ids_val)):
        d = root / "images" / split
        d.mkdir(parents=True, exist_ok=True)
        for i in ids:
            if image_mode == "P":
                img = Image.new("P", (W, H), 3)
                img.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 200, 100, 50] + [0] * (256 * 3 - 12))
            elif image_mode == "RGBA":
                img = Image.new("RGBA", (W, H), (255, 0, 0, 40))
            elif image_mode == "L":
                img = Image.new("L", (W, H), 77)
            else:
                img = Image.new("RGB", (W, H), (1, 2, 3))
            img.save(d / f"{i}{suffix}")
    lab = root / "labels" / "val"
    lab.mkdir(parents=True, exist_ok=True)
    for i in ids_val:
        arr = np.full((H, W), label_value, np.uint8)
        arr[0, :4] = [0, 1, 20, 255]
        Image.fromarray(arr).save(lab / f"{i}.png")
    if manifest:
        (root / "manifest.json").write_text(json.dumps({"counts": {"train": len(ids_train), "val": len(ids_val)}}))
    return root
