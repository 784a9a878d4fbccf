"""Toy world: determinism, masks that match the drawn objects, the injected biases,
the reader's split contract and the preset cache."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from reclip_core.datasets.toyworld_render import build_world, render_scene, shape_mask
from reclip_core.datasets.toyworld import (
    IGNORE_INDEX,
    ToyWorld,
    load_preset,
    mask_to_label,
    preset_hash,
    toyworld_class_names,
    world_dir,
)

SMALL = {"pretrain": 24, "train": 8, "val": 16}


@pytest.fixture(scope="module")
def biased():
    return load_preset("biased")


@pytest.fixture(scope="module")
def small_world(tmp_path_factory, biased):
    root = tmp_path_factory.mktemp("toyworld")
    build_world(biased, root=root, sizes=SMALL, progress=False)
    preset = copy.deepcopy(biased)
    for s, n in SMALL.items():
        preset["splits"][s]["size"] = n
    return root, preset


def _palette(preset):
    return np.array([c["colour"] for c in preset["classes"]], dtype=np.float64)


# ---------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_images_and_masks(tmp_path, biased, small_world):
    root, preset = small_world
    build_world(biased, root=tmp_path, sizes=SMALL, progress=False)
    for split in ("pretrain", "val"):
        a = ToyWorld(split, preset, root=root, build=False)
        b = ToyWorld(split, preset, root=tmp_path, build=False)
        for i in range(len(a)):
            ia, ib = a[i], b[i]
            assert ia["id"] == ib["id"]
            assert np.array_equal(np.asarray(ia["image"]), np.asarray(ib["image"]))
            if split == "val":
                assert np.array_equal(ia["label"], ib["label"])
            else:
                assert ia["caption"] == ib["caption"]


def test_scene_depends_only_on_seed_split_and_index(biased):
    a = render_scene(biased, "val", 5)
    b = render_scene(biased, "val", 5)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    c = render_scene(biased, "val", 6)
    assert not np.array_equal(a["image"], c["image"])
    other_seed = copy.deepcopy(biased)
    other_seed["seed"] += 1
    assert not np.array_equal(a["image"], render_scene(other_seed, "val", 5)["image"])
    # train and val share settings but not seeds: different images
    assert not np.array_equal(a["image"], render_scene(biased, "train", 5)["image"])


def test_biased_and_uniform_presets_share_val_and_train(biased):
    uniform = load_preset("uniform")
    for split in ("val", "train"):
        for i in range(5):
            a, b = render_scene(biased, split, i), render_scene(uniform, split, i)
            assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    # ... while their pretraining worlds differ
    assert not all(np.array_equal(render_scene(biased, "pretrain", i)["mask"],
                                  render_scene(uniform, "pretrain", i)["mask"]) for i in range(5))


# ---------------------------------------------------------------------------- masks
def test_masks_match_the_drawn_objects(biased):
    palette = _palette(biased)
    size = biased["image_size"]
    n_obj = 0
    for i in range(60):
        s = render_scene(biased, "val", i)
        img, mask = s["image"].astype(np.float64), s["mask"]
        present = set(np.unique(mask).tolist()) - {0}
        bg = mask == 0
        bg_sat = (img[bg].max(1) - img[bg].min(1)).mean()
        assert bg_sat < 60
        assert present == {o["class"] + 1 for o in s["objects"]}
        assert 1 <= len(s["objects"]) <= biased["objects"]["count"][1]
        for o in s["objects"]:
            n_obj += 1
            sel = mask == o["class"] + 1
            # the labelled pixels lie inside the object's own raster (occluders only remove)
            full = shape_mask(biased["classes"][o["class"]]["shape"], size, o["cx"], o["cy"],
                              o["radius"], o["angle"])
            assert not (sel & ~full).any()
            assert sel.sum() >= biased["objects"]["min_visible"] * full.sum() - 1
            # the pixels under the mask have the object's colour family: nearest base colour in
            # chromaticity (r, g, b) / (r + g + b), which ignores the brightness jitter
            mean = img[sel].mean(0)
            chroma = palette / palette.sum(1, keepdims=True)
            dist = np.linalg.norm(chroma - mean / mean.sum(), axis=1)
            assert np.isclose(dist.min(), dist[o["class"]]), (i, o, mean)
            # ... and are more saturated than the background of their image
            sat = (img[sel].max(1) - img[sel].min(1)).mean()
            assert sat > bg_sat + 20, (i, o, sat, bg_sat)
        # the caption names exactly the visible objects
        for k in range(len(biased["classes"])):
            named = biased["classes"][k]["name"] in s["caption"]
            assert named == (k + 1 in present), (s["caption"], present)
    assert n_obj > 60


def test_reader_converts_masks_like_voc(small_world):
    root, preset = small_world
    val = ToyWorld("val", preset, root=root, build=False)
    item = val[0]
    lab = item["label"]
    assert lab.dtype == np.int64 and lab.shape == (64, 64)
    assert set(np.unique(lab).tolist()) <= set(range(len(val.class_names))) | {IGNORE_INDEX}
    raw = render_scene(preset, "val", 0)["mask"]
    assert np.array_equal(lab, mask_to_label(raw))
    assert np.array_equal(lab == IGNORE_INDEX, raw == 0)
    assert np.array_equal(lab[raw > 0], raw[raw > 0].astype(np.int64) - 1)


# ---------------------------------------------------------------------------- reader contract
def test_split_items_follow_the_architecture(small_world):
    root, preset = small_world
    pre = ToyWorld("pretrain", preset, root=root, build=False)
    train = ToyWorld("train", preset, root=root, build=False)
    val = ToyWorld("val", preset, root=root, build=False)
    assert (len(pre), len(train), len(val)) == (SMALL["pretrain"], SMALL["train"], SMALL["val"])
    assert set(pre[0]) == {"id", "image", "caption"}
    assert set(val[0]) == {"id", "image", "label"}
    assert set(train[0]) == {"id", "image"}
    # the train reader does not even hold the mask (nor caption/objects) column
    assert train.columns == ["id", "image"]
    assert "mask" not in train._ds.column_names
    assert pre[0]["image"].mode == "RGB" and pre[0]["image"].size == (64, 64)
    assert val.class_names == toyworld_class_names() and len(val.class_names) == 10
    with pytest.raises(IndexError):
        val[len(val)]


def test_bad_input_says_what_to_do(tmp_path, small_world):
    root, preset = small_world
    with pytest.raises(ValueError, match="split"):
        ToyWorld("test", preset, root=root)
    with pytest.raises(ValueError, match="preset"):
        load_preset("no-such-preset")
    with pytest.raises(FileNotFoundError, match="data_prep.toyworld"):
        ToyWorld("val", preset, root=tmp_path / "empty", build=False)
    bad = copy.deepcopy(preset)
    bad["splits"]["pretrain"]["class_weights"] = {"black hole": 2.0}
    with pytest.raises(ValueError, match="unknown classes"):
        load_preset(bad)


# ---------------------------------------------------------------------------- cache
def test_cache_is_keyed_by_preset_content_and_reused(tmp_path, biased):
    sizes = {"pretrain": 4, "train": 4, "val": 4}
    w1 = build_world(biased, root=tmp_path, sizes=sizes, splits=["val"], progress=False)
    info = w1 / "val" / "dataset_info.json"
    mtime = info.stat().st_mtime_ns
    w2 = build_world(biased, root=tmp_path, sizes=sizes, splits=["val"], progress=False)
    assert w1 == w2 and info.stat().st_mtime_ns == mtime  # reused, not regenerated
    changed = copy.deepcopy(biased)
    changed["background"]["pixel_std"] += 1
    assert preset_hash(changed) != preset_hash(biased)
    assert world_dir(changed, tmp_path) != world_dir(biased, tmp_path)
    assert preset_hash("biased") == preset_hash(load_preset("biased"))
    assert preset_hash("biased") != preset_hash("uniform")
    assert w1.name.startswith("biased-")


# ---------------------------------------------------------------------------- injected bias
N_STAT = 1500
CHI2_DF9_P001 = 27.877  # chi-square critical value, 9 degrees of freedom, p = 0.001


def _objects(preset, split, n=N_STAT):
    return [o for i in range(n) for o in render_scene(preset, split, i)["objects"]]


@pytest.fixture(scope="module")
def stats(biased):
    return {"pretrain": _objects(biased, "pretrain"), "val": _objects(biased, "val")}


def _chi2_uniform(counts):
    e = counts.sum() / len(counts)
    return float(((counts - e) ** 2 / e).sum())


def test_class_preference_bias_in_pretrain_only(biased, stats):
    names = toyworld_class_names(biased)
    C = len(names)
    counts = {s: np.bincount([o["class"] for o in objs], minlength=C) for s, objs in stats.items()}
    assert _chi2_uniform(counts["pretrain"]) > 10 * CHI2_DF9_P001
    assert _chi2_uniform(counts["val"]) < CHI2_DF9_P001
    share = {s: c / c.sum() for s, c in counts.items()}
    for boosted in ("yellow circle", "purple cross"):
        k = names.index(boosted)
        assert share["pretrain"][k] > 2 * share["val"][k]
        assert abs(share["val"][k] - 1 / C) < 0.03
    for rare in ("cyan hexagon", "pink star"):
        k = names.index(rare)
        assert share["pretrain"][k] < 0.5 * share["val"][k]


def _position_fraction(objs, cls, axis):
    vals = [o["cy" if axis == "y" else "cx"] for o in objs if o["class"] == cls]
    return np.mean(np.array(vals) < 32.0), len(vals)


@pytest.mark.parametrize("name, axis, low_side", [("red circle", "y", True),
                                                   ("red triangle", "y", False),
                                                   ("blue square", "x", True),
                                                   ("blue star", "x", False)])
def test_space_preference_bias_in_pretrain_only(biased, stats, name, axis, low_side):
    k = toyworld_class_names(biased).index(name)
    frac, n = _position_fraction(stats["pretrain"], k, axis)
    assert n > 100
    # 80% strictly in the region, 20% anywhere: ~90% of the centres on the region's side
    assert frac > 0.8 if low_side else frac < 0.2
    frac_val, n_val = _position_fraction(stats["val"], k, axis)
    assert n_val > 100
    # uniform in val: the share on the low side is ~0.5 (binomial sd ~ 0.04 for n ~ 150)
    assert abs(frac_val - 0.5) < 4 * math.sqrt(0.25 / n_val)


def test_unbiased_classes_have_uniform_positions_in_pretrain(biased, stats):
    k = toyworld_class_names(biased).index("green triangle")
    for axis in ("x", "y"):
        frac, n = _position_fraction(stats["pretrain"], k, axis)
        assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / n)


def test_outside_zero_keeps_a_class_strictly_in_its_region(biased):
    strict = copy.deepcopy(biased)
    for reg in strict["splits"]["pretrain"]["positions"].values():
        reg["outside"] = 0.0
    objs = _objects(strict, "pretrain", n=600)
    names = toyworld_class_names(biased)
    frac, n = _position_fraction(objs, names.index("red circle"), "y")
    assert n > 50 and frac == 1.0
    frac, n = _position_fraction(objs, names.index("blue star"), "x")
    assert n > 50 and frac == 0.0
    bad = copy.deepcopy(biased)
    bad["splits"]["pretrain"]["positions"]["red circle"]["outside"] = 1.5
    with pytest.raises(ValueError, match="outside"):
        load_preset(bad)
