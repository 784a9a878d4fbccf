"""What a derived file (hypotheses JSON, feature cache) was derived from, and the refusal of one
derived from anything else.

Hypotheses and cached features are keyed by image id, and ids repeat across datasets: the train and
val splits of another toy preset, another ``data_root`` or another ``train_split`` all have the same
kind of ids. A file that recorded only its settings would be reused for other images. So each file
records :func:`dataset_identity` (reader, name, split, root or preset, and a cheap content digest)
beside the CLIP weights digest and every setting that changes it (:func:`hypothesis_settings`),
and the training path checks the hypotheses file it reads against what it would compute
(:func:`check_hypothesis_file`).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .atomic_io import StaleFileError
from .config import SCHEMA
from .config_schema import REQUIRED, RunConfig
from .clip_loading import clip_fingerprint
from .run_inputs import resolve_templates
from .datasets.head import Head
from .transforms import clip_input_size


def _base(dataset: Any) -> Any:
    """The reader under ``Head`` wrappers (a Head is a prefix, not another dataset)."""
    while isinstance(dataset, Head):
        dataset = dataset.dataset
    return dataset


def settings_fingerprint(settings: Dict[str, Any]) -> str:
    """A short digest of a JSON-able settings record (canonical JSON, sha256)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _ids(dataset: Any) -> Optional[List[str]]:
    ids = getattr(dataset, "ids", None)
    if ids is None:  # HF-backed readers (the toy world): the id column, without decoding images
        ds = getattr(dataset, "_ds", None)
        if ds is not None and "id" in getattr(ds, "column_names", ()):
            ids = ds["id"]
    return None if ids is None else [str(i) for i in ids]


def dataset_identity(dataset: Any) -> Dict[str, Any]:
    """A JSON-able record of which images ``dataset`` holds, cheap to compute (no image decoded).

    Reader class, name, split, the preset hash (the toy world is a pure function of its preset) or
    the resolved root, and a digest of the sorted ids plus, for file-backed readers, every image
    file's size and modification time (a file replaced under the same id changes it)."""
    ds = _base(dataset)
    ident: Dict[str, Any] = {"reader": type(ds).__name__, "size": len(ds)}
    for attr in ("name", "preset_name", "split", "preset_hash"):
        value = getattr(ds, attr, None)
        if isinstance(value, (str, int)):
            ident[attr] = value
    if "preset_hash" not in ident and getattr(ds, "root", None) is not None:
        ident["root"] = str(Path(ds.root).resolve())
    digest = hashlib.sha256()
    ids = _ids(ds)
    if ids is not None:
        digest.update(json.dumps(sorted(ids)).encode())
        image_path = getattr(ds, "image_path", None)
        if callable(image_path) and "preset_hash" not in ident:
            for i in range(len(ids)):
                try:
                    st = os.stat(image_path(i))
                    digest.update(f"{ids[i]}:{st.st_size}:{st.st_mtime_ns};".encode())
                except OSError:
                    digest.update(f"{ids[i]}:missing;".encode())
        ident["content"] = digest.hexdigest()[:16]
    return ident


