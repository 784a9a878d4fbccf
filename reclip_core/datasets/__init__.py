"""Dataset readers: the toy world and the five benchmarks.

``get_dataset(name, split, root=None, **kw)`` returns a sequence of item dicts:
``{"id", "image"}`` for unlabeled (training) splits and ``{"id", "image", "label"}``
for evaluation splits (label: int64 numpy array (H, W), 255 = ignore). Training
readers hold no label paths at all.
"""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["DATASET_NAMES", "BENCHMARK_NAMES", "get_dataset"]

BENCHMARK_NAMES = ("voc", "context", "ade", "cityscapes", "coco_stuff27")
DATASET_NAMES = BENCHMARK_NAMES + ("toyworld",)


def get_dataset(name: str, split: str, root: Optional[os.PathLike] = None, **kw):
    """Reader for ``name`` / ``split``.

    Benchmarks: ``split`` is ``"train"`` (images only) or ``"val"`` (images and
    labels); ``root`` defaults to ``data/<name>`` (or ``$RECLIP_DATA/<name>``).
    ``"toyworld"``: ``ToyWorld(split=split, preset=kw.get("preset", "biased"), root=root, ...)``.
    """
    if name == "toyworld":
        from .toyworld import ToyWorld  # imported only when asked for

        return ToyWorld(split=split, root=root, **kw)
    if name not in BENCHMARK_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}.")
    if kw:
        raise ValueError(f"{name}: unexpected options {sorted(kw)}; benchmark readers take only split and root.")
    from .benchmarks import benchmark

    return benchmark(name, split, root)
