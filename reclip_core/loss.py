"""The Gumbel-Softmax masked contrastive loss of ReCLIP++ (method.md §3), vectorised over
classes and images."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .options import LOSS_NORMALISATIONS

#: a batch's image-level hypotheses: a [B, C] 0/1 mask, or each image's list of class indices
BatchHypotheses = Union[torch.Tensor, Sequence[Sequence[int]]]


def gumbel_softmax_hard(
    logits: torch.Tensor, tau: float = 1.0, dim: int = 1, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Hard (one-hot, straight-through) Gumbel-Softmax like ``F.gumbel_softmax(hard=True)``,
    but drawing the noise from ``generator`` so a seed reproduces the masks."""
    # Gumbel(0, 1) = -log(E) with E ~ Exp(1), the same construction as torch's gumbel_softmax.
    expo = torch.empty(logits.shape, device=logits.device, dtype=torch.float32).exponential_(generator=generator)
    gumbels = -expo.log()
    y_soft = ((logits.float() + gumbels) / tau).softmax(dim)
    index = y_soft.argmax(dim, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def hypotheses_to_mask(hypotheses: BatchHypotheses, batch: int, num_classes: int, device=None) -> torch.Tensor:
    """Image-level hypotheses (lists of class indices, or a [B, C] 0/1 tensor) → bool [B, C]."""
    if isinstance(hypotheses, torch.Tensor):
        mask = hypotheses.to(device=device).bool()
        if mask.shape != (batch, num_classes):
            raise ValueError(f"hypothesis mask must be [B, C] = [{batch}, {num_classes}], got {tuple(mask.shape)}.")
        return mask
    if len(hypotheses) != batch:
        raise ValueError(f"got {len(hypotheses)} hypothesis lists for a batch of {batch} images.")
    mask = torch.zeros(batch, num_classes, dtype=torch.bool, device=device)
    for i, classes in enumerate(hypotheses):
        for k in classes:
            if not 0 <= int(k) < num_classes:
                raise ValueError(f"hypothesis class {k} of image {i} is outside [0, {num_classes}).")
            mask[i, int(k)] = True
    return mask


def gumbel_masked_contrastive_loss(
    logits: torch.Tensor,
    feat: torch.Tensor,
    text: torch.Tensor,
    hypotheses: BatchHypotheses,
    gumbel_scale: float = 100.0,
    tau: float = 1.0,
    score_scale: float = 100.0,
    generator: Optional[torch.Generator] = None,
    return_masks: bool = False,
    normalisation: str = "nonempty",
):
    """Loss per image: m = hard GumbelSoftmax(gumbel_scale · logits) over classes; for every
    hypothesis class k, pooled_k = Σ_pixels feat·m_k / (h·w) (divided by the image area, not the
    mask area); scores_k = score_scale · pooled_k · textᵀ; cross-entropy(scores_k, k). Mean over the
    image's hypothesis classes, then over the batch: ``normalisation="nonempty"`` averages over the
    images with a non-empty hypothesis; ``"batch"`` (the release) sums and divides by B, so an
    image with an empty hypothesis adds 0 but still counts.

    All C classes are scored at once ([B, C, C] scores) and masked afterwards, which equals the
    per-class loop of the release.
    """
    if logits.ndim != 4 or feat.ndim != 4 or logits.shape[0] != feat.shape[0] or logits.shape[-2:] != feat.shape[-2:]:
        raise ValueError(f"expected logits [B, C, h, w] and feat [B, D, h, w] of equal B, h, w; "
                         f"got {tuple(logits.shape)} and {tuple(feat.shape)}.")
    if normalisation not in LOSS_NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {LOSS_NORMALISATIONS}, got {normalisation!r}.")
    B, C, h, w = logits.shape
    mask = hypotheses_to_mask(hypotheses, B, C, device=logits.device)
    m = gumbel_softmax_hard(gumbel_scale * logits, tau=tau, dim=1, generator=generator)  # [B, C, h, w]
    pooled = torch.bmm(m.flatten(2), feat.float().flatten(2).transpose(1, 2)) / (h * w)  # [B, C, D]
    scores = score_scale * pooled @ text.float().t()  # [B, C(k), C]
    target = torch.arange(C, device=logits.device).repeat(B)
    ce = F.cross_entropy(scores.reshape(B * C, C), target, reduction="none").view(B, C)
    weights = mask.float()
    n_per_image = weights.sum(dim=1)
    has_hyp = n_per_image > 0
    if not has_hyp.any():
        loss = (logits.sum() * 0.0).float()  # keeps the graph; nothing to learn from this batch
    elif normalisation == "batch":
        # release: loss = Σ_images loss_i / B, with loss_i = 0 for an empty hypothesis
        loss = ((ce * weights).sum(dim=1)[has_hyp] / n_per_image[has_hyp]).sum() / B
    else:
        per_image = (ce * weights).sum(dim=1)[has_hyp] / n_per_image[has_hyp]
        loss = per_image.mean()
    return (loss, m) if return_masks else loss
