"""Measure the two biases of CLIP's dense predictions (ReCLIP++ section 2).

* **Class-preference bias**: some classes are predicted far more (or less) often
  than they occur. Measured by each class's predicted pixel share p_c against its
  true share q_c (over non-ignored pixels), their ratio, and the total variation
  distance TVD = 0.5 * sum_c |p_c - q_c| (0 = same distribution, 1 = disjoint).
* **Space-preference bias**: which class is predicted depends on *where* a pixel
  is. The image is cut into a ``grid x grid`` grid on relative coordinates (so
  every H x W maps onto the same cells); per cell, the predicted class
  distribution is compared with the true one, pooled over the dataset. The score
  is the pixel-weighted mean of the per-cell divergences.

Note that a position-independent class bias also raises every cell's divergence;
compare the space score with the class-bias TVD (a space score well above it
means the error depends on position) or look at the per-cell difference array.

Everything is computed from counts, so results are independent of batching:
use ``BiasAccumulator`` for streaming, or the one-shot ``class_bias`` /
``space_bias`` functions. Shares and divergences are fractions (0-1), not percent.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .metrics import check_class_count, check_label_maps, _to_numpy

__all__ = [
    "BiasAccumulator",
    "RegionReadout",
    "RegionReadoutAccumulator",
    "ClassBias",
    "SpaceBias",
    "class_bias",
    "space_bias",
    "total_variation",
    "jensen_shannon",
]

DIVERGENCES = ("tvd", "js")


class ClassBias(NamedTuple):
    """Result of :func:`class_bias`; unpacks as ``(table, tvd)``.

    ``table`` columns: ``class``, ``pred_pixels``, ``true_pixels``, ``pred_share``,
    ``true_share`` (fractions of the non-ignored pixels) and ``ratio`` =
    pred_share / true_share (inf when a class is predicted but absent, NaN when
    neither). ``tvd`` is the total variation distance in [0, 1].
    """

    table: pd.DataFrame
    tvd: float


class SpaceBias(NamedTuple):
    """Result of :func:`space_bias`; unpacks as ``(score, per_cell, diff, cell_pixels)``.

    * ``score``: pixel-weighted mean of the per-cell divergences, in [0, 1];
    * ``per_cell``: float64 [grid, grid] divergence per cell (NaN for empty cells);
    * ``diff``: float64 [grid, grid, C] predicted share minus true share per cell
      and class (NaN for empty cells), for heat-map plots;
    * ``cell_pixels``: int64 [grid, grid] non-ignored pixels counted per cell.
    """

    score: float
    per_cell: np.ndarray
    diff: np.ndarray
    cell_pixels: np.ndarray


def total_variation(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """Total variation distance 0.5 * sum |p - q| along ``axis`` (distributions)."""
    return 0.5 * np.abs(np.asarray(p, float) - np.asarray(q, float)).sum(axis=axis)


def jensen_shannon(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """Jensen-Shannon divergence in bits (base-2 logs, so in [0, 1]) along ``axis``."""
    p = np.asarray(p, float)
    q = np.asarray(q, float)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> np.ndarray:
        # 0 * log(0 / m) = 0 by convention; where a > 0, m > 0 too.
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(a > 0, a * np.log2(a / m), 0.0)
        return terms.sum(axis=axis)

    return 0.5 * kl(p) + 0.5 * kl(q)


def _grid_cells(h: int, w: int, grid: int) -> np.ndarray:
    """Cell index (row * grid + col) of every pixel of an h x w map, int64 [h, w].

    Pixel (i, j) falls in row floor(i * grid / h) and column floor(j * grid / w):
    relative coordinates, so maps of any size share the same cells.
    """
    rows = (np.arange(h, dtype=np.int64) * grid) // h
    cols = (np.arange(w, dtype=np.int64) * grid) // w
    return rows[:, None] * grid + cols[None, :]


class BiasAccumulator:
    """Streaming counts for the class-bias and space-bias metrics.

    Args:
        num_classes: number of classes C (labels ``0..C-1``).
        grid: cells per side of the space grid (default 4).
        ignore_index: ground-truth value of pixels to skip (default 255).

    Attributes:
        pred_counts, true_counts: int64 [grid, grid, C] pixel counts per cell and
            class, over non-ignored pixels only.
    """

    def __init__(self, num_classes: int, grid: int = 4, ignore_index: int = 255) -> None:
        check_class_count(num_classes, ignore_index)
        if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
            raise ValueError(f"grid must be a positive int (cells per side), got {grid!r}.")
        self.num_classes = int(num_classes)
        self.grid = int(grid)
        self.ignore_index = int(ignore_index)
        shape = (self.grid, self.grid, self.num_classes)
        self.pred_counts = np.zeros(shape, dtype=np.int64)
        self.true_counts = np.zeros(shape, dtype=np.int64)

    def update(self, pred: Any, target: Any) -> None:
        """Add integer label maps of shape (..., H, W) (same shape; leading dims = batch)."""
        p_np = _to_numpy(pred, "pred")
        t_np = _to_numpy(target, "target")
        # Validation (dtype, shape, label range) is shared with SegMetric.
        p_kept, t_kept = check_label_maps(p_np, t_np, self.num_classes, self.ignore_index)
        if t_np.ndim < 2:
            raise ValueError(
                f"label maps need at least 2 dims (H, W), got shape {tuple(t_np.shape)}; "
                "pass whole maps, not flattened pixels (positions matter here)."
            )
        if t_np.size == 0:
            return
        h, w = t_np.shape[-2:]
        c, g = self.num_classes, self.grid
        cells = np.broadcast_to(_grid_cells(h, w, g), t_np.shape).reshape(-1)
        cells = cells[t_np.reshape(-1) != self.ignore_index]
        self.pred_counts += np.bincount(cells * c + p_kept, minlength=g * g * c).reshape(g, g, c)
        self.true_counts += np.bincount(cells * c + t_kept, minlength=g * g * c).reshape(g, g, c)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.pred_counts = np.zeros_like(self.pred_counts)
        self.true_counts = np.zeros_like(self.true_counts)

    def merge(self, other: "BiasAccumulator") -> "BiasAccumulator":
        """Add ``other``'s counts into this accumulator in place; returns ``self``."""
        if not isinstance(other, BiasAccumulator):
            raise ValueError(f"can only merge another BiasAccumulator, got {type(other).__name__}.")
        mine = (self.num_classes, self.grid, self.ignore_index)
        theirs = (other.num_classes, other.grid, other.ignore_index)
        if mine != theirs:
            raise ValueError(
                f"cannot merge accumulators with different (num_classes, grid, ignore_index): "
                f"{mine} vs {theirs}; build them with the same settings."
            )
        self.pred_counts += other.pred_counts
        self.true_counts += other.true_counts
        return self

    def _check_nonempty(self) -> None:
        if self.true_counts.sum() == 0:
            raise ValueError(
                "BiasAccumulator has no pixels yet: call update(pred, target) with at "
                "least one non-ignored pixel first."
            )

    def class_bias(self, class_names: Sequence[str] | None = None) -> ClassBias:
        """Per-class predicted vs true pixel shares and their TVD (see :class:`ClassBias`)."""
        self._check_nonempty()
        pred = self.pred_counts.sum(axis=(0, 1))
        true = self.true_counts.sum(axis=(0, 1))
        n = true.sum()
        p, q = pred / n, true / n
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = p / q
        if class_names is None:
            names: list[Any] = list(range(self.num_classes))
        else:
            names = list(class_names)
            if len(names) != self.num_classes:
                raise ValueError(
                    f"class_names has {len(names)} entries but num_classes is {self.num_classes}."
                )
        table = pd.DataFrame(
            {
                "class": names,
                "pred_pixels": pred,
                "true_pixels": true,
                "pred_share": p,
                "true_share": q,
                "ratio": ratio,
            }
        )
        return ClassBias(table, float(total_variation(p, q)))

    def space_bias(self, divergence: str = "tvd") -> SpaceBias:
        """Per-cell predicted vs true class distributions (see :class:`SpaceBias`).

        ``divergence``: ``"tvd"`` (total variation, default) or ``"js"``
        (Jensen-Shannon in bits).
        """
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}.")
        self._check_nonempty()
        n = self.true_counts.sum(axis=-1)  # == pred_counts.sum(-1): same pixels
        with np.errstate(divide="ignore", invalid="ignore"):
            p = self.pred_counts / n[..., None]
            q = self.true_counts / n[..., None]
        fn = total_variation if divergence == "tvd" else jensen_shannon
        per_cell = np.where(n > 0, fn(p, q), np.nan)
        score = float(np.nansum(per_cell * n) / n.sum())
        return SpaceBias(score, per_cell, p - q, n.copy())

    def __repr__(self) -> str:
        return (
            f"BiasAccumulator(num_classes={self.num_classes}, grid={self.grid}, "
            f"ignore_index={self.ignore_index}, pixels={int(self.true_counts.sum())})"
        )


