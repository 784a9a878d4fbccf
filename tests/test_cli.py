"""CLI: config errors list the valid choices; hypothesis → train → evaluate → segment end to end
on a toy world of a few images with the tiny CLIP."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from reclip_core.cli import main
from reclip_core.config import available_configs, load_config, valid_keys

from .train_fixtures import NAMES, write_tiny_world_config


def _fail(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_unknown_config_key_lists_valid_keys(capsys):
    err = _fail(capsys, ["train", "--config", "voc", "--set", "max_epochs=5"])
    assert "unknown config key 'max_epochs'" in err
    for key in ("max_epoch", "epoch", "batch_size", "clip.arch", "hypothesis_window"):
        assert key in err


def test_unknown_key_in_a_config_file_is_an_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: voc\ntest_size: 336\ncrop: 336\npd_threshold: 1.0\nmax_epoch: 2\nepoch: 1\n"
                    "batch_size: 1\nlr: 0.01\nlearning_rate: 0.1\n")
    err = _fail(capsys, ["train", "--config", str(path)])
    assert "learning_rate" in err and "valid keys" in err


def test_unknown_dataset_lists_valid_datasets(capsys):
    err = _fail(capsys, ["hypothesis", "--config", "voc", "--set", "dataset=imagenet"])
    assert "unknown dataset 'imagenet'" in err
    for name in ("voc", "context", "ade", "cityscapes", "coco_stuff27", "toyworld"):
        assert name in err


def test_unknown_config_and_profile_list_valid_ones(capsys):
    err = _fail(capsys, ["evaluate", "--config", "pascal"])
    assert "unknown config 'pascal'" in err and "voc" in err and "toy" in err
    err = _fail(capsys, ["evaluate", "--config", "voc", "--set", "profile=fancy"])
    assert "unknown profile 'fancy'" in err and "paper" in err


def test_set_values_are_type_checked(capsys):
    assert "expects float" in _fail(capsys, ["train", "--config", "voc", "--set", "lr=fast"])
    assert "expects int" in _fail(capsys, ["train", "--config", "voc", "--set", "batch_size=2.5"])
    assert "expects bool" in _fail(capsys, ["train", "--config", "voc", "--set", "flip=3"])
    assert "key=value" in _fail(capsys, ["train", "--config", "voc", "--set", "lr"])
    cfg = load_config("voc", ["lr=0.02", "clip.pretrained=null", "batch_size=2", "scale_range=[1, 1.5]"])
    assert (cfg.lr, cfg.clip.pretrained, cfg.batch_size, cfg.scale_range) == (0.02, None, 2, [1, 1.5])
    with pytest.raises(ValueError, match="must not exceed max_epoch"):
        load_config("voc", ["epoch=500"])


def test_scientific_notation_is_a_float_on_the_command_line_and_in_files(tmp_path):
    # PyYAML reads "1e-4" (YAML 1.1) as a string; a float key must still take it as 0.0001
    cfg = load_config("voc", ["lr=1e-4", "weight_decay=5E-4", "gumbel_scale=+2e1"])
    assert (cfg.lr, cfg.weight_decay, cfg.gumbel_scale) == (1e-4, 5e-4, 20.0)
    path = tmp_path / "c.yaml"
    path.write_text("dataset: voc\ntest_size: 336\ncrop: 336\npd_threshold: 1.0\nmax_epoch: 2\nepoch: 1\n"
                    "batch_size: 1\nlr: 1e-3\n")
    assert load_config(path).lr == 1e-3
    with pytest.raises(ValueError, match="expects int"):
        load_config("voc", ["batch_size=1e3"])  # only float keys convert: a count stays strict
    with pytest.raises(ValueError, match="expects float"):
        load_config("voc", ["lr=1e-4x"])


def test_every_shipped_config_loads():
    names = available_configs()
    assert {"voc", "context", "ade", "cityscapes", "coco_stuff27", "toy"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.window >= 1 and cfg.stride >= 1 and cfg.epoch <= cfg.max_epoch
    voc = load_config("voc")
    assert (voc.window, voc.stride) == (56, 28)  # int(336 / 6), int(56 / 2)
    assert "clip.arch" in valid_keys()


def test_toy_config_uses_the_toy_clip_at_its_own_size(monkeypatch):
    import reclip_core
    import reclip_core.hypothesis as hyp
    from reclip_core.text import text_embeddings

    cfg = load_config("toy")
    assert cfg.dataset == "toyworld" and cfg.clip.arch == "toy" and cfg.profile == "toy"
    assert cfg.hypothesis_input_size is None  # → the toy CLIP's own image size, read from the model
    clip = reclip_core.load_clip("toy", pretrained=None, device="cpu")  # random weights, same architecture
    shapes = []
    real = hyp.encode_image_cls
    monkeypatch.setattr(hyp, "encode_image_cls", lambda c, x, **k: (shapes.append(tuple(x.shape)), real(c, x, **k))[1])
    text = text_embeddings(clip, ["red circle", "blue star"], ["a photo of a {}."])
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    list(hyp.window_vote(clip, [("a", img)], text, window=cfg.window, stride=cfg.stride))
    assert shapes == [(9, 3, 64, 64)]  # 3 x 3 windows of 32 px, each resized to the toy CLIP's 64 px, not 224


@pytest.mark.timeout(600)
def test_hypothesis_train_evaluate_segment(tmp_path, capsys):
    cfg = str(write_tiny_world_config(tmp_path, train_size=8, val_size=4, epoch=1))
    assert main(["hypothesis", "--config", cfg, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "hypotheses: 8 images of split 'train'" in out
    data = json.loads((tmp_path / "run" / "hypotheses.json").read_text())
    assert len(data["hypotheses"]) == 8 and data["settings"]["window"] == 32

    assert main(["hypothesis", "--config", cfg, "--split", "val", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "precision" in out and "recall" in out  # a labelled split is scored
    assert (tmp_path / "run" / "hypotheses_val.json").is_file()

    assert main(["train", "--config", cfg, "--quiet"]) == 0
    assert "trained 1 epochs, 2 steps" in capsys.readouterr().out
    assert main(["evaluate", "--config", cfg, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "maskclip" in out and "reclip++" in out and "mIoU" in out
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert set(metrics["results"]) == {"maskclip", "rectified", "reclip++"}

    from reclip_core.datasets.toyworld import ToyWorld

    img_path = tmp_path / "img.png"
    ToyWorld("val", preset=str(tmp_path / "preset.yaml"), root=tmp_path / "world")[0]["image"].save(img_path)
    png = tmp_path / "seg.png"
    assert main(["segment", "--config", cfg, "--image", str(img_path), "--checkpoint", str(tmp_path / "run"),
                 "--out", str(png)]) == 0
    assert "reclip++" in capsys.readouterr().out
    assert Image.open(png).size[0] > 100
    # MaskCLIP for any classes, no checkpoint
    assert main(["segment", "--config", cfg, "--image", str(img_path), "--classes", "sky, red circle",
                 "--out", str(png)]) == 0
    assert "maskclip" in capsys.readouterr().out


def test_segment_function(tiny_clip, tmp_path):
    from reclip_core.segment import segment

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 50, 3), dtype=np.uint8))
    res = segment(img, NAMES, clip=tiny_clip, templates=["a photo of a {}."])
    assert res.mask.shape == (37, 50) and res.mask.dtype == np.int64
    assert res.mask.min() >= 0 and res.mask.max() < 3 and res.model == "maskclip"
    assert len(res.figure.axes) == 2
    with pytest.raises(FileNotFoundError):
        segment(tmp_path / "missing.png", NAMES, clip=tiny_clip)


def test_segment_refuses_a_checkpoint_for_other_classes(tmp_path, tiny_clip):
    from reclip_core.segment import segment
    from reclip_core.training import train

    from .train_fixtures import ImageSet, hypotheses_for, tiny_config

    train(tiny_config(tmp_path / "run", epoch=1), dataset=ImageSet(8), hypotheses=hypotheses_for(8),
          clip=tiny_clip, progress=False)
    img = ImageSet(1)[0]["image"]
    with pytest.raises(ValueError, match="trained for the classes"):
        segment(img, ["cat", "dog", "bus"], checkpoint=tmp_path / "run", clip=tiny_clip)
    res = segment(img, NAMES, checkpoint=tmp_path / "run", clip=tiny_clip)
    assert res.model == "reclip++" and res.mask.shape == (40, 48)
