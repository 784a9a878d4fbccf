"""Tests for reclip_core.metrics.SegMetric against independent references."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from reclip_core.metrics import SegMetric

IGN = 255


def brute_force(pred: np.ndarray, target: np.ndarray, c: int, ignore: int = IGN) -> dict:
    """Per-class loops, no confusion matrix: the definitions written out literally."""
    valid = target != ignore
    inter, union, gt, pr = [], [], [], []
    for k in range(c):
        p_k = (pred == k) & valid
        t_k = (target == k) & valid
        inter.append(int((p_k & t_k).sum()))
        union.append(int((p_k | t_k).sum()))
        gt.append(int(t_k.sum()))
        pr.append(int(p_k.sum()))
    iou = [i / u if u > 0 else float("nan") for i, u in zip(inter, union)]
    acc = [i / g if g > 0 else float("nan") for i, g in zip(inter, gt)]
    present = [x for x, u in zip(iou, union) if u > 0]
    return {
        "iou": np.array(iou),
        "acc": np.array(acc),
        "gt": np.array(gt),
        "pred": np.array(pr),
        "miou": 100 * sum(present) / len(present),
        "miou_release": 100 * sum(x for x in present) / c,
        "pa": 100 * sum(inter) / int(valid.sum()),
    }


def random_maps(seed: int, shape=(3, 17, 23), c=6, used=None, ignore_frac=0.15):
    rng = np.random.default_rng(seed)
    used = list(range(c)) if used is None else used
    target = rng.choice(used, size=shape).astype(np.int64)
    # predictions correct ~60 % of the time, so IoUs are far from 0 and 1
    noise = rng.choice(used, size=shape)
    pred = np.where(rng.random(shape) < 0.6, target, noise).astype(np.int64)
    target[rng.random(shape) < ignore_frac] = IGN
    return pred, target


def test_hand_example():
    # gt    [[0, 0], [1, 255]]   pred [[0, 1], [1, 0]]  -> last pixel ignored
    # class 0: inter 1, union 2 -> 0.5 ; class 1: inter 1, union 2 -> 0.5 ; class 2 absent
    m = SegMetric(3)
    m.update(np.array([[0, 1], [1, 0]]), np.array([[0, 0], [1, 255]]))
    np.testing.assert_array_equal(m.confusion, [[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    assert m.miou() == pytest.approx(50.0)
    assert m.miou_release() == pytest.approx(100 / 3)
    assert m.pixel_accuracy() == pytest.approx(200 / 3)
    assert isinstance(m.miou(), float) and isinstance(m.miou_release(), float)
    assert np.isnan(m.iou()[2])


def test_matches_brute_force_with_absent_classes():
    c = 7
    # class 5 never occurs; class 6 only ever predicted (false positives)
    pred, target = random_maps(0, c=c, used=[0, 1, 2, 3, 4])
    pred[0, :3, :3] = 6
    m = SegMetric(c)
    m.update(pred, target)
    ref = brute_force(pred, target, c)
    np.testing.assert_allclose(m.iou(), ref["iou"], equal_nan=True)
    assert m.miou() == pytest.approx(ref["miou"], rel=1e-12)
    assert m.miou_release() == pytest.approx(ref["miou_release"], rel=1e-12)
    assert m.pixel_accuracy() == pytest.approx(ref["pa"], rel=1e-12)
    # the two definitions must really differ here (class 5 has zero union)
    assert m.miou() > m.miou_release() + 1.0
    assert np.isnan(m.iou()[5]) and m.iou()[6] == 0.0


def test_table_matches_brute_force():
    c = 6
    pred, target = random_maps(1, c=c, used=[0, 1, 2, 3, 5])  # class 4 absent
    names = ["sky", "road", "car", "tree", "boat", "person"]
    m = SegMetric(c)
    m.update(torch.from_numpy(pred), torch.from_numpy(target))
    ref = brute_force(pred, target, c)
    tab = m.table(names)
    assert isinstance(tab, pd.DataFrame)
    assert list(tab.columns) == ["class", "iou", "acc", "gt_pixels", "pred_pixels"]
    assert list(tab["class"]) == names
    np.testing.assert_allclose(tab["iou"].to_numpy(), 100 * ref["iou"], equal_nan=True)
    np.testing.assert_allclose(tab["acc"].to_numpy(), 100 * ref["acc"], equal_nan=True)
    np.testing.assert_array_equal(tab["gt_pixels"].to_numpy(), ref["gt"])
    np.testing.assert_array_equal(tab["pred_pixels"].to_numpy(), ref["pred"])
    assert list(m.table()["class"]) == list(range(c))
    with pytest.raises(ValueError, match="class_names has 2 entries"):
        m.table(["a", "b"])


def test_matches_torchmetrics_when_all_classes_present():
    from torchmetrics.classification import MulticlassJaccardIndex

    c = 5
    pred, target = random_maps(2, shape=(4, 19, 21), c=c)
    assert set(np.unique(target)) - {IGN} == set(range(c))
    tm = MulticlassJaccardIndex(num_classes=c, average="macro", ignore_index=IGN)
    expected = 100 * float(tm(torch.from_numpy(pred), torch.from_numpy(target)))
    m = SegMetric(c)
    m.update(pred, target)
    assert m.miou() == pytest.approx(expected, abs=1e-4)
    assert m.miou_release() == pytest.approx(expected, abs=1e-4)


def test_streaming_equals_single_update():
    c = 8
    pred, target = random_maps(3, shape=(10, 13, 11), c=c)
    whole = SegMetric(c)
    whole.update(pred, target)
    streamed = SegMetric(c)
    # uneven chunks, single 2-D maps and torch tensors mixed in
    for lo, hi in [(0, 1), (1, 4), (4, 5), (5, 10)]:
        if hi - lo == 1:
            streamed.update(torch.from_numpy(pred[lo]), torch.from_numpy(target[lo]))
        else:
            streamed.update(pred[lo:hi], target[lo:hi])
    np.testing.assert_array_equal(streamed.confusion, whole.confusion)
    assert streamed.confusion.dtype == np.int64
    assert streamed.miou() == whole.miou()


def test_merge_and_add():
    c = 4
    pred, target = random_maps(4, shape=(6, 9, 9), c=c)
    whole = SegMetric(c)
    whole.update(pred, target)
    a, b = SegMetric(c), SegMetric(c)
    a.update(pred[:2], target[:2])
    b.update(pred[2:], target[2:])
    a_before = a.confusion.copy()
    total = a + b
    np.testing.assert_array_equal(total.confusion, whole.confusion)
    np.testing.assert_array_equal(a.confusion, a_before)  # + must not mutate
    assert a.merge(b) is a
    np.testing.assert_array_equal(a.confusion, whole.confusion)
    a += b
    np.testing.assert_array_equal(a.confusion, whole.confusion + b.confusion)
    with pytest.raises(ValueError, match="same dataset config"):
        a.merge(SegMetric(c + 1))


def test_reset():
    m = SegMetric(3)
    m.update(np.array([[0, 1]]), np.array([[0, 2]]))
    m.reset()
    assert m.confusion.sum() == 0 and m.confusion.shape == (3, 3)
    with pytest.raises(ValueError, match="call update"):
        m.miou()


def test_ignore_pixels_do_not_count():
    c = 3
    pred, target = random_maps(5, shape=(2, 8, 8), c=c)
    m1, m2 = SegMetric(c), SegMetric(c)
    m1.update(pred, target)
    pred2 = pred.copy()
    ign = target == IGN
    assert ign.any()
    pred2[ign] = (pred2[ign] + 1) % c  # changing predictions under ignore changes nothing
    m2.update(pred2, target)
    np.testing.assert_array_equal(m1.confusion, m2.confusion)
    assert m1.confusion.sum() == int((~ign).sum())


@pytest.mark.parametrize(
    "pred, target, match",
    [
        (np.zeros((2, 3), np.int64), np.zeros((3, 2), np.int64), "same shape"),
        (np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64), "integer label map"),
        (np.zeros((2, 2), np.int64), np.zeros((2, 2), np.float64), "integer label map"),
        (np.zeros((2, 2), np.int64), np.array([[0, 7], [1, 2]]), r"target holds labels \[7\]"),
        (np.zeros((2, 2), np.int64), np.array([[0, -1], [1, 2]]), r"target holds labels \[-1\]"),
        (np.array([[0, 3], [1, 255]]), np.zeros((2, 2), np.int64), r"pred holds labels \[3, 255\]"),
    ],
)
def test_bad_inputs_raise(pred, target, match):
    m = SegMetric(3)
    with pytest.raises(ValueError, match=match):
        m.update(pred, target)
    assert m.confusion.sum() == 0  # nothing half-accumulated


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="outside"):
        SegMetric(300, ignore_index=255)
    with pytest.raises(ValueError, match="positive int"):
        SegMetric(0)
