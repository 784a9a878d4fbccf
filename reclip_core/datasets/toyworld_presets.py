"""The toy world's definition: bias presets, their hash, where a world lives, class names and masks.

A preset (``reclip_core/presets/*.yaml``) sets the classes, split sizes, class frequencies and
the regions objects are drawn in. ``<hash>`` is :func:`preset_hash`: sha256 of the preset's
parsed YAML content (canonical JSON) plus the generator version, so editing a preset or the
generator regenerates the world and nothing else does. A world lives under
``<root>/<preset name>-<hash>/``; ``root`` defaults to ``$RECLIP_TOYWORLD_ROOT`` or
``<repo>/data/toyworld`` (git-ignored). The generator is ``toyworld_render.py``, the reader
``toyworld.py``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from .ids import safe_relative_id

# Bump when the generator's output for a given preset changes (it is part of the cache hash).
GENERATOR_VERSION = "toyworld-1"

SPLITS = ("pretrain", "train", "val")
# Columns each split's reader keeps; everything else stays on disk, unread.
READER_COLUMNS = {
    "pretrain": ("id", "image", "caption"),
    "train": ("id", "image"),
    "val": ("id", "image", "mask"),
}
IGNORE_INDEX = 255

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
REPO_ROOT = Path(__file__).resolve().parents[2]


def available_presets() -> list[str]:
    """Names of the presets shipped in ``reclip_core/presets/toyworld_<name>.yaml``."""
    return sorted(p.stem[len("toyworld_"):] for p in PRESET_DIR.glob("toyworld_*.yaml"))


def preset_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a preset name (``"biased"``, ``"toyworld_biased"``) or a YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FileNotFoundError(f"toy-world preset file {p} does not exist; "
                                    f"use one of {available_presets()} or a path to a YAML preset")
        return p
    name = str(name_or_path)
    if name.startswith("toyworld_"):
        name = name[len("toyworld_"):]
    cand = PRESET_DIR / f"toyworld_{name}.yaml"
    if not cand.is_file():
        raise ValueError(f"unknown toy-world preset {name_or_path!r}; "
                         f"use one of {available_presets()} or a path to a YAML preset")
    return cand


def load_preset(name_or_path: str | os.PathLike | Mapping[str, Any]) -> dict:
    """Load a toy-world preset as a dict (a deep copy when given a dict).

    Accepts a shipped preset name (``"biased"``, ``"uniform"``), a path to a YAML file, or an
    already-loaded dict. The result is validated (:func:`validate_preset`)."""
    source = "the toy-world preset"
    if isinstance(name_or_path, Mapping):
        preset = copy.deepcopy(dict(name_or_path))
    else:
        path = preset_path(name_or_path)
        with open(path, encoding="utf-8") as f:
            preset = yaml.safe_load(f)
        if not isinstance(preset, dict):
            raise ValueError(f"toy-world preset {path} is not a YAML mapping; fix the file")
        source = f"the toy-world preset {path}"
    validate_preset(preset, source)
    return preset


def _shape_names() -> tuple[str, ...]:
    return ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon")


def validate_preset(preset: Mapping[str, Any], source: str = "the toy-world preset") -> None:
    """Raise ``ValueError`` (saying what to fix) when a preset is malformed."""
    for key in ("name", "seed", "image_size", "classes", "objects", "background", "captions",
                "splits"):
        if key not in preset:
            raise ValueError(f"toy-world preset lacks the key {key!r}; "
                             f"copy reclip_core/presets/toyworld_biased.yaml and edit it")
    # the name becomes the world's folder name under the cache root
    safe_relative_id(preset["name"], f"{source}, key 'name',", flat=True,
                     fix="Use a plain folder name such as 'biased'.")
    names = [c["name"] for c in preset["classes"]]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"toy-world preset needs at least two distinct class names, got {names}")
    if len(names) > 254:
        raise ValueError("toy-world masks are 8-bit: at most 254 classes")
    for c in preset["classes"]:
        if c.get("shape") not in _shape_names():
            raise ValueError(f"class {c['name']!r}: shape must be one of {_shape_names()}")
        if len(c.get("colour", ())) != 3:
            raise ValueError(f"class {c['name']!r}: colour must be [r, g, b]")
    for split in SPLITS:
        cfg = preset["splits"].get(split)
        if cfg is None or int(cfg.get("size", 0)) < 1:
            raise ValueError(f"toy-world preset: splits.{split}.size must be a positive integer")
        for key in ("class_weights", "positions"):
            unknown = set(cfg.get(key) or {}) - set(names)
            if unknown:
                raise ValueError(f"toy-world preset: splits.{split}.{key} names unknown classes "
                                 f"{sorted(unknown)}; known: {names}")
        for cname, reg in (cfg.get("positions") or {}).items():
            if not 0.0 <= float((reg or {}).get("outside", 0.0)) <= 1.0:
                raise ValueError(f"splits.{split}.positions[{cname!r}].outside must be in [0, 1]")
        for cname, w in (cfg.get("class_weights") or {}).items():
            if not float(w) > 0:
                raise ValueError(f"splits.{split}.class_weights[{cname!r}] must be > 0")
    lo, hi = preset["objects"]["count"]
    if not 1 <= lo <= hi <= len(names):
        raise ValueError("objects.count must be [lo, hi] with 1 <= lo <= hi <= number of classes")
    if "{}" not in "".join(preset["captions"]["templates"]):
        raise ValueError("captions.templates must contain '{}' where the object names go")


def preset_hash(preset: str | os.PathLike | Mapping[str, Any], length: int = 12) -> str:
    """sha256 (first ``length`` hex digits) of the preset's content and the generator version.

    The content is the parsed YAML serialised as canonical JSON (sorted keys), so comments and
    formatting do not count; every value does."""
    if not isinstance(preset, Mapping):
        preset = load_preset(preset)
    blob = json.dumps(preset, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256((GENERATOR_VERSION + "\n" + blob).encode()).hexdigest()[:length]


def default_root() -> Path:
    """``$RECLIP_TOYWORLD_ROOT`` if set, else ``<repo>/data/toyworld``."""
    env = os.environ.get("RECLIP_TOYWORLD_ROOT")
    return Path(env) if env else REPO_ROOT / "data" / "toyworld"


def world_dir(preset: str | os.PathLike | Mapping[str, Any], root: str | os.PathLike | None = None
              ) -> Path:
    """Folder of the world generated from ``preset``: ``<root>/<name>-<hash>``."""
    p = load_preset(preset)
    return Path(root or default_root()) / f"{p['name']}-{preset_hash(p)}"


def toyworld_class_names(preset: str | os.PathLike | Mapping[str, Any] = "biased") -> list[str]:
    """Class names of the toy world in id order (label value i <-> name i)."""
    return [c["name"] for c in load_preset(preset)["classes"]]


def mask_to_label(mask: np.ndarray) -> np.ndarray:
    """Stored mask (0 = background, i+1 = class i) -> label (255 = ignore, 0..C-1), int64."""
    mask = np.asarray(mask)
    label = mask.astype(np.int64) - 1
    label[mask == 0] = IGNORE_INDEX
    return label
