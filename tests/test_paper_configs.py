"""Paper-profile configs match the method.md section 3 table."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "reclip_core" / "configs"

# dataset: classes, test short side, crop, PD, MAX_EPOCH, EPOCH, batch, lr, reduce_zero_label
TABLE = {
    "voc": (20, 336, 336, 1.0, 200, 50, 1, 0.01, True),
    "context": (59, 448, 480, 0.85, 400, 50, 1, 0.01, True),
    "ade": (150, 512, 512, 0.5, 600, 100, 1, 0.01, True),
    "cityscapes": (19, 448, 512, 0.5, 300, 50, 16, 0.16, False),
    "coco_stuff27": (27, 512, 512, 0.95, 800, 100, 1, 0.01, False),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_paper_config_matches_table(name):
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    C, test, crop, pd, max_epoch, epoch, batch, lr, rzl = TABLE[name]
    assert cfg["dataset"] == name and cfg["profile"] == "paper" and cfg["class_names"] == name
    assert cfg["num_classes"] == C
    assert (cfg["test_size"], cfg["crop"], cfg["max_epoch"], cfg["epoch"], cfg["batch_size"]) == (
        test, crop, max_epoch, epoch, batch)
    assert cfg["pd_threshold"] == pytest.approx(pd) and cfg["lr"] == pytest.approx(lr)
    assert cfg["momentum"] == pytest.approx(0.9) and cfg["weight_decay"] == pytest.approx(5e-4)
    assert cfg["hypothesis_window"] == int(crop / 6)
    assert cfg["hypothesis_stride"] == int(cfg["hypothesis_window"] / 2)
    assert cfg["reduce_zero_label"] is rzl
    assert cfg["data_root"] == f"data/{name}"
    assert cfg["clip"] == {"arch": "ViT-B-16-quickgelu", "pretrained": "openai"}
    names = [ln for ln in (CONFIGS.parent / "class_names" / f"{name}.txt").read_text().splitlines() if ln.strip()]
    assert len(names) == C


@pytest.mark.parametrize("name", sorted(TABLE))
def test_paper_config_validates_with_the_schema(name):
    config = pytest.importorskip("reclip_core.config")
    cfg = config.load_config(name)
    assert cfg.window == int(TABLE[name][2] / 6) and cfg.stride == int(cfg.window / 2)
