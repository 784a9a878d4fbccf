"""Toy CLIP: committed weights and their sha256, the loader's guarantees, the tokenizer
contract, and image-level zero-shot accuracy on the toy world's val split."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from reclip_core.datasets.toyworld_render import render_scene
from reclip_core.datasets.toyworld import load_preset, mask_to_label, preset_hash, toyworld_class_names
from reclip_core.toy_clip import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ToyTokenizer,
    build_toy_clip,
    load_toy_clip,
    load_toy_config,
    toy_clip_dir,
)

N_VAL = 300


@pytest.fixture(scope="module")
def config():
    return load_toy_config()


@pytest.fixture(scope="module")
def tok(config):
    return ToyTokenizer.from_config(config)


# ---------------------------------------------------------------------------- committed weights
@pytest.mark.parametrize("preset,folder,seed", [("biased", "biased", 0), ("uniform", "uniform", 0),
                                                ("biased", "biased_seed1", 1)])
def test_committed_weights_match_their_sha256(preset, folder, seed, config):
    d = toy_clip_dir(folder)
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    digest = hashlib.sha256((d / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert digest == manifest["sha256"]
    assert manifest["preset"] == preset and manifest["seed"] == seed
    # pretrained on the world of the preset as committed (a preset edit needs `make toy-clip`)
    assert manifest["data_hash"] == preset_hash(preset), (folder, manifest["data_hash"])
    for key in ("seed", "steps", "batch_size", "data_hash", "wall_time_s", "metrics", "amp"):
        assert key in manifest, key
    # the pretraining budget: <= 15 min of pretraining on 2 cores
    assert manifest["threads"] == 2 and manifest["wall_time_s"] <= 15 * 60, manifest["wall_time_s"]
    assert (d / WEIGHTS_FILE).stat().st_size < 10_000_000  # "a few MB"
    # the model config stored beside the weights is the repository's config
    assert json.loads((d / CONFIG_FILE).read_text()) == config


def test_tampered_or_missing_weights_are_refused(tmp_path):
    d = tmp_path / "toy_clip"
    shutil.copytree(toy_clip_dir("biased"), d)
    load_toy_clip(d)  # an intact copy loads
    raw = bytearray((d / WEIGHTS_FILE).read_bytes())
    raw[-3] ^= 0xFF
    (d / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="make toy-clip"):
        load_toy_clip(d)
    (d / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="make toy-clip"):
        load_toy_clip(d)


def test_loaded_model_is_a_frozen_open_clip_model_with_tokenizer():
    import open_clip

    m = load_toy_clip()
    assert isinstance(m, open_clip.CLIP)
    assert not m.training
    assert not any(p.requires_grad for p in m.parameters())
    assert m.tokenizer.context_length == m.context_length == 20
    assert m.visual.conv1.kernel_size == (8, 8) and m.visual.transformer.width == 128
    assert len(m.visual.transformer.resblocks) == 4
    assert m.visual.transformer.resblocks[0].attn.num_heads == 4
    assert type(m.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert m.toy_manifest["preset"] == "biased"
    u = load_toy_clip(preset="uniform")
    assert u.toy_manifest["preset"] == "uniform"
    assert not torch.equal(u.visual.proj, m.visual.proj)


def test_build_from_config_gives_random_open_clip_model(config):
    a, b = build_toy_clip(config), build_toy_clip()
    assert a.token_embedding.num_embeddings == len(config["tokenizer"]["vocab"])
    assert sum(p.numel() for p in a.parameters()) < 3_000_000
    assert set(a.state_dict()) == set(b.state_dict())
    bad = json.loads(json.dumps(config))
    bad["text_cfg"]["vocab_size"] += 1
    with pytest.raises(ValueError, match="vocab"):
        build_toy_clip(bad)


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_contract(tok):
    ids = tok(["a photo of a red circle.", "red circle"])
    assert ids.dtype == torch.long and ids.shape == (2, 20)
    assert tok.eot_token_id == tok.vocab_size - 1  # the largest id: argmax pooling finds it
    assert tok.sot_token_id == tok.vocab_size - 2 and tok.pad_token_id == 0
    for row, n_words in zip(ids, (7, 2)):
        assert row[0] == tok.sot_token_id
        assert row[n_words + 1] == tok.eot_token_id
        assert int(row.argmax()) == n_words + 1
        assert (row[n_words + 2:] == 0).all() and (row[1:n_words + 1] > 1).all()
    assert tok.decode(ids[0]) == "a photo of a red circle ."
    # Reference prompt slots: the first 3 tokens after sot of a class name hold eot for 2 words
    assert ids[1, 1:4].tolist() == [tok.encoder["red"], tok.encoder["circle"], tok.eot_token_id]
    # unknown words -> <unk>; case-insensitive; str accepted
    assert tok("A Tattoo of the BLUE star")[0, 1:7].tolist() == [
        tok.encoder["a"], tok.unk_token_id, tok.encoder["of"], tok.encoder["the"],
        tok.encoder["blue"], tok.encoder["star"]]
    # truncation keeps eot last
    long = tok(["red " * 40])[0]
    assert long[-1] == tok.eot_token_id and (long[1:-1] == tok.encoder["red"]).all()
    # every word of every class name is in the vocabulary
    for name in toyworld_class_names():
        assert tok.unk_token_id not in tok.encode(name), name


def test_every_caption_word_is_known_or_deliberately_unknown(tok):
    preset = load_preset("biased")
    templates = preset["captions"]["templates"]
    unknown = {w for t in templates for w in tok.split(t.replace("{}", "")) if w not in tok.encoder}
    assert unknown  # some captions carry <unk> on purpose, so its embedding is trained
    assert unknown <= {"my", "black", "white", "sculpture", "tattoo", "cartoon", "art", "video",
                       "game", "origami", "many", "graffiti"}


def test_text_pooling_reads_the_eot_slot():
    m = load_toy_clip()
    ids = m.tokenizer(["a photo of a red circle.", "blue star"])
    x = m.token_embedding(ids) + m.positional_embedding
    x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
    eot = (ids == m.tokenizer.eot_token_id).float().argmax(1)
    manual = x[torch.arange(2), eot] @ m.text_projection
    assert torch.allclose(m.encode_text(ids), manual, atol=1e-5)


# ---------------------------------------------------------------------------- zero-shot
@pytest.fixture(scope="module")
def val_batch():
    preset = load_preset("biased")
    scenes = [render_scene(preset, "val", i) for i in range(N_VAL)]
    images = torch.from_numpy(np.stack([s["image"] for s in scenes])).permute(0, 3, 1, 2)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    x = (images.float() / 255 - mean) / std
    present = [{o["class"] for o in s["objects"]} for s in scenes]
    labels = torch.from_numpy(mask_to_label(np.stack([s["mask"] for s in scenes])).astype(np.int64))
    return x, present, labels


def _text_features(model, names, templates):
    feats = []
    for name in names:
        ids = model.tokenizer([t.format(name) for t in templates])
        f = torch.nn.functional.normalize(model.encode_text(ids), dim=-1).mean(0)
        feats.append(torch.nn.functional.normalize(f, dim=-1))
    return torch.stack(feats)


# Measured on the committed weights (seed 0, 1400 steps x 128, bf16; objects of radius 11-20 px),
# top-1 in the image's classes: biased 93.7% (1000 val images, caption templates) / 94.0% (these
# 300, "a photo of a {}."), uniform 98.2% / 99.7%. With the earlier radius 7-13 the
# biased model reached only 89.6% / 89.0% (README, Status).
@pytest.mark.parametrize("preset", ["biased", "uniform"])
def test_zero_shot_image_level_accuracy_on_val(preset, val_batch):
    """Class-token path, text features from the class names in the prompt "a photo of a {}.":
    the top-1 class must be one of the image's classes for >= 90% of val images."""
    x, present, _ = val_batch
    m = load_toy_clip(preset=preset)
    names = toyworld_class_names()
    with torch.no_grad():
        text = _text_features(m, names, ["a photo of a {}."])
        emb = torch.nn.functional.normalize(m.encode_image(x), dim=-1)
        top1 = (emb @ text.T).argmax(-1).tolist()
    acc = np.mean([t in p for t, p in zip(top1, present)])
    assert acc >= 0.90, acc


