"""The mask decoder of ReCLIP++ (method.md §3)."""
from __future__ import annotations

import torch
from torch import nn


class MaskDecoder(nn.Module):
    """[feat (D), rectified (C)] → 5×5 conv (padding 2) → BatchNorm over C → segmentation logits."""

    def __init__(self, feat_dim: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(feat_dim + num_classes, num_classes, kernel_size=5, padding=2)
        self.norm = nn.BatchNorm2d(num_classes)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, feat: torch.Tensor, rectified: torch.Tensor) -> torch.Tensor:
        x = torch.cat([feat, rectified.to(feat.dtype)], dim=1)
        return self.norm(self.conv(x))
