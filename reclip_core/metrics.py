"""Dataset-level segmentation metrics (mmsegmentation's IoU metric, streaming).

``SegMetric`` accumulates one C x C confusion matrix over a whole dataset
(rows = ground truth, columns = prediction) and derives every figure from it, so
the result does not depend on how the data was split into batches, and partial
results from several workers can simply be added (``merge`` / ``+``).

Two mIoU definitions are reported (method.md section 4):

* ``miou()`` - mmseg: mean IoU over the classes whose union is non-zero
  (classes absent from both ground truth and prediction are left out);
* ``miou_release()`` - the ReCLIP++ release: absent classes count as IoU 0 and
  the sum is divided by C.

They coincide when every class occurs. Both are returned in percent (0-100).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

__all__ = ["SegMetric"]


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` (torch tensor, numpy array or array-like) as a numpy array on CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must be an integer label map, got dtype {arr.dtype}. "
            "Convert logits/probabilities to labels first (e.g. logits.argmax(dim=1)) "
            "and cast float label maps with .long() / .astype(np.int64)."
        )
    return arr


def check_class_count(num_classes: Any, ignore_index: int) -> None:
    """``num_classes`` is a positive int and ``ignore_index`` is not one of its class indices."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    if 0 <= ignore_index < num_classes:
        raise ValueError(
            f"ignore_index {ignore_index} is a valid class index for num_classes="
            f"{num_classes}; use a value outside [0, {num_classes}) such as 255."
        )


