"""A known bias planted in the toy CLIP's dense path: the known-answer world of the bias lab.

On real CLIP the biases are measured, never known. Here a bias component with preset amplitudes
is added to the toy CLIP's dense (MaskCLIP) features, so the bias map a model learns can be
compared with the planted one. Its effect on the logits is exact by construction:

    MaskCLIP logit  L[c, p] = f̂_p · t_c                (f̂_p the L2-normalised dense feature)
    planted offset  b_p     = T⁺ B*[:, p]               (T⁺ = pseudo-inverse of the class texts [C, D])
    biased logit    (f̂_p + b_p) · t_c = L[c, p] + B*[c, p]     since T T⁺ = I_C

for the class texts ``t_c`` the offset was built from (the world's class names with the spec's
templates: what the toy config evaluates with). The offset is added after the normalisation and
only to the patch features; the class-token path (image embedding, hypotheses) is untouched.

The planted map, in cosine-logit units, at the token centres (x, y) ∈ (0, 1)² of a grid:

    B*[c, y, x] = class_preference[c] + a_c · exp(−((x − μx_c)² + (y − μy_c)²) / (2 σ_c²))

``class_preference`` favours some classes everywhere; the bump (amplitude ``a_c``, centre ``μ_c``,
width ``σ_c``) favours class c in one region, a smooth field of position. Specs are data:
``reclip_core/presets/planted_bias_<name>.yaml``.

A diagnostic variant (``where="logits"``) adds B* to the segmenters' CLIP logits instead and leaves
the dense features clean: the same biased MaskCLIP, but the training loss, which pools the dense
features, no longer reads the bias. It separates "the loss reads the bias" from "the optimisation
fails" when a model does not remove it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Tuple

import torch
import yaml
from torch import nn

from .datasets.toyworld_presets import toyworld_class_names
from .text import PROMPT_TEMPLATES, text_embeddings

SPEC_DIR = Path(__file__).resolve().parent / "presets"


def spec_path(name_or_path: str | os.PathLike) -> Path:
    """A spec name (``"known"`` → ``presets/planted_bias_known.yaml``) or a YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FileNotFoundError(f"planted-bias spec {p} does not exist")
        return p
    cand = SPEC_DIR / f"planted_bias_{name_or_path}.yaml"
    if not cand.is_file():
        known = sorted(q.stem[len("planted_bias_"):] for q in SPEC_DIR.glob("planted_bias_*.yaml"))
        raise ValueError(f"unknown planted-bias spec {name_or_path!r}; use one of {known} or a YAML path")
    return cand


def load_spec(name_or_path: str | os.PathLike | Mapping[str, Any]) -> dict:
    """The planted-bias spec as a dict, checked (``ValueError`` saying what to fix)."""
    if isinstance(name_or_path, Mapping):
        spec = dict(name_or_path)
    else:
        with open(spec_path(name_or_path), encoding="utf-8") as f:
            spec = yaml.safe_load(f)
    if not isinstance(spec, dict) or "world" not in spec:
        raise ValueError("a planted-bias spec is a mapping with 'world', 'templates', 'class_preference' "
                         "and 'space_preference'; copy reclip_core/presets/planted_bias_known.yaml")
    for name, bump in (spec.get("space_preference") or {}).items():
        if set(bump) != {"amplitude", "centre", "sigma"} or len(bump["centre"]) != 2 or not bump["sigma"] > 0:
            raise ValueError(f"space_preference[{name!r}] must be {{amplitude, centre: [x, y], sigma > 0}}")
    return spec


