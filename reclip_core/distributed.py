"""DDP helpers: the process group under torchrun, and a BatchNorm whose statistics cover the global
batch (so N processes follow the 1-process trajectory at equal global batch)."""
from __future__ import annotations

import os
import warnings
from typing import Tuple

import torch
import torch.distributed as dist
from torch import nn


def dist_info() -> Tuple[int, int]:
    """(world size, rank); (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def init_distributed_from_env(device: str = "auto") -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1): NCCL with
    CUDA, gloo otherwise. Returns True when a group is (now) initialised."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_initialized():
        return True
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def process_device(device: torch.device) -> torch.device:
    """This process's device: under torchrun each process takes the GPU of its ``LOCAL_RANK``."""
    world, _ = dist_info()
    if world > 1 and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """The module a training step calls: ``model`` itself, or its DDP wrapper in a process group."""
    world, _ = dist_info()
    if world == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False)  # BN statistics are already global: no per-step broadcast


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable all-reduce (sum); its backward sums the gradients of all processes.

    ``torch.distributed.nn.functional.all_reduce`` is deprecated in torch 2.14 in favour of the
    functional collectives, whose autograd support is still marked private; torch is pinned, so
    we keep the documented one and silence its FutureWarning."""
    # Imported here, not at the top: it raises ImportError on a torch built without distributed
    # support (dist.is_available() False), where single-process training must still work.
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(t)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the whole global batch of a DDP run.

    Same parameters and buffers as ``nn.BatchNorm2d`` (checkpoints are interchangeable); with one
    process it *is* ``nn.BatchNorm2d``. With several, mean and variance are all-reduced
    (differentiably, two passes for accuracy); this works with gloo on CPU, unlike
    ``nn.SyncBatchNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world, _ = dist_info()
        if not self.training or world == 1:
            return super().forward(x)
        C = x.shape[1]
        count = torch.tensor([x.numel() / C], dtype=x.dtype, device=x.device)
        stats = _all_reduce_sum(torch.cat([x.sum(dim=(0, 2, 3)), count]))
        n = stats[C]
        mean = stats[:C] / n
        centred = x - mean.view(1, C, 1, 1)
        var = _all_reduce_sum(centred.pow(2).sum(dim=(0, 2, 3))) / n  # biased, used for normalising
        with torch.no_grad():
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                # the running variance is unbiased, as nn.BatchNorm2d keeps it
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / max(float(n) - 1, 1.0))
        y = centred / torch.sqrt(var + self.eps).view(1, C, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        return y


def use_global_batchnorm(model: nn.Module) -> nn.Module:
    """Switch every BatchNorm2d outside the frozen CLIP to :class:`GlobalBatchNorm2d` (in place)."""
    for name, module in model.named_modules():
        if not name.startswith("clip") and type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d  # same parameters and buffers: only forward changes
    return model


__all__ = ("dist_info", "init_distributed_from_env", "process_device", "wrap_ddp", "GlobalBatchNorm2d",
           "use_global_batchnorm")
