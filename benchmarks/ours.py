"""Our paths: the library's own public code, called the way the CLI and notebooks call it (the
"ours" column of the benchmark table).

- evaluation: the loop body of :func:`reclip_core.evaluation.evaluate` (:func:`ours_eval_image`
  runs its ``Scorer``, tested equal to ``evaluate``) — ``ReCLIPPP`` in eval mode under ``no_grad``
  computes the Reference features and the bias map once per input size, each head asked for is
  upsampled once, and the predictions stream into ``SegMetric`` (no per-image files);
- hypotheses: :func:`reclip_core.hypothesis.window_vote` — windows packed into batched CLIP
  forwards;
- training: the training loop's step (:func:`reclip_core.training._step`: one forward of a
  mini-batch, the vectorised Gumbel loss per image, one SGD step) over the library's label-free
  views (:class:`reclip_core.views.TrainViews`), optionally on the library's feature cache
  (:func:`reclip_core.feature_cache.build_feature_cache`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import default_collate

from reclip_core.eval_scoring import Scorer, eval_item
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
    with _forward_hooks(model, on_forward):
        return evaluate(model, dataset, test_size, pd_threshold, heads=["reclip++"], progress=False)


def ours_scorer(model, pd_threshold: float, heads: Optional[Sequence[str]] = ("reclip++",),
                pd_variants: Sequence[str] = ("no_pd", "pd")) -> Scorer:
    """The library's per-forward scoring (:class:`reclip_core.eval_scoring.Scorer`, what
    :func:`reclip_core.evaluation.evaluate` runs per batch) for ``heads`` (None: every head of the
    model, as ``evaluate_run``) and ``pd_variants``; its metrics: ``scorer.metrics[head][variant]``."""
    return Scorer(model, None if heads is None else list(heads), pd_rule=(pd_threshold, 10.0),
                  model_pd=getattr(model, "pd_rule", None), pd_variants=pd_variants)


@contextlib.contextmanager
def _forward_hooks(model, on_forward: Optional[Callable[[str, Optional[torch.Tensor]], None]]):
    """``on_forward("start"|"end", tensor)`` around each forward of ``model`` (for timing)."""
    handles = []
    if on_forward is not None:
        handles.append(model.register_forward_pre_hook(lambda m, a, k: on_forward("start", None), with_kwargs=True))
        handles.append(model.register_forward_hook(lambda m, a, k, out: on_forward("end", out["logits"]),
                                                   with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def ours_eval_image(scorer: Scorer, item: dict, test_size: int,
                    on_forward: Optional[Callable[[str, Optional[torch.Tensor]], None]] = None) -> None:
    """One image exactly as :func:`reclip_core.evaluation.evaluate` handles it (batch size 1):
    the library's test-size resize and label check (``eval_item``), then ``scorer.score`` — the
    model forward (bias cached per input size), each head's upsampling to the label size, the
    argmax with and without PD, the streaming metrics. Timing needs images one at a time
    (``evaluate`` re-enters eval mode, which drops the cache, once per call); tests check it
    equals ``evaluate``."""
    with _forward_hooks(scorer.model, on_forward):
        scorer.score([eval_item(item, 0, test_size)])


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


__all__ = ("window_geometry", "ours_hypothesis", "ours_evaluate", "ours_scorer", "ours_eval_image", "ours_train_epoch", "ours_train_first_step",
           "ours_feature_cache")