def check_label_maps(
    pred: Any, target: Any, num_classes: int, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a prediction/ground-truth pair and return the counted pixels.

    Returns two flat int64 arrays (prediction, ground truth) holding only the
    pixels whose ground truth is not ``ignore_index``. Raises ``ValueError`` on a
    shape mismatch, a non-integer dtype, or labels outside ``[0, num_classes)``
    (``ignore_index`` is allowed in the ground truth only).
    """
    p = _to_numpy(pred, "pred")
    t = _to_numpy(target, "target")
    if p.shape != t.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(p.shape)} and "
            f"{tuple(t.shape)}. Upsample the prediction to the label size before the "
            "argmax, and drop the class dimension of the logits."
        )
    p = p.reshape(-1).astype(np.int64, copy=False)
    t = t.reshape(-1).astype(np.int64, copy=False)
    keep = t != ignore_index
    bad_t = keep & ((t < 0) | (t >= num_classes))
    if bad_t.any():
        vals = np.unique(t[bad_t])[:10].tolist()
        raise ValueError(
            f"target holds labels {vals} outside [0, {num_classes}) that are not the "
            f"ignore index {ignore_index}. Map them to {ignore_index} (e.g. VOC's "
            "boundary label or a background class that is not evaluated) or fix num_classes."
        )
    bad_p = (p < 0) | (p >= num_classes)
    if bad_p.any():
        vals = np.unique(p[bad_p])[:10].tolist()
        raise ValueError(
            f"pred holds labels {vals} outside [0, {num_classes}). Predictions must be "
            "class indices (argmax over exactly num_classes logits); do not mark "
            "pixels with the ignore index in the prediction."
        )
    return p[keep], t[keep]


class SegMetric:
    """Streaming confusion-matrix segmentation metric (mmseg ``IoUMetric`` style).

    Args:
        num_classes: number of evaluated classes C; labels are ``0..C-1``.
        ignore_index: ground-truth value of pixels that are not evaluated
            (default 255). Must lie outside ``[0, C)``.

    Attributes:
        confusion: ``np.ndarray[int64]`` of shape (C, C); ``confusion[t, p]`` counts
            pixels with ground truth ``t`` predicted as ``p``.

    All scalar results are python floats in **percent** (0-100).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        check_class_count(num_classes, ignore_index)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    # ------------------------------------------------------------------ accumulation
    def update(self, pred: Any, target: Any) -> None:
        """Add a batch of integer label maps (same shape, any leading dims)."""
        p, t = check_label_maps(pred, target, self.num_classes, self.ignore_index)
        c = self.num_classes
        self.confusion += np.bincount(t * c + p, minlength=c * c).reshape(c, c)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.confusion = np.zeros_like(self.confusion)

    def merge(self, other: "SegMetric") -> "SegMetric":
        """Add ``other``'s counts into this metric in place; returns ``self``."""
        if not isinstance(other, SegMetric):
            raise ValueError(f"can only merge another SegMetric, got {type(other).__name__}.")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                "cannot merge SegMetrics with different settings: "
                f"(num_classes, ignore_index) = {(self.num_classes, self.ignore_index)} vs "
                f"{(other.num_classes, other.ignore_index)}. Build all workers' metrics "
                "from the same dataset config."
            )
        self.confusion += other.confusion
        return self

    def __add__(self, other: "SegMetric") -> "SegMetric":
        out = SegMetric(self.num_classes, self.ignore_index)
        out.confusion = self.confusion.copy()
        return out.merge(other)

    def __iadd__(self, other: "SegMetric") -> "SegMetric":
        return self.merge(other)

    # ------------------------------------------------------------------ counts
    @property
    def gt_pixels(self) -> np.ndarray:
        """Ground-truth pixel count per class, int64 [C]."""
        return self.confusion.sum(axis=1)

    @property
    def pred_pixels(self) -> np.ndarray:
        """Predicted pixel count per class, int64 [C]."""
        return self.confusion.sum(axis=0)

    def _check_nonempty(self) -> None:
        if self.confusion.sum() == 0:
            raise ValueError(
                "SegMetric has no pixels yet: call update(pred, target) with at least one "
                "non-ignored pixel before asking for a score."
            )

    # ------------------------------------------------------------------ results
    def iou(self) -> np.ndarray:
        """Per-class IoU as a fraction (0-1), float64 [C]; NaN where the union is 0."""
        inter = np.diag(self.confusion).astype(np.float64)
        union = self.gt_pixels + self.pred_pixels - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, inter / union, np.nan)

    def miou(self) -> float:
        """mmseg mIoU in percent: mean IoU over classes with non-zero union."""
        self._check_nonempty()
        return float(np.nanmean(self.iou()) * 100.0)

    def miou_release(self) -> float:
        """Release mIoU in percent: absent classes (zero union) count 0, sum / C."""
        self._check_nonempty()
        return float(np.nan_to_num(self.iou(), nan=0.0).sum() / self.num_classes * 100.0)

    def pixel_accuracy(self) -> float:
        """Overall pixel accuracy in percent over the non-ignored pixels."""
        self._check_nonempty()
        return float(np.trace(self.confusion) / self.confusion.sum() * 100.0)

    def class_accuracy(self) -> np.ndarray:
        """Per-class recall as a fraction (0-1), float64 [C]; NaN where no ground truth."""
        gt = self.gt_pixels
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gt > 0, np.diag(self.confusion) / gt, np.nan)

    def table(self, class_names: Sequence[str] | None = None) -> pd.DataFrame:
        """Per-class table sorted by class index.

        Columns: ``class`` (name, or the index when ``class_names`` is None),
        ``iou`` and ``acc`` (recall) in percent (NaN where undefined),
        ``gt_pixels`` and ``pred_pixels``.
        """
        if class_names is None:
            names: list[Any] = list(range(self.num_classes))
        else:
            names = list(class_names)
            if len(names) != self.num_classes:
                raise ValueError(
                    f"class_names has {len(names)} entries but num_classes is "
                    f"{self.num_classes}; pass the dataset's evaluated class list."
                )
        return pd.DataFrame(
            {
                "class": names,
                "iou": self.iou() * 100.0,
                "acc": self.class_accuracy() * 100.0,
                "gt_pixels": self.gt_pixels,
                "pred_pixels": self.pred_pixels,
            }
        )

    def __repr__(self) -> str:
        return (
            f"SegMetric(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={int(self.confusion.sum())})"
        )
