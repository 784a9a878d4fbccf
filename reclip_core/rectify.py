"""Bias logit map, rectification and the presence filter (method.md §2, §4)."""
from __future__ import annotations

import torch


def bias_logits(pe_feat: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """bias[c, y, x] = pe_feat[:, y, x] · ref[c] → [C, h, w]; independent of the image."""
    if pe_feat.ndim != 3 or ref.ndim != 2 or pe_feat.shape[0] != ref.shape[1]:
        raise ValueError(f"expected pe_feat [D, h, w] and ref [C, D]; got {tuple(pe_feat.shape)} and {tuple(ref.shape)}.")
    return torch.einsum("dhw,cd->chw", pe_feat, ref.to(pe_feat.dtype))


def rectify(clip_logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Rectified logits = CLIP logits − bias map (broadcast over the batch)."""
    if clip_logits.shape[-3:] != bias.shape[-3:]:
        raise ValueError(f"bias map {tuple(bias.shape)} does not match logits {tuple(clip_logits.shape)}.")
    return clip_logits - bias.to(clip_logits.dtype)


def clip_logits(feat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per patch, no logit scale: [B, D, h, w] × [C, D] → [B, C, h, w]."""
    return torch.einsum("bdhw,cd->bchw", feat, text.to(feat.dtype))


def presence_filter(logits: torch.Tensor, threshold: float, scale: float = 10.0) -> torch.Tensor:
    """PD: classes whose max over pixels of softmax(scale·logits) is below ``threshold`` get
    logit −100 everywhere (per image). ``threshold >= 1`` keeps only saturated classes."""
    prob = torch.softmax(scale * logits.float(), dim=1)
    present = prob.flatten(2).amax(dim=2) >= threshold  # [B, C]
    return torch.where(present[:, :, None, None], logits, torch.full_like(logits, -100.0))
