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
import unicodedata
from pathlib import Path
from typing import Optional

__all__ = ["DATASET_NAMES", "BENCHMARK_NAMES", "get_dataset", "safe_relative_id"]

BENCHMARK_NAMES = ("voc", "context", "ade", "cityscapes", "coco_stuff27")
DATASET_NAMES = BENCHMARK_NAMES + ("toyworld", "folder")


def get_dataset(name: str, split: str, root: Optional[os.PathLike] = None, **kw):
    """Reader for ``name`` / ``split``.

    Benchmarks: ``split`` is ``"train"`` (images only) or ``"val"`` (images and
    labels); ``root`` defaults to ``data/<name>`` (or ``$RECLIP_DATA/<name>``).
    ``"toyworld"``: ``ToyWorld(split=split, preset=kw.get("preset", "biased"), root=root, ...)``.
    ``"folder"``: your own images under ``root`` (``datasets/folder.py``; ``val``: those with a label).
    """
    if name == "toyworld":
        from .toyworld import ToyWorld  # imported only when asked for

        return ToyWorld(split=split, root=root, **kw)
    if name == "folder":
        from .folder import folder_dataset

        return folder_dataset(split, root, **kw)
    if name not in BENCHMARK_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}.")
    if kw:
        raise ValueError(f"{name}: unexpected options {sorted(kw)}; benchmark readers take only split and root.")
    from .benchmarks import benchmark

    return benchmark(name, split, root)


_DEFAULT_FIX = "Fix or replace that file (take it from a trusted source) and run the same command again."


def _unsafe_reason(text: object, flat: bool) -> Optional[str]:
    """Why ``text`` cannot be used as a relative id, or None when it can."""
    if not isinstance(text, str):
        return f"which is a {type(text).__name__}, not a text"
    if not text.strip():
        return "which is empty"
    if "\x00" in text:
        return "which holds a NUL character"
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        return "which holds a control character"
    if "\\" in text:
        return "which holds a backslash (a Windows path separator)"
    if len(text) >= 2 and text[1] == ":" and text[0].isascii() and text[0].isalpha():
        return "which starts with a drive letter"
    if text.startswith("/"):
        return "which is an absolute path"
    if flat and "/" in text:
        return "which holds a '/' where a single file name is expected"
    parts = text.split("/")
    if ".." in parts:
        return "which has a '..' component (path traversal)"
    if "" in parts or "." in parts:
        return "which has an empty or '.' component"
    return None


def safe_relative_id(text: object, what: str, *, root: Optional[os.PathLike] = None, suffix: str = "",
                     flat: bool = False, fix: str = _DEFAULT_FIX) -> str:
    """Return ``text`` if it is safe to join onto a folder; raise ``ValueError`` otherwise.

    Why: ids read from split lists, annotation JSON, registries or hub rows are joined onto
    folders that are then read, linked, overwritten or cleaned. One line like ``../../x`` would
    make a preparation delete and replace a file outside its root, so such input is refused
    before any path is built from it, with a message naming ``what`` (the file and line or
    entry) and ``fix`` (what to do next).

    Refused: non-text, empty, NUL or control characters, backslashes, drive letters, absolute
    paths, ``..``, empty or ``.`` components, any ``/`` when ``flat``; and, when ``root`` is
    given, an id whose ``root / (text + suffix)`` resolves outside ``root`` (a symbolic link on
    the way). ``frankfurt/frankfurt_000000_000294`` is a valid (non-flat) id.
    """
    reason = _unsafe_reason(text, flat)
    if reason is None and root is not None:
        base = Path(root).resolve()
        target = (base / f"{text}{suffix}").resolve()
        if base not in target.parents:
            reason = f"which resolves to {target}, outside {base} (through a symbolic link)"
    if reason is not None:
        raise ValueError(f"{what} holds {text!r}, {reason}: ids must be relative names inside "
                         f"the dataset. {fix}")
    return text
