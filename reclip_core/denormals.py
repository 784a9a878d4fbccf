"""Denormal floats flushed to zero while the heads train on a CPU.

As the decoder's logits sharpen, the straight-through gradient of the loss's hard Gumbel-Softmax
underflows: on the toy runs, from within the first epoch, 10–19 % of the entries of the gradient
reaching the decoder's convolution are denormal (|x| < 1.18e-38). x86 CPUs compute on denormals in
microcode, and that convolution's backward, the bulk of a step, then runs several times slower.
Flushing them to zero (FTZ/DAZ) changes a result only where a denormal survives a sum with normal
numbers: ReCLIP++ and the rectification train on the toy world to bit-identical weights with and
without it, ReCLIP to other weights (docs/training.md).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def flushed_denormals() -> Iterator[bool]:
    """Inside the block, denormals read and written by the CPU are zero (where the CPU supports it;
    yields whether it does). On exit denormals are kept again, torch's default."""
    # torch sets the calling thread's float control register, which threads started later inherit;
    # intra-op threads already running keep theirs, so with several CPU threads part of the work may
    # still run on denormals (the toy configs train on one thread)
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        if supported:
            torch.set_flush_denormal(False)


__all__ = ("flushed_denormals",)
