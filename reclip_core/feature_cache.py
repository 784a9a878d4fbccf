"""The feature cache: the frozen CLIP's dense features of a few fixed views of every training image,
computed once so that training steps run only the small heads."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .atomic_io import atomic_save_safetensors
from .distributed import dist_info
from .provenance import feature_cache_key, load_feature_cache
from .views import CachedViews, TrainViews


@torch.no_grad()
def build_feature_cache(model: nn.Module, views: TrainViews, n_views: int, batch_size: int, device: torch.device,
                        path: Optional[Path] = None, progress: bool = True) -> CachedViews:
    """Dense CLIP features of ``n_views`` fixed views of every image, stored as float16 (memory:
    N · V · D · (crop/patch)² · 2 bytes). Reused from ``path`` when it was built with the same key."""
    key = feature_cache_key(model, views, n_views)  # a cache may be shared between runs (feature_cache_path)
    t = load_feature_cache(path, key) if path is not None else None
    if t is not None:
        return CachedViews(t["feats"], t["hyps"].bool())
    feats, hyps = [], None
    model.eval()
    bar = tqdm(total=n_views * len(views), desc="feature cache", disable=not progress, unit="view")
    for v in range(n_views):
        views.fixed_view = v
        per_view, per_hyp = [], []
        for start in range(0, len(views), batch_size):
            items = [views[i] for i in range(start, min(start + batch_size, len(views)))]
            x = torch.stack([it["image"] for it in items]).to(device)
            f, _ = model.features(x)
            per_view.append(f.to(torch.float16).cpu())
            per_hyp.append(torch.stack([it["hyp"] for it in items]))
            bar.update(len(items))
        feats.append(torch.cat(per_view))
        hyps = torch.cat(per_hyp)
    bar.close()
    views.fixed_view = None  # back to the per-epoch views
    cache = CachedViews(torch.stack(feats), hyps)
    if path is not None:
        atomic_save_safetensors({"feats": cache.feats, "hyps": cache.hyps.to(torch.uint8)}, path, metadata={"key": key})
    return cache


def shared_feature_cache(model: nn.Module, views: TrainViews, n_views: int, batch_size: int, device: torch.device,
                         path: Path, progress: bool = True) -> CachedViews:
    """The feature cache of a run, single process or DDP: rank 0 builds (or checks) the file at
    ``path`` while the others wait, then every process reads it: one CLIP pass, not one per process."""
    world, rank = dist_info()
    if rank == 0:
        build_feature_cache(model, views, n_views, batch_size, device, path, progress)
    if world > 1:
        dist.barrier()
    return build_feature_cache(model, views, n_views, batch_size, device, path, False)


__all__ = ("build_feature_cache", "shared_feature_cache")