def test_maskclip_val_miou_at_least_three_times_chance(val_batch):
    """Dense MaskCLIP (85 templates, argmax) of the committed biased toy CLIP on val,
    against the expected mIoU of uniformly random pixel classes."""
    from reclip_core.metrics import SegMetric
    from reclip_core.model import MaskCLIP
    from reclip_core.toy_lab import expected_chance_miou

    x, _, labels = val_batch
    names = toyworld_class_names()
    model = MaskCLIP(load_toy_clip(preset="biased"), names)
    seg = SegMetric(len(names))
    with torch.no_grad():
        logits = model(x)["logits"]
    logits = torch.nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear",
                                             align_corners=False)
    seg.update(logits.argmax(1), labels)
    chance = expected_chance_miou(seg.table()["gt_pixels"].values)
    assert 3 < chance < 10  # about 1 / (2C - 1) for C = 10
    assert seg.miou() >= 3 * chance, (seg.miou(), chance)


# ---------------------------------------------------------------------------- lab helpers
def test_toy_clip_goes_through_the_suite_api():
    from reclip_core.backbone import dense_features, encode_image_cls
    from reclip_core.clip_loading import load_clip

    m = load_clip("toy", device="cpu")
    assert m.toy_manifest["preset"] == "biased"
    x = torch.randn(2, 3, 64, 64)
    feat, hw = dense_features(m, x)
    assert hw == (8, 8) and feat.shape == (2, 128, 8, 8)
    assert torch.allclose(feat.norm(dim=1), torch.ones(2, 8, 8), atol=1e-5)
    ref = torch.nn.functional.normalize(m.encode_image(x), dim=-1)
    assert torch.allclose(encode_image_cls(m, x), ref, atol=1e-4)


