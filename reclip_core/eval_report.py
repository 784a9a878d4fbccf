"""The scores of one evaluation (:func:`reclip_core.evaluation.evaluate`): per head and PD setting a
streaming :class:`~reclip_core.metrics.SegMetric`, the summary and per-class tables, and the
files of a run's ``eval/`` folder."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from pandas import DataFrame  # not `pd`: `pd` is the PD flag of EvalReport.per_class*

from .atomic_io import atomic_write_files
from .metrics import SegMetric


@dataclass
class EvalReport:
    """Metrics per head and PD setting: ``metrics[head]["pd"|"no_pd"]`` is a :class:`SegMetric`."""

    class_names: List[str]
    metrics: Dict[str, Dict[str, SegMetric]]
    images: int
    pd_threshold: float
    info: Dict[str, Any] = field(default_factory=dict)
    #: per head, a BiasAccumulator of the predictions without PD (``evaluate(..., bias_grid=g)``)
    bias: Dict[str, Any] = field(default_factory=dict)
    #: the first ``examples`` images: ``ids``, ``images`` (uint8 HxWx3), ``labels``, ``inputs``
    #: (the normalised model inputs) and one predicted label map per head (``evaluate(..., examples=n)``)
    examples: Dict[str, List[Any]] = field(default_factory=dict)

    def summary(self) -> "Any":
        """DataFrame: one row per head; mIoU (mmseg and release definitions) with PD off and on, pixel acc."""
        rows = []
        for head, by_pd in self.metrics.items():
            row = {"model": head}
            for tag in ("no_pd", "pd"):
                m = by_pd.get(tag)  # a PD setting not evaluated (``evaluate(..., pd_variants=...)``): NaN
                row[f"mIoU_{tag}"] = m.miou() if m is not None else math.nan
                row[f"mIoU_release_{tag}"] = m.miou_release() if m is not None else math.nan
                row[f"aAcc_{tag}"] = m.pixel_accuracy() if m is not None else math.nan
            rows.append(row)
        return DataFrame(rows)

    def per_class(self, head: str, pd: bool = False):
        return self.metrics[head]["pd" if pd else "no_pd"].table(self.class_names)

    def per_class_iou(self, pd: bool = False) -> "Any":
        """DataFrame: one row per class, its IoU (%) under every head side by side (NaN where the
        class has no union) — where a head gains or loses, class by class."""
        table = DataFrame({"class": self.class_names})
        for head in self.metrics:
            table[head] = self.per_class(head, pd=pd)["iou"].to_numpy()
        return table

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"images": self.images, "pd_threshold": self.pd_threshold,
                               "class_names": self.class_names, "info": self.info, "results": {}}
        for head, by_pd in self.metrics.items():
            out["results"][head] = {
                tag: {"mIoU": m.miou(), "mIoU_release": m.miou_release(), "aAcc": m.pixel_accuracy(),
                      "IoU": [None if math.isnan(v) else v * 100 for v in m.iou().tolist()]}
                for tag, m in by_pd.items()}
        return out

    def save(self, folder: os.PathLike) -> Path:
        """``metrics.json``, ``summary.csv`` and ``per_class_<head>_<pd|no_pd>.csv`` (atomic)."""
        folder = Path(folder)
        # Rendered in memory, then written as one unit: a failure (full disk) leaves every previous
        # file as it was, never a new metrics.json beside old per-class tables.
        files = {folder / "metrics.json": json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n",
                 folder / "summary.csv": self.summary().to_csv(index=False)}
        for head, by_pd in self.metrics.items():
            for tag, m in by_pd.items():
                files[folder / f"per_class_{head.replace('+', 'p')}_{tag}.csv"] = m.table(self.class_names).to_csv(index=False)
        atomic_write_files(files)
        return folder

    def format(self) -> str:
        """Side-by-side text table of the heads (mmseg mIoU, release mIoU; PD off / on)."""
        lines = [f"{'model':<10} {'mIoU':>7} {'mIoU+PD':>8} {'rel.mIoU':>9} {'rel.+PD':>8}   ({self.images} images, "
                 f"PD threshold {self.pd_threshold})"]
        for head, by_pd in self.metrics.items():
            a, b = by_pd.get("no_pd"), by_pd.get("pd")
            lines.append(f"{head:<10} {_num(a, 'miou', 7)} {_num(b, 'miou', 8)} {_num(a, 'miou_release', 9)} "
                         f"{_num(b, 'miou_release', 8)}")
        return "\n".join(lines)


def _num(metric: Any, score: str, width: int) -> str:
    """A score of the text table, or "-" for a PD setting that was not evaluated."""
    return f"{getattr(metric, score)():{width}.2f}" if metric is not None else f"{'-':>{width}}"


__all__ = ("EvalReport",)