def class_bias(
    pred: Any,
    target: Any,
    num_classes: int,
    ignore_index: int = 255,
    class_names: Sequence[str] | None = None,
) -> ClassBias:
    """One-shot class-preference bias of label maps ``pred`` vs ``target``."""
    acc = BiasAccumulator(num_classes, grid=1, ignore_index=ignore_index)
    acc.update(pred, target)
    return acc.class_bias(class_names)


def space_bias(
    pred: Any,
    target: Any,
    num_classes: int,
    grid: int = 4,
    ignore_index: int = 255,
    divergence: str = "tvd",
) -> SpaceBias:
    """One-shot space-preference bias of label maps ``pred`` vs ``target``."""
    acc = BiasAccumulator(num_classes, grid=grid, ignore_index=ignore_index)
    acc.update(pred, target)
    return acc.space_bias(divergence)


# ---------------------------------------------------------------------------------------------
# Region readout: what the training loss can see
# ---------------------------------------------------------------------------------------------
class RegionReadout(NamedTuple):
    """Per class: how often a true region's *pooled* dense feature, and its patches one by one,
    are classified as the region's class (fractions 0-1; NaN for a class with no region)."""

    table: pd.DataFrame  # class, regions, region_accuracy, patches, patch_accuracy, read_as
    region_accuracy: float  # mean over classes that have regions
    patch_accuracy: float  # mean over classes that have patches