def test_chance_miou_and_lookalike_pairs():
    from reclip_core.toy_lab import _PairCounter, expected_chance_miou, lookalike_pairs

    assert expected_chance_miou(np.full(10, 1000)) == pytest.approx(100 / 19)
    assert expected_chance_miou(np.array([1000, 0, 1000])) == pytest.approx(
        100 * (1000 / 3) / (1000 + 2000 / 3 - 1000 / 3))
    biased, uniform = load_preset("biased"), load_preset("uniform")
    names = toyworld_class_names()
    pairs = lookalike_pairs(biased)
    assert [(names[p["a"]], names[p["b"]], p["axis"], p["a_low"]) for p in pairs] == [
        ("red circle", "red triangle", "y", True), ("blue square", "blue star", "x", True)]
    assert lookalike_pairs(uniform) == []
    # hand-made maps: a red-circle object spanning the image; prediction = "class of the region"
    label = np.full((1, 8, 8), 255)
    label[0, :, 2:6] = 0                                        # red circle, top and bottom
    follow = np.where(np.arange(8)[:, None] < 4, 0, 1) * np.ones((1, 8, 8), int)
    c = _PairCounter(pairs, 8)
    c.update(follow, label)
    r = c.results(names)[0]
    assert r["pixels"] == 32 and r["follow_position"] == 1.0 and r["pair_accuracy"] == 0.5
    c = _PairCounter(pairs, 8)
    c.update(np.zeros((1, 8, 8), int), label)                    # always right
    r = c.results(names)[0]
    assert r["follow_position"] == 0.5 and r["pair_accuracy"] == 1.0


# ---------------------------------------------------------------------------- pretraining losses
def test_pretraining_forward_gives_the_image_embedding_and_the_dense_features():
    from reclip_core.backbone import dense_features, image_and_dense_features

    m = load_toy_clip()
    x = torch.randn(3, 3, 64, 64)
    image, dense, hw = image_and_dense_features(m, x)
    assert hw == (8, 8)
    assert torch.allclose(image, torch.nn.functional.normalize(m.encode_image(x), dim=-1), atol=1e-5)
    feat, _ = dense_features(m, x)
    assert torch.allclose(dense, feat.flatten(2).transpose(1, 2), atol=1e-5)


def test_box_regions_cover_the_patch_cells_of_one_present_object():
    from data_prep.pretrain_toy_clip import box_regions

    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 10:20, 30:33] = 3   # class 2: rows 10-19 -> patch rows 1-2; cols 30-32 -> patch cols 3-4
    masks[1, 40:48, 0:8] = 1     # class 0, alone in its image: exactly patch (5, 0)
    gen = torch.Generator().manual_seed(0)
    weight, target = box_regions(masks, (8, 8), gen)
    assert target.tolist() == [2, 0]
    w0 = weight[0].view(8, 8)
    assert w0.sum() == 4 and w0[1:3, 3:5].all()
    w1 = weight[1].view(8, 8)
    assert w1.sum() == 1 and w1[5, 0] == 1
    # with two objects in an image, both get drawn over seeds, and the box always follows the draw
    masks[0, 50:60, 50:60] = 5
    drawn = {int(box_regions(masks, (8, 8), torch.Generator().manual_seed(s))[1][0]) for s in range(20)}
    assert drawn == {2, 4}
