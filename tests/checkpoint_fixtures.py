"""Shared helpers for the checkpoint tests (test_checkpoint, test_faults)."""
from __future__ import annotations

import torch


def optim_state(seed):
    p = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(seed)))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4)
    p.sum().backward()
    opt.step()
    return opt.state_dict()
