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

An optional **patch noise** (``patch_noise: {sigma, seed}`` in a spec) makes the patches noisier
than the regions they pool into, as on real CLIP, whose single patches are read less reliably than
whole objects. It is zero-mean logit noise in the span of the class texts, a deterministic function
of each patch's pixels, so every view of an image carries its own, and pooling over a region
averages it away while a smooth bias stays:

    u_p = R (x_p − x̄_p)                        (x_p the patch's CLIP-normalised pixels, x̄_p their
                                                  mean per channel, R a fixed Gaussian [C, 3·P·P])
    n_p = σ · √C · u_p / |u_p|                  (each class's logit moves by about σ at random)
    noise offset  T⁺ n_p,   so the logits move by n_p exactly

It is the CLIP's own property, not the bias: ``scale`` leaves it unchanged, it enters the features
for either ``where``, and the planted map B* does not contain it.

A diagnostic variant (``where="logits"``) adds B* to the segmenters' CLIP logits instead and leaves
the dense features clean: the same biased MaskCLIP, but the training loss, which pools the dense
features, no longer reads the bias. It separates "the loss reads the bias" from "the optimisation
fails" when a model does not remove it. ReCLIP++ reads the dense features twice, in its decoder and
in its loss; ``where="loss"`` and ``where="decoder"`` add B* to the logits and the offset to the
features of one reader only (the other reads them clean), which separates the two.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Tuple

import torch
import yaml
from torch import nn
from torch.nn import functional as F

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
    noise = spec.get("patch_noise")
    if noise is not None and (not isinstance(noise, Mapping) or set(noise) != {"sigma", "seed"}
                              or not float(noise["sigma"]) >= 0):
        raise ValueError("patch_noise must be {sigma: >= 0 (cosine-logit units), seed: an integer}")
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

    #: where the bias enters: "features" (the dense features, exact on the logits), "logits" (the
    #: logits only), "loss" / "decoder" (the logits, and the features that ReCLIP++'s loss / decoder reads)
    WHERE = ("features", "logits", "loss", "decoder")

    def __init__(self, text: torch.Tensor, class_preference: torch.Tensor, amplitude: torch.Tensor,
                 centre: torch.Tensor, sigma: torch.Tensor, where: str = "features",
                 noise_sigma: float = 0.0, noise_projection: torch.Tensor | None = None, patch: int = 4):
        super().__init__()
        if where not in self.WHERE:
            raise ValueError(f"a planted bias enters the dense features, the logits or one reader of the features: "
                             f"where in {self.WHERE}, got {where!r}")
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
        # patch noise: its size σ and the fixed projection R [C, 3·P·P] of a patch's pixels
        # (buffers only when there is noise, so a CLIP without it keeps its fingerprint and caches)
        self.noise_sigma, self.patch = float(noise_sigma), int(patch)
        self.register_buffer("noise_projection", None)  # a None buffer is not in the state_dict
        if self.noise_sigma > 0:
            if noise_projection is None or tuple(noise_projection.shape) != (C, 3 * patch * patch):
                raise ValueError(f"patch noise needs a projection [C, 3·P·P] = [{C}, {3 * patch * patch}]")
            self.register_buffer("noise_projection", noise_projection.double())
            self.register_buffer("noise_size", torch.tensor([self.noise_sigma, float(patch)], dtype=torch.float64))

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

    def feature_offset_map(self, hw: Tuple[int, int]) -> torch.Tensor:
        """b as a feature map [1, D, h, w]."""
        return self.feature_offset(hw).T.reshape(1, -1, *hw)  # [h*w, D] -> [1, D, h, w]

    def patch_noise(self, images: torch.Tensor) -> torch.Tensor:
        """n [B, h*w, C]: the logit noise of each patch of ``images`` [B, 3, H, W] (CLIP-normalised)."""
        B, patch = images.shape[0], self.patch
        x = F.unfold(images.double(), kernel_size=patch, stride=patch)  # [B, 3·P·P, h*w]
        x = x.view(B, 3, patch * patch, -1)
        x = (x - x.mean(2, keepdim=True)).flatten(1, 2)  # the patch's texture, its colour removed
        # u_p = R (x_p − x̄_p);  n_p = σ · √C · u_p / |u_p|
        u = torch.einsum("ck,bkp->bpc", self.noise_projection, x)  # [B, h*w, C]
        C = u.shape[-1]
        return self.noise_sigma * C ** 0.5 * u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def noise_offset(self, images: torch.Tensor) -> torch.Tensor:
        """T⁺ n_p [B, h*w, D] for each patch of ``images`` (a zero scalar without patch noise)."""
        if self.noise_projection is None:
            return images.new_zeros(())
        return (self.patch_noise(images) @ self.dual.double().T).to(images.dtype)

    def forward(self, hw: Tuple[int, int]) -> torch.Tensor:
        return self.feature_offset(hw)


def planted_bias_from_spec(spec: Mapping[str, Any], names: Sequence[str], text: torch.Tensor,
                           scale: float = 1.0, where: str = "features", patch: int = 4) -> PlantedBias:
    """A :class:`PlantedBias` for the classes ``names`` (text features ``text`` [C, D]) from a spec;
    ``scale`` multiplies every amplitude (0: no bias, the offset is zero), not the patch noise, whose
    projection reads patches of ``patch`` pixels."""
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
    noise = spec.get("patch_noise") or {"sigma": 0.0, "seed": 0}
    gen = torch.Generator().manual_seed(int(noise["seed"]))
    projection = torch.randn(C, 3 * patch * patch, generator=gen, dtype=torch.float64)
    return PlantedBias(text, scale * pref, scale * amp, centre, sigma, where, float(noise["sigma"]), projection,
                       patch)


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
    patch = clip.visual.patch_size
    patch = int(patch if isinstance(patch, int) else patch[0])
    clip.visual.planted_bias = planted_bias_from_spec(spec, names, text, scale, where, patch).to(param.device)
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
