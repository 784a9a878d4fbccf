"""How well a learned bias map recovers a planted one (the known-answer bias lab).

The argmax over classes ignores a constant added to every class at one position, so both maps are
centred over classes at each position first; what is left is what changes a prediction:

    B̃[c, p] = B[c, p] − mean_c' B[c', p]

    recovery (overall)   r   = Σ_{c,p} L̃ B̃ / (‖L̃‖ ‖B̃‖)       (a correlation: the centred maps
                                                                  have zero mean over all (c, p))
    recovery of class c  r_c = Σ_p L̃[c] B̃[c] / (‖L̃[c]‖ ‖B̃[c]‖)
    scale                s   = Σ L̃ B̃ / Σ B̃²                   (1: the learned map has the planted size)
    scale of class c     s_c = Σ_p L̃[c] B̃[c] / Σ_p B̃[c]²

A learned map equal to the planted one plus any per-position constant scores r = r_c = 1, s = 1;
an unrelated map scores r ≈ 0.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch


class BiasRecovery(NamedTuple):
    overall: float       # r above
    scale: float         # s above
    per_class: pd.DataFrame  # class, recovery (r_c), scale (s_c), planted_range, learned_range (centred rows)


def centre_over_classes(bias: np.ndarray) -> np.ndarray:
    """[C, h, w] → the map minus its mean over classes at each position."""
    bias = np.asarray(bias, dtype=np.float64)
    return bias - bias.mean(axis=0, keepdims=True)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na > 0 and nb > 0 else float("nan")


def _scale(learned: np.ndarray, planted: np.ndarray) -> float:
    # s = Σ L̃ B̃ / Σ B̃²: the least-squares size of the learned map along the planted one
    denom = float((planted ** 2).sum())
    return float((learned * planted).sum() / denom) if denom > 0 else float("nan")


def bias_recovery(learned: np.ndarray | torch.Tensor, planted: np.ndarray | torch.Tensor,
                  class_names: Sequence[str] | None = None) -> BiasRecovery:
    """Compare a learned bias map with the planted one, both [C, h, w] on the same grid."""
    learned = learned.detach().cpu().numpy() if isinstance(learned, torch.Tensor) else np.asarray(learned)
    planted = planted.detach().cpu().numpy() if isinstance(planted, torch.Tensor) else np.asarray(planted)
    if learned.shape != planted.shape or learned.ndim != 3:
        raise ValueError(f"learned and planted maps must both be [C, h, w]; got {learned.shape} and {planted.shape}")
    lc, pc = centre_over_classes(learned), centre_over_classes(planted)
    C = pc.shape[0]
    names = list(class_names) if class_names is not None else [str(c) for c in range(C)]
    rows = [{"class": names[c], "recovery": _cosine(lc[c], pc[c]), "scale": _scale(lc[c], pc[c]),
             "planted_range": float(pc[c].max() - pc[c].min()), "learned_range": float(lc[c].max() - lc[c].min())}
            for c in range(C)]
    return BiasRecovery(_cosine(lc, pc), _scale(lc, pc), pd.DataFrame(rows))


__all__ = ("BiasRecovery", "bias_recovery", "centre_over_classes")
