"""Our paths: the library's own public code, called the way the CLI and notebooks call it (the
"ours" column of the benchmark table).

- evaluation: the loop body of :func:`reclip_core.evaluation.evaluate` (:func:`ours_eval_image`,
  tested equal to ``evaluate``) — ``ReCLIPPP`` in eval mode under ``no_grad`` computes the
  Reference features and the bias map once per input size, and the predictions stream into
  ``SegMetric`` (no per-image files);
- hypotheses: :func:`reclip_core.hypothesis.window_vote` — windows packed into batched CLIP
  forwards;
- training: the training loop's step (:func:`reclip_core.training._step`: one forward of a
  mini-batch, the vectorised Gumbel loss per image, one SGD step) over the library's label-free
  views (:class:`reclip_core.views.TrainViews`), optionally on the library's feature cache
  (:func:`reclip_core.feature_cache.build_feature_cache`).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.data import default_collate

from reclip_core.evaluation import EvalReport, evaluate
from reclip_core.hypothesis import window_vote
from reclip_core.feature_cache import build_feature_cache
from reclip_core.training import _step
from reclip_core.views import CachedViews, TrainViews


def window_geometry(crop: int) -> Tuple[int, int]:
    """Hypothesis window side int(crop / 6) and stride int(side / 2) (method.md §3)."""
    window = int(crop / 6)
    return window, int(window / 2)


def ours_hypothesis(clip, image, text: torch.Tensor, window: int, stride: int, input_size: int,
                    batch_size: int = 64) -> List[int]:
    """The sorted hypothesis classes of one image (library: batched window vote)."""
    ((_, hyp),) = list(window_vote(clip, [("image", image)], text, window, stride, input_size,
                                   batch_size=batch_size))
    return hyp


def ours_evaluate(model, dataset, test_size: int, pd_threshold: float,
                  on_forward: Optional[Callable[[str, Optional[torch.Tensor]], None]] = None) -> EvalReport:
    """The library's evaluation of the ReCLIP++ head (PD on and off). ``on_forward("start"|"end",
    tensor)`` is called around each model forward through module hooks (for timing)."""
    handles = []
    if on_forward is not None:
        handles.append(model.register_forward_pre_hook(lambda m, a, k: on_forward("start", None), with_kwargs=True))
        handles.append(model.register_forward_hook(lambda m, a, k, out: on_forward("end", out["logits"]),
                                                   with_kwargs=True))
    try:
        return evaluate(model, dataset, test_size, pd_threshold, heads=["reclip++"], progress=False)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def ours_eval_image(model, item: dict, test_size: int, pd_threshold: float, metrics: Dict[str, "SegMetric"],
                    on_forward: Optional[Callable[[str, Optional[torch.Tensor]], None]] = None) -> None:
    """One image exactly as the loop body of :func:`reclip_core.evaluation.evaluate` for the
    ReCLIP++ head: test-size resize, the model forward (bias cached per input size), PD off and on,
    the library's upsampling, argmax, streaming metrics (``metrics["no_pd"]``, ``metrics["pd"]``).
    Timing needs images one at a time (``evaluate`` re-enters eval mode, which drops the cache,
    once per call); tests check it equals ``evaluate``."""
    import numpy as np

    from reclip_core.evaluation import upsample_logits
    from reclip_core.rectify import presence_filter
    from reclip_core.transforms import eval_preprocess

    patch = model.clip.visual.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    label = np.asarray(item["label"])
    x = eval_preprocess(item["image"], test_size).to(model.clip.visual.conv1.weight.device)
    if on_forward:
        on_forward("start", x)
    logits = model(images=x)["logits"]
    if on_forward:
        on_forward("end", logits)
    label_t = torch.from_numpy(label.astype(np.int64))
    for tag, lg in (("no_pd", logits), ("pd", presence_filter(logits, pd_threshold))):
        up = upsample_logits(lg, patch, tuple(x.shape[-2:]), tuple(label.shape[-2:]))
        metrics[tag].update(up.argmax(dim=1)[0].cpu(), label_t)


def _batches(data, batch_size: int):
    for start in range(0, len(data), batch_size):
        yield default_collate([data[i] for i in range(start, min(start + batch_size, len(data)))])


def ours_train_epoch(model, optimizer, data, batch_size: int, epoch: int, device: torch.device,
                     seed: int = 0) -> List[float]:
    """One epoch of the library's training step over ``data`` (:class:`TrainViews` or
    :class:`CachedViews`) in mini-batches of ``batch_size``."""
    model.train()
    data.epoch = epoch
    return [_step(model, model, optimizer, batch, device, seed, epoch, 1)[0] for batch in _batches(data, batch_size)]


def ours_train_first_step(model, optimizer, data, batch_size: int, device: torch.device, seed: int = 0) -> float:
    model.train()
    return _step(model, model, optimizer, next(_batches(data, batch_size)), device, seed, 0, 1)[0]


def ours_feature_cache(model, views: TrainViews, batch_size: int, device: torch.device) -> CachedViews:
    """The library's feature cache of one fixed view per image (float16)."""
    cache = build_feature_cache(model, views, n_views=1, batch_size=batch_size, device=device, progress=False)
    model.train()
    return cache


__all__ = ("window_geometry", "ours_hypothesis", "ours_evaluate", "ours_eval_image", "ours_train_epoch", "ours_train_first_step",
           "ours_feature_cache")