def token_centres(hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of the token centres of an h × w grid in (0, 1), each [h, w]."""
    h, w = hw
    y = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    x = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    return x.view(1, w).expand(h, w), y.view(h, 1).expand(h, w)


class PlantedBias(nn.Module):
    """The planted bias of one class list: ``logit_map(hw)`` is B* [C, h, w]; ``feature_offset(hw)``
    the [h*w, D] vectors added to the dense features so that the cosine logits move by exactly B*."""

    #: where the bias enters: "features" (the dense features, exact on the logits) or "logits"
    WHERE = ("features", "logits")

    def __init__(self, text: torch.Tensor, class_preference: torch.Tensor, amplitude: torch.Tensor,
                 centre: torch.Tensor, sigma: torch.Tensor, where: str = "features"):
        super().__init__()
        if where not in self.WHERE:
            raise ValueError(f"a planted bias enters the dense features or the logits: where in {self.WHERE}, got {where!r}")
        self.where = where
        C, D = text.shape
        if C > D:
            raise ValueError(f"a planted bias needs at most D = {D} classes to be exact, got {C}")
        text64 = text.detach().double()
        dual = torch.linalg.pinv(text64)  # [D, C], T T⁺ = I_C when the class texts are independent
        if not torch.allclose(text64 @ dual, torch.eye(C, dtype=torch.float64), atol=1e-8):
            raise ValueError("the class texts are linearly dependent: no offset moves each class's logit alone")
        self.register_buffer("dual", dual.float())
        self.register_buffer("class_preference", class_preference.double())
        self.register_buffer("amplitude", amplitude.double())
        self.register_buffer("centre", centre.double())  # [C, 2] as (x, y)
        self.register_buffer("sigma", sigma.double())

    @property
    def num_classes(self) -> int:
        return int(self.class_preference.numel())

    def logit_map(self, hw: Tuple[int, int]) -> torch.Tensor:
        """B* [C, h, w] (float32) at the token centres of an ``hw`` grid."""
        x, y = token_centres(hw)
        x, y = x.to(self.centre.device), y.to(self.centre.device)
        # d²[c, y, x] = (x − μx_c)² + (y − μy_c)²
        d2 = (x[None] - self.centre[:, 0, None, None]) ** 2 + (y[None] - self.centre[:, 1, None, None]) ** 2
        # B*[c, y, x] = class_preference[c] + a_c · exp(−d² / (2 σ_c²))
        bump = torch.exp(-d2 / (2 * self.sigma[:, None, None] ** 2))
        return (self.class_preference[:, None, None] + self.amplitude[:, None, None] * bump).float()

    def feature_offset(self, hw: Tuple[int, int]) -> torch.Tensor:
        """b [h*w, D]: b_p = T⁺ B*[:, p]."""
        planted = self.logit_map(hw).flatten(1).to(self.dual.dtype)  # [C, h*w]
        return (self.dual @ planted).T

    def forward(self, hw: Tuple[int, int]) -> torch.Tensor:
        return self.feature_offset(hw)


def planted_bias_from_spec(spec: Mapping[str, Any], names: Sequence[str], text: torch.Tensor,
                           scale: float = 1.0, where: str = "features") -> PlantedBias:
    """A :class:`PlantedBias` for the classes ``names`` (text features ``text`` [C, D]) from a spec;
    ``scale`` multiplies every amplitude (0: no bias, the offset is zero)."""
    names = list(names)
    unknown = (set(spec.get("class_preference") or {}) | set(spec.get("space_preference") or {})) - set(names)
    if unknown:
        raise ValueError(f"the planted-bias spec names classes {sorted(unknown)} that are not among {names}")
    C = len(names)
    pref, amp = torch.zeros(C), torch.zeros(C)
    centre, sigma = torch.full((C, 2), 0.5), torch.ones(C)
    for name, value in (spec.get("class_preference") or {}).items():
        pref[names.index(name)] = float(value)
    for name, bump in (spec.get("space_preference") or {}).items():
        c = names.index(name)
        amp[c], sigma[c] = float(bump["amplitude"]), float(bump["sigma"])
        centre[c] = torch.tensor([float(v) for v in bump["centre"]])
    return PlantedBias(text, scale * pref, scale * amp, centre, sigma, where)


def plant_bias(clip: nn.Module, spec: str | os.PathLike | Mapping[str, Any], scale: float = 1.0,
               where: str = "features") -> nn.Module:
    """Plant ``spec``'s bias in ``clip``'s dense path (``clip.visual.planted_bias``, read by
    ``backbone.dense_features``; with ``where="logits"`` by the segmenters' CLIP logits) and return
    ``clip``. The class texts are the spec's world's class names with its templates, computed with
    this CLIP's (unchanged) text encoder."""
    spec = load_spec(spec)
    names = toyworld_class_names(spec["world"])
    templates = PROMPT_TEMPLATES if spec.get("templates", "all") == "all" else list(spec["templates"])
    param = next(clip.parameters())
    text = text_embeddings(clip, names, templates).to(param.device)
    clip.visual.planted_bias = planted_bias_from_spec(spec, names, text, scale, where).to(param.device)
    clip.planted_bias_spec = dict(spec, scale=scale, where=where)
    clip.planted_bias_names = names  # the classes of B*'s rows, in order
    return clip


def planted_map(clip: nn.Module, hw: Tuple[int, int]) -> torch.Tensor:
    """The planted B* [C, h, w] of a CLIP carrying one (``ValueError`` otherwise)."""
    planted = getattr(clip.visual, "planted_bias", None)
    if planted is None:
        raise ValueError("this CLIP carries no planted bias; load it with clip.planted_bias set")
    return planted.logit_map(hw)


__all__ = ("PlantedBias", "load_spec", "plant_bias", "planted_bias_from_spec", "planted_map", "token_centres")
