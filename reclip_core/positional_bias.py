"""The positional feature: a projection of CLIP's positional embedding that models the
space-preference bias (method.md §2)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .backbone import output_dim, resize_patch_pos_embed, visual_width


def resized_positional_embedding(clip: nn.Module, hw: Tuple[int, int]) -> torch.Tensor:
    """CLIP's patch positional embedding resized (bicubic) to ``hw`` → [width, h, w]."""
    pos = resize_patch_pos_embed(clip.visual, hw)
    return pos.t().reshape(-1, hw[0], hw[1])


class PositionalBias(nn.Module):
    """``pe_feat`` = 1×1 convolution (width → D, with bias) of the resized positional embedding,
    [D, h, w]; it depends on the input size only, never on the image."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.__dict__["clip"] = clip  # frozen CLIP owned by the model, not a submodule
        self.proj = nn.Conv2d(visual_width(clip), output_dim(clip), kernel_size=1, bias=True)

    def forward(self, hw: Tuple[int, int]) -> torch.Tensor:
        pe = resized_positional_embedding(self.clip, hw).to(self.proj.weight.dtype)
        return self.proj(pe.unsqueeze(0)).squeeze(0)
