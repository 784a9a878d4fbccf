"""Dataset readers: the toy world, the five benchmarks and a folder of your own images.

``get_dataset(name, split, root=None, **kw)`` returns a sequence of item dicts:
``{"id", "image"}`` for unlabeled (training) splits and ``{"id", "image", "label"}``
for evaluation splits (label: int64 numpy array (H, W), 255 = ignore). Training
readers hold no label paths at all.

``safe_relative_id(text, what, ...)`` is the one check every id read from a file (a split
list, a JSON annotation, a registry, a hub row, a preset) passes before it becomes a path.
"""
from __future__ import annotations

import os
from typing import Optional

from .ids import safe_relative_id
from .names import BENCHMARK_NAMES, DATASET_NAMES

__all__ = ["DATASET_NAMES", "BENCHMARK_NAMES", "get_dataset", "safe_relative_id"]


def get_dataset(name: str, split: str, root: Optional[os.PathLike] = None, **kw):
    """Reader for ``name`` / ``split``.

    Benchmarks: ``split`` is ``"train"`` (images only) or ``"val"`` (images and
    labels); ``root`` defaults to ``data/<name>`` (or ``$RECLIP_DATA/<name>``).
    ``"toyworld"``: ``ToyWorld(split=split, preset=kw.get("preset", "biased"), root=root, ...)``.
    ``"folder"``: your own images under ``root`` (``datasets/folder.py``; ``val``: those with a label).
    """
    # lazy: the readers import torch (1.6 s); the dataset names alone are read by config validation in 0.1 s
    from .benchmarks import benchmark
    from .folder import folder_dataset
    from .toyworld import ToyWorld

    if name == "toyworld":
        return ToyWorld(split=split, root=root, **kw)
    if name == "folder":
        return folder_dataset(split, root, **kw)
    if name not in BENCHMARK_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}.")
    if kw:
        raise ValueError(f"{name}: unexpected options {sorted(kw)}; benchmark readers take only split and root.")
    return benchmark(name, split, root)