class RegionReadoutAccumulator:
    """Streaming check of the training signal ReCLIP++'s loss has (evaluation code: reads labels).

    The loss (method.md §3) scores ``mean(feat · m_k)`` against the class texts, so it can only
    teach a region what the region's pooled dense feature says. For every ground-truth region
    (one class in one image) this pools ``feat`` over the region, each token weighted by the share
    of its cell the class covers, and classifies the result against ``text``; the same is done for
    each token more than half covered by the class. Pooled accuracy well above the per-patch one
    means pooling fixes noisy patches (room for the method); equal ones mean the loss sees what
    MaskCLIP's argmax sees.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        check_class_count(num_classes, ignore_index)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        C = self.num_classes
        self.region_confusion = np.zeros((C, C), dtype=np.int64)  # true class x pooled reading
        self.patch_total = np.zeros(C, dtype=np.int64)
        self.patch_correct = np.zeros(C, dtype=np.int64)

    def update(self, feat: Any, text: Any, target: Any) -> None:
        """``feat`` [B, D, h, w] dense features, ``text`` [C, D], ``target`` [B, H, W] labels."""
        feat = torch.as_tensor(feat).float()
        text = torch.as_tensor(text).float()
        t_np = _to_numpy(target, "target")
        if feat.ndim != 4 or text.ndim != 2 or text.shape != (self.num_classes, feat.shape[1]):
            raise ValueError(
                f"need feat [B, D, h, w] and text [C={self.num_classes}, D]; got "
                f"{tuple(feat.shape)} and {tuple(text.shape)}."
            )
        if t_np.ndim != 3 or t_np.shape[0] != feat.shape[0]:
            raise ValueError(f"target must be label maps [B={feat.shape[0]}, H, W]; got {t_np.shape}.")
        check_label_maps(np.zeros_like(t_np), t_np, self.num_classes, self.ignore_index)  # target check
        C = self.num_classes
        label = torch.from_numpy(t_np.astype(np.int64))
        label[label == self.ignore_index] = C  # an extra channel, dropped below
        onehot = torch.zeros(label.shape[0], C + 1, *label.shape[-2:])
        onehot.scatter_(1, label[:, None], 1.0)
        # share of each token's cell covered by each class (ignored pixels count as nobody's)
        cover = F.interpolate(onehot[:, :C], size=feat.shape[-2:], mode="area")  # [B, C, h, w]
        mass = cover.sum((2, 3))  # [B, C]
        pooled = torch.einsum("bchw,bdhw->bcd", cover, feat) / mass.clamp_min(1e-12)[..., None]
        reading = (pooled @ text.T).argmax(-1)  # [B, C]
        b_idx, k_idx = torch.nonzero(mass > 0, as_tuple=True)
        np.add.at(self.region_confusion, (k_idx.numpy(), reading[b_idx, k_idx].numpy()), 1)
        patch_pred = torch.einsum("bdhw,cd->bchw", feat, text).argmax(1)  # [B, h, w]
        for k in range(C):
            sel = cover[:, k] > 0.5
            self.patch_total[k] += int(sel.sum())
            self.patch_correct[k] += int((patch_pred[sel] == k).sum())

    def result(self, class_names: Sequence[str] | None = None) -> RegionReadout:
        """Per-class table and the two class-mean accuracies."""
        C = self.num_classes
        names = list(class_names) if class_names is not None else [str(k) for k in range(C)]
        if len(names) != C:
            raise ValueError(f"{len(names)} class names for {C} classes.")
        regions = self.region_confusion.sum(1)
        if regions.sum() == 0:
            raise ValueError("RegionReadoutAccumulator has no regions yet: call update() first.")
        with np.errstate(invalid="ignore", divide="ignore"):
            region_acc = np.diag(self.region_confusion) / regions
            patch_acc = self.patch_correct / self.patch_total
        read_as = [names[int(np.argmax(row))] if row.sum() else "" for row in self.region_confusion]
        table = pd.DataFrame({"class": names, "regions": regions, "region_accuracy": region_acc,
                              "patches": self.patch_total, "patch_accuracy": patch_acc,
                              "read_as": read_as})
        return RegionReadout(table, float(np.nanmean(region_acc)),
                             float(np.nanmean(patch_acc)) if self.patch_total.any() else float("nan"))
