"""Checks a checkpoint must pass before its weights are loaded into a model.

``load_state_dict`` accepts far too much: heads trained on another CLIP (same shapes), NaN weights,
a negative BatchNorm variance, an int tensor where a float one belongs (silently cast). Each of
these evaluates to a plausible-looking mIoU, so they are refused here, naming the tensor and file.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from .clip_loading import clip_fingerprint
from .provenance import settings_fingerprint


def checkpoint_identity(model: torch.nn.Module) -> Dict[str, str]:
    """What trained heads depend on besides their class list: the frozen CLIP's weights and the text
    templates averaged into the class features. Heads trained on one CLIP are meaningless on
    another, yet load without any shape error. Reuses the digests the hypotheses and the resume
    fingerprint already record (``clip_loading.clip_fingerprint``, ``provenance.settings_fingerprint``)."""
    return {"clip_weights": clip_fingerprint(model.clip),
            "templates": settings_fingerprint({"t": list(model.templates)})}


_WHAT = {"clip_weights": "CLIP weights", "templates": "text templates"}


def check_identity(recorded: Optional[Mapping[str, Any]], model: torch.nn.Module, source: Path,
                   allow_legacy: bool = False, trained_config: Optional[Mapping[str, Any]] = None) -> None:
    """Refuse weights trained with another CLIP or other templates than ``model``'s (naming both).

    A checkpoint without the record (written before it existed, or a bare weights file) is refused
    too unless ``allow_legacy``: nothing else can tell its CLIP apart."""
    if not (hasattr(model, "clip") and hasattr(model, "templates")):
        return
    own = checkpoint_identity(model)
    if recorded is None:
        if allow_legacy:
            warnings.warn(f"checkpoint {source} does not record its CLIP weights and templates; loaded anyway "
                          "(allow_legacy): its results are only meaningful with the CLIP it was trained on.",
                          stacklevel=3)
            return
        raise ValueError(
            f"checkpoint {source} does not record which CLIP weights and text templates it was trained with (it "
            "predates that record, or is a bare weights file), so it cannot be checked against this model. "
            "Retrain it (`python -m reclip_core train --config ... --no-resume`), or, if you know it was trained "
            "with this config's CLIP and templates, pass --allow-legacy-checkpoint (allow_legacy=True).")
    differ = [k for k in own if recorded.get(k) != own[k]]
    if differ:
        clip_cfg = dict((trained_config or {}).get("clip") or {})
        named = (f" (its config: clip.arch {clip_cfg.get('arch')!r}, clip.pretrained {clip_cfg.get('pretrained')!r}, "
                 f"templates {(trained_config or {}).get('templates')!r})") if trained_config else ""
        raise ValueError(
            f"checkpoint {source} was trained with "
            + " and ".join(f"{_WHAT[k]} {recorded.get(k)}" for k in differ) + named
            + ", but this model has " + " and ".join(f"{_WHAT[k]} {own[k]}" for k in differ)
            + ": its heads do not fit this model. Use the CLIP and templates it was trained with (--set clip.arch=... "
            "--set clip.pretrained=... --set templates=...), or train for this model's.")


def validate_weights(weights: Mapping[str, torch.Tensor], model: torch.nn.Module, source: Path) -> None:
    """Refuse a state that ``load_state_dict`` would accept silently but that cannot be a trained head:
    other names or shapes, another dtype (an int/bool tensor is cast without a word), non-finite values,
    or a negative BatchNorm running variance (its square root would be NaN)."""
    own = model.trainable_state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint file {source} does not match this model: missing {missing}, unexpected "
                         f"{unexpected}; load it with the config it was trained with (model, bias_mode, use_decoder).")
    for name, want in own.items():
        t = weights[name]
        problem = None
        if tuple(t.shape) != tuple(want.shape):
            problem = f"has shape {tuple(t.shape)}, the model's has {tuple(want.shape)}"
        elif t.dtype != want.dtype:
            problem = f"is stored as {t.dtype}, the model's is {want.dtype}"
        elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
            problem = f"holds {int((~torch.isfinite(t)).sum())} non-finite values (NaN/Inf)"
        elif name.endswith("running_var") and bool((t < 0).any()):
            problem = f"holds negative variances (min {float(t.min()):.4g})"
        if problem:
            raise ValueError(f"checkpoint file {source}: tensor {name} {problem}; the file is corrupt or was not "
                             "written by reclip's training for this model. Restore it from a copy or retrain "
                             "(`python -m reclip_core train --config ... --no-resume`).")


__all__ = ("checkpoint_identity", "check_identity", "validate_weights")