def hypothesis_settings(clip: nn.Module, dataset: Any, *, mode: str, window: int, stride: Optional[int],
                        input_size: Optional[int], threshold: float, topk: int, templates: Sequence[str],
                        ln_eps: Optional[float], cls_token: Any, tiling: str, resize: str = "torch") -> Dict[str, Any]:
    """Everything a hypotheses file's contents depend on besides its class list (which it records
    separately): mode and its parameters, the CLIP weights and input size, templates and the images."""
    stride = stride or max(1, window // 2)
    settings: Dict[str, Any] = {
        "mode": mode, "input_size": input_size or clip_input_size(clip),
        "templates": settings_fingerprint({"t": list(templates)}), "ln_eps": ln_eps,
        "cls_token": None if cls_token is None else str(cls_token), "clip_weights": clip_fingerprint(clip)}
    if mode == "window":
        settings.update(window=int(window), stride=int(stride))
        if tiling != "fit":  # files of the default grid keep the settings they always had
            settings["tiling"] = tiling
        if resize != "torch":  # likewise for the default window resize
            settings["resize"] = resize
    else:
        settings.update(threshold=float(threshold), topk=int(topk))
    settings["dataset"] = dataset_identity(dataset)
    return settings


def config_hypothesis_kwargs(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``compute_hypotheses`` settings a run config implies (the CLI, the notebooks and the
    check in ``train`` all use this, so they cannot disagree about what a file should record)."""
    plain = cfg.get("hypothesis_clip", "model") == "plain"
    return {"mode": cfg["hypothesis_mode"], "window": cfg.window, "stride": cfg.stride,
            "input_size": cfg["hypothesis_input_size"], "threshold": cfg["hypothesis_threshold"],
            "topk": cfg["hypothesis_topk"], "templates": resolve_templates(cfg),
            "ln_eps": None if plain else cfg["clip"]["ln_eps"],
            "cls_token": None if plain else cfg["clip"]["cls_token"],
            "tiling": cfg.get("hypothesis_tiling", "fit"), "resize": cfg.get("hypothesis_resize", "torch")}


def describe_difference(recorded: Mapping[str, Any], expected: Mapping[str, Any]) -> str:
    """``key: recorded -> expected`` for each differing entry (what a refusal names)."""
    diff = []
    for k in sorted(set(recorded) | set(expected)):
        old, new = recorded.get(k), expected.get(k)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            diff += [f"{k}.{d}" for d in describe_difference(old, new).split("; ") if d != "none"]
        elif old != new:
            diff.append(f"{k}: {old!r} -> {new!r}")
    return "; ".join(diff) or "none"


def check_hypothesis_file(path: Union[str, os.PathLike], cfg: Mapping[str, Any], clip: nn.Module, dataset: Any) -> None:
    """Refuse (``StaleFileError``) a hypotheses file made with another CLIP, window, mode, templates
    or from other images than ``cfg`` and ``dataset`` imply: training on it would train on another
    computation's pseudo labels. A file recording no settings at all (written by hand) is used with
    a warning, since nothing in it can be checked."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        recorded = json.load(f).get("settings") or {}
    if not recorded:
        print(f"warning: {path} records no settings; assuming it was computed for this config and dataset.",
              file=sys.stderr)
        return
    expected = hypothesis_settings(clip, dataset, **config_hypothesis_kwargs(cfg))
    if recorded != expected:
        raise StaleFileError(path, f"{path} holds hypotheses computed with other settings, CLIP weights or images "
                             f"than this config's ({describe_difference(recorded, expected)}); recompute it with "
                             "`python -m reclip_core hypothesis --config ... --no-resume`, or delete it.")


#: keys that may change between a run and its resumption without changing what is computed (``RunConfig``)
RESUME_FREE_KEYS = tuple(f.name for f in fields(RunConfig))


#: keys that say where a derived file lies, not what it holds: the feature cache is keyed by what
#: built it (``feature_cache_key``), so a run is the same computation wherever its cache lives.
#: Older checkpoints store them in their fingerprint; they are ignored on both sides.
LOCATION_KEYS = ("feature_cache_path",)


def config_fingerprint(cfg: Mapping[str, Any], clip: Optional[nn.Module] = None) -> Dict[str, Any]:
    """The part of a config that must match for a resumed run to continue the same computation,
    plus the frozen CLIP's weight digest (the config names the weights, e.g. ``pretrained: biased``,
    but retrained weights under the same name are another computation)."""
    fp = {k: v for k, v in dict(cfg).items() if k not in RESUME_FREE_KEYS + LOCATION_KEYS}
    if clip is not None:
        fp["clip_weights"] = clip_fingerprint(clip)
    return fp


def fingerprint_matches(stored: Mapping[str, Any], current: Mapping[str, Any], schema: Mapping[str, Any] = SCHEMA) -> bool:
    """Whether a checkpoint's fingerprint is the same computation as the config's: equal, up to
    keys that the stored one lacks and the config holds at their default — a key added to the
    config after the run was written defaults to the computation as it was before it existed."""
    for k in (set(stored) | set(current)) - set(LOCATION_KEYS):
        spec = schema.get(k)
        if k in stored and k in current:
            if isinstance(spec, dict) and isinstance(stored[k], Mapping) and isinstance(current[k], Mapping):
                if not fingerprint_matches(stored[k], current[k], spec):
                    return False
            elif stored[k] != current[k]:
                return False
        elif k in stored or spec is None or isinstance(spec, dict) or spec.default is REQUIRED \
                or current[k] != spec.default:
            return False
    return True


__all__ = ("dataset_identity", "hypothesis_settings", "config_hypothesis_kwargs", "check_hypothesis_file",
           "describe_difference", "RESUME_FREE_KEYS", "LOCATION_KEYS", "config_fingerprint", "fingerprint_matches")


def feature_cache_key(model: nn.Module, views: Any, n_views: int) -> str:
    """The key a feature cache is stored under: the views (seed, count, crop, transform settings),
    the image ids with their hypotheses (stored beside the features), the images themselves
    (:func:`dataset_identity`), the frozen CLIP's weights and how its dense features are read."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted((str(k), list(map(int, v))) for k, v in views.hypotheses.items())).encode())
    digest.update(clip_fingerprint(model.clip).encode())
    digest.update(json.dumps(getattr(views.transform, "settings", views.transform.crop), sort_keys=True).encode())
    read = {"ln_eps": getattr(model, "ln_eps", None), "cls_token": str(getattr(model, "cls_token", None))}
    digest.update(json.dumps({"dataset": dataset_identity(views.dataset), "features": read}, sort_keys=True,
                             default=str).encode())
    return f"{views.seed}-{n_views}-{len(views)}-{views.transform.crop}-{digest.hexdigest()[:16]}"


def load_feature_cache(path: Path, key: str) -> Optional[Dict[str, Any]]:
    """The cached tensors at ``path`` if it was stored under ``key``; None when it is absent, was
    built from anything else, or is unreadable (truncated, not a safetensors file): a cache is
    derived data, so the caller rebuilds it (and says why on stderr) instead of failing."""
    if not path.is_file():
        return None

    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                print(f"[reclip] {path} was built from other images, views, hypotheses or CLIP weights: rebuilding it.",
                      file=sys.stderr)
                return None
        t = load_file(str(path))
        if set(t) != {"feats", "hyps"}:
            raise ValueError(f"tensors {sorted(t)}")
        return t
    except Exception as err:  # safetensors raises its own error types for a damaged file
        print(f"[reclip] {path} is unreadable ({type(err).__name__}: {err}): rebuilding it.", file=sys.stderr)
        return None
