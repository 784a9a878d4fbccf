"""The mask decoder of ReCLIP++ (method.md §3)."""
from __future__ import annotations

import torch
from torch import nn

from .options import DECODER_INITS


class MaskDecoder(nn.Module):
    """[feat (D), rectified (C)] → 5×5 conv (padding 2) → BatchNorm over C → segmentation logits.

    ``init="kaiming"`` is the method's start (Kaiming-normal conv, fan_out). ``"rectified"`` is a
    diagnostic start: the conv passes each class's rectified logit through at its centre tap and
    reads nothing else, so training begins from the rectification's segmentation rather than from
    a random one (the BatchNorm still standardises each class channel)."""

    def __init__(self, feat_dim: int, num_classes: int, init: str = "kaiming"):
        super().__init__()
        if init not in DECODER_INITS:
            raise ValueError(f"decoder init must be one of {DECODER_INITS}, got {init!r}.")
        self.conv = nn.Conv2d(feat_dim + num_classes, num_classes, kernel_size=5, padding=2)
        self.norm = nn.BatchNorm2d(num_classes)
        # drawn for either start: the RNG then hands the same stream to everything built after it
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        if init == "rectified":
            with torch.no_grad():
                self.conv.weight.zero_()
                classes = torch.arange(num_classes)
                self.conv.weight[classes, feat_dim + classes, 2, 2] = 1.0  # output c = rectified c

    def forward(self, feat: torch.Tensor, rectified: torch.Tensor) -> torch.Tensor:
        x = torch.cat([feat, rectified.to(feat.dtype)], dim=1)
        return self.norm(self.conv(x))
