"""Tests for reclip_core.bias_analysis on hand-made maps with known biases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reclip_core.bias_analysis import (
    BiasAccumulator,
    RegionReadoutAccumulator,
    class_bias,
    jensen_shannon,
    space_bias,
    total_variation,
)

IGN = 255


def halves_target() -> np.ndarray:
    """8x8: left half class 0, right half class 1."""
    t = np.zeros((8, 8), np.int64)
    t[:, 4:] = 1
    return t


def test_class_bias_paint_half_of_class0_as_class1():
    c = 3  # class 2 never occurs
    target = halves_target()
    pred = target.copy()
    pred[:4, :4] = 1  # half of class 0's 32 pixels painted as class 1
    # ignored pixels: whatever is predicted there must not count
    target = np.pad(target, ((0, 2), (0, 0)), constant_values=IGN)
    pred = np.pad(pred, ((0, 2), (0, 0)), constant_values=2)
    table, tvd = class_bias(pred, target, c, class_names=["a", "b", "c"])
    assert list(table["class"]) == ["a", "b", "c"]
    np.testing.assert_array_equal(table["pred_pixels"], [16, 48, 0])
    np.testing.assert_array_equal(table["true_pixels"], [32, 32, 0])
    np.testing.assert_allclose(table["pred_share"], [0.25, 0.75, 0.0])
    np.testing.assert_allclose(table["true_share"], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(table["ratio"][:2], [0.5, 1.5])
    assert math.isnan(table["ratio"][2])
    assert tvd == pytest.approx(0.25)
    assert isinstance(tvd, float)


def test_ratio_inf_for_predicted_but_absent_class():
    target = np.zeros((2, 2), np.int64)
    pred = np.array([[0, 0], [0, 1]])
    table, tvd = class_bias(pred, target, 2)
    assert table["ratio"][1] == math.inf
    assert tvd == pytest.approx(0.25)


def test_perfect_prediction_has_no_bias():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(3, 12, 10))
    target[rng.random(target.shape) < 0.1] = IGN
    pred = np.where(target == IGN, 0, target)
    _, tvd = class_bias(pred, target, 5)
    assert tvd == 0.0
    for div in ("tvd", "js"):
        res = space_bias(pred, target, 5, grid=4, divergence=div)
        assert res.score == 0.0
        np.testing.assert_array_equal(res.per_cell, np.zeros((4, 4)))
        np.testing.assert_array_equal(res.diff, np.zeros((4, 4, 5)))
        assert res.cell_pixels.sum() == int((target != IGN).sum())


def test_swap_in_top_half_is_pure_space_bias():
    # Swapping classes 0 and 1 in the top half only keeps the global shares
    # (class TVD 0) but is maximally wrong in every top cell.
    target = halves_target()
    pred = target.copy()
    pred[:4] = 1 - target[:4]
    _, tvd = class_bias(pred, target, 2)
    assert tvd == 0.0
    res = space_bias(pred, target, 2, grid=4)
    np.testing.assert_allclose(res.per_cell[:2], 1.0)  # top two cell rows
    np.testing.assert_allclose(res.per_cell[2:], 0.0)  # bottom two cell rows
    assert res.score == pytest.approx(0.5)  # half the pixels in cells with TVD 1
    # top-left cells: truly class 0, predicted class 1 -> diff (-1, +1)
    np.testing.assert_allclose(res.diff[:2, :2], np.broadcast_to([-1.0, 1.0], (2, 2, 2)))
    np.testing.assert_allclose(res.diff[:2, 2:], np.broadcast_to([1.0, -1.0], (2, 2, 2)))
    np.testing.assert_allclose(res.diff[2:], 0.0)
    np.testing.assert_array_equal(res.cell_pixels, np.full((4, 4), 4))
    js = space_bias(pred, target, 2, grid=4, divergence="js")
    assert js.score == pytest.approx(0.5)  # disjoint cells: JS = 1 bit


def test_swap_in_top_half_unbalanced_grid2():
    # target: columns 0-5 class 0, columns 6-7 class 1; pred swaps 0<->1 in rows 0-3.
    target = np.zeros((8, 8), np.int64)
    target[:, 6:] = 1
    pred = target.copy()
    pred[:4] = 1 - target[:4]
    # By hand, grid 2 (4x4-pixel cells):
    #   top-left: true (1, 0), pred (0, 1) -> TVD 1
    #   top-right: true cols 4,5 class 0 + cols 6,7 class 1 = (.5, .5); swapped -> (.5, .5) -> TVD 0
    #   bottom cells: exact -> 0.  Pixel-weighted mean = 16 * 1 / 64 = 0.25
    res = space_bias(pred, target, 2, grid=2)
    np.testing.assert_allclose(res.per_cell, [[1.0, 0.0], [0.0, 0.0]])
    assert res.score == pytest.approx(0.25)
    # class shares: true (48, 16)/64 = (.75, .25); pred: top (8, 24), bottom (24, 8) -> (.5, .5)
    table, tvd = class_bias(pred, target, 2)
    np.testing.assert_allclose(table["pred_share"], [0.5, 0.5])
    assert tvd == pytest.approx(0.25)
    js = space_bias(pred, target, 2, grid=2, divergence="js")
    np.testing.assert_allclose(js.per_cell, [[1.0, 0.0], [0.0, 0.0]])


def test_js_partial_overlap_value():
    # JS((.5, .5), (1, 0)) in bits = 1.5 - 0.75 * log2(3)  (worked out by hand)
    expected = 1.5 - 0.75 * math.log2(3)
    assert float(jensen_shannon([0.5, 0.5], [1.0, 0.0])) == pytest.approx(expected)
    assert float(total_variation([0.5, 0.5], [1.0, 0.0])) == pytest.approx(0.5)
    # space bias with one cell (grid 1) reproduces it: true all 0, pred half 1
    target = np.zeros((2, 2), np.int64)
    pred = np.array([[0, 1], [0, 1]])
    assert space_bias(pred, target, 2, grid=1, divergence="js").score == pytest.approx(expected)


def test_relative_cells_for_non_divisible_sizes():
    # H=6, grid 4: rows i=0..5 -> cells floor(i*4/6) = 0,0,1,2,2,3; W=4: one column per cell
    acc = BiasAccumulator(2, grid=4)
    acc.update(np.zeros((6, 4), np.int64), np.zeros((6, 4), np.int64))
    np.testing.assert_array_equal(acc.space_bias().cell_pixels, np.outer([2, 1, 2, 1], [1, 1, 1, 1]))
    # unequal cells: the mean is pixel-weighted. Pixel rows 0-1 (cell row 0, 8 of 24
    # pixels) predicted wrong -> TVD 1 there -> score 8/24 (an unweighted mean would be 4/16)
    pred = np.zeros((6, 4), np.int64)
    pred[:2] = 1
    res = space_bias(pred, np.zeros((6, 4), np.int64), 2, grid=4)
    np.testing.assert_allclose(res.per_cell[0], 1.0)
    np.testing.assert_allclose(res.per_cell[1:], 0.0)
    assert res.score == pytest.approx(1 / 3)
    # the same spatial pattern at two sizes lands in the same cells
    small, big = BiasAccumulator(2, grid=2), BiasAccumulator(2, grid=2)
    t8 = halves_target()
    p8 = t8.copy()
    p8[:4] = 1 - t8[:4]
    small.update(p8, t8)
    t12 = np.kron(t8, np.ones((3, 2), np.int64))  # 24x16, same layout
    p12 = np.kron(p8, np.ones((3, 2), np.int64))
    big.update(p12, t12)
    np.testing.assert_allclose(small.space_bias().per_cell, big.space_bias().per_cell)
    np.testing.assert_allclose(small.space_bias().diff, big.space_bias().diff)


def test_streaming_equals_one_shot_and_merge():
    rng = np.random.default_rng(1)
    c = 4
    target = rng.integers(0, c, size=(6, 10, 14))
    target[rng.random(target.shape) < 0.2] = IGN
    pred = rng.integers(0, c, size=target.shape)
    pred[:, :5] = 2  # a space bias: class 2 everywhere in the top half
    one = space_bias(pred, target, c, grid=3)
    acc = BiasAccumulator(c, grid=3)
    for i in range(6):
        acc.update(torch.from_numpy(pred[i]), torch.from_numpy(target[i]))
    s = acc.space_bias()
    assert s.score == pytest.approx(one.score, rel=1e-12)
    assert s.score > 0.2
    np.testing.assert_allclose(s.diff, one.diff)
    # top cells over-predict class 2, bottom cells do not
    assert (s.diff[0, :, 2] > 0.3).all() and (s.diff[2, :, 2] < 0.1).all()
    assert acc.class_bias().tvd == pytest.approx(class_bias(pred, target, c).tvd, rel=1e-12)
    a, b = BiasAccumulator(c, grid=3), BiasAccumulator(c, grid=3)
    a.update(pred[:2], target[:2])
    b.update(pred[2:], target[2:])
    assert a.merge(b) is a
    np.testing.assert_array_equal(a.pred_counts, acc.pred_counts)
    np.testing.assert_array_equal(a.true_counts, acc.true_counts)
    with pytest.raises(ValueError, match="same settings"):
        a.merge(BiasAccumulator(c, grid=4))
    a.reset()
    with pytest.raises(ValueError, match="call update"):
        a.class_bias()


def test_ignore_pixels_do_not_count():
    target = halves_target()
    target[0] = IGN
    pred = np.where(target == IGN, 1, target)
    res = space_bias(pred, target, 2, grid=2)
    assert res.score == 0.0
    assert res.cell_pixels.sum() == 56


def test_empty_cells_are_nan_and_weightless():
    # every pixel of the right half ignored -> right cells empty
    target = halves_target()
    target[:, 4:] = IGN
    pred = np.zeros_like(target)
    pred[:4, :4] = 1
    res = space_bias(pred, target, 2, grid=2)
    assert np.isnan(res.per_cell[:, 1]).all() and np.isnan(res.diff[:, 1]).all()
    np.testing.assert_allclose(res.per_cell[:, 0], [1.0, 0.0])
    assert res.score == pytest.approx(0.5)


@pytest.mark.parametrize(
    "pred, target, match",
    [
        (np.zeros(5, np.int64), np.zeros(5, np.int64), "at least 2 dims"),
        (np.zeros((2, 3), np.int64), np.zeros((3, 2), np.int64), "same shape"),
        (np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64), "integer label map"),
        (np.full((2, 2), 2), np.zeros((2, 2), np.int64), "pred holds labels"),
    ],
)
def test_bad_inputs_raise(pred, target, match):
    acc = BiasAccumulator(2)
    with pytest.raises(ValueError, match=match):
        acc.update(pred, target)
    assert acc.true_counts.sum() == 0


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="divergence must be one of"):
        space_bias(np.zeros((2, 2), np.int64), np.zeros((2, 2), np.int64), 2, divergence="kl")
    with pytest.raises(ValueError, match="grid must be a positive int"):
        BiasAccumulator(2, grid=0)


# ---------------------------------------------------------------------------- region readout
def _region_world():
    """Two 4x4 label maps, 2x2 token grids (one token per 2x2 cell), texts = the unit vectors."""
    e = torch.eye(3)
    text = e
    label = np.full((2, 4, 4), IGN, dtype=np.int64)
    feat = torch.zeros(2, 3, 2, 2)
    # image 0: class 0 fills the top-left cell (read right), class 1 the top-right (read as 2)
    label[0, :2, :2] = 0
    label[0, :2, 2:] = 1
    feat[0, :, 0, 0] = e[0]
    feat[0, :, 0, 1] = e[2]
    feat[0, :, 1, 0] = e[1]  # an ignored cell: must not count for anybody
    # image 1: class 2 fills everything; one token reads class 0, the three others class 2 weakly
    label[1] = 2
    feat[1, :, 0, 0] = e[0]
    for i, j in ((0, 1), (1, 0), (1, 1)):
        feat[1, :, i, j] = 0.6 * e[2] + 0.4 * e[0]
    return feat, text, label


def test_region_readout_pools_regions_and_reads_patches():
    feat, text, label = _region_world()
    acc = RegionReadoutAccumulator(3)
    acc.update(feat, text, label)
    res = acc.result(["a", "b", "c"])
    t = res.table.set_index("class")
    assert t["regions"].tolist() == [1, 1, 1]
    # pooled: a -> a; b -> c (its only token reads c); c's pooled feature
    # (e0 + 3 * (0.6 e2 + 0.4 e0)) / 4 = 0.55 e0 + 0.45 e2 -> read as a, though 3 of its 4 patches
    # read c: the pooled reading is not a vote of the patches
    assert t["region_accuracy"].tolist() == [1.0, 0.0, 0.0]
    assert t.loc["b", "read_as"] == "c" and t.loc["c", "read_as"] == "a"
    # patches: a 1/1, b 0/1, c 3/4 (three tokens lean to c)
    assert t["patches"].tolist() == [1, 1, 4]
    assert t["patch_accuracy"].tolist() == [1.0, 0.0, 0.75]
    assert res.region_accuracy == pytest.approx(1 / 3)
    assert res.patch_accuracy == pytest.approx((1 + 0 + 0.75) / 3)


def test_region_readout_weights_tokens_by_coverage():
    """A token half covered by the class counts half in the pooled feature, and is no patch of it."""
    e = torch.eye(2)
    label = np.full((1, 2, 4), IGN, dtype=np.int64)
    label[0, :, :2] = 0      # token 0 fully class 0
    label[0, 0, 2:] = 0      # token 1 half class 0 (the rest ignored)
    feat = torch.zeros(1, 2, 1, 2)
    feat[0, :, 0, 0] = 0.8 * e[0] + 0.2 * e[1]
    feat[0, :, 0, 1] = e[1]
    acc = RegionReadoutAccumulator(2)
    acc.update(feat, e, label)
    t = acc.result().table
    # weights 1 and 0.5: pooled = (0.8 e0 + 0.2 e1 + 0.5 e1) / 1.5 -> class 0 (equal weights
    # would give 0.8 e0 + 1.2 e1 -> class 1)
    assert t["region_accuracy"].tolist()[0] == 1.0
    assert t["patches"].tolist() == [1, 0]  # the half-covered token is not a patch of class 0
    assert t["patch_accuracy"].tolist()[0] == 1.0


def test_region_readout_refuses_bad_input():
    acc = RegionReadoutAccumulator(3)
    with pytest.raises(ValueError, match="no regions"):
        acc.result()
    feat, text, label = _region_world()
    with pytest.raises(ValueError, match="text"):
        acc.update(feat, text[:2], label)
    with pytest.raises(ValueError, match="target"):
        acc.update(feat, text, label[0])
    bad = label.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError):
        acc.update(feat, text, bad)
