"""Evaluation (method.md §4): whole-image inference at the test size, PD on and off, bilinear
upsampling to the label size, dataset-level mIoU (both definitions) and the per-class table.

One forward of a ReCLIP++ model gives three segmentations — ``maskclip`` (the frozen CLIP logits,
the biased baseline), ``rectified`` (CLIP logits − bias map) and ``reclip++`` (the decoder
output) — so all three are scored in one pass, each with and without PD, into streaming
:class:`~reclip_core.metrics.SegMetric` confusion matrices (nothing is written per image).
Further measurements ride along as *accumulators* (:class:`Accumulator`): objects whose
``update(batch)`` sees each head's predictions, logits, labels and model outputs batch by batch
(the bias metrics and kept examples of :func:`evaluate` are two of them). The model runs in eval
mode under ``no_grad``, where it computes the Reference features and the bias map once per input
size and reuses them. What one forward scores, and how cheaply, is :mod:`reclip_core.eval_scoring`.

Choices (documented deviations or unknowns of the release):

* PD is applied to the logits at the token grid, before upsampling (the max over pixels of a
  bilinear upsampling of the grid can only differ by interpolation of neighbouring logits);
* the logits are first upsampled to the padded input size, the padding is cropped off, then they
  are upsampled to the label size (mmseg's order; ``upsampling="release"``: the padded grid
  straight to the unpadded size, as the release);
* the test resize is torch's antialiased bilinear (``resize="release"``: OpenCV-style bilinear on
  the 8-bit image, as the release);
* the last checkpoint is evaluated; no checkpoint is chosen by validation score.

This is evaluation code: it reads labels (training never does).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import find_checkpoint, load_model_weights
from .eval_report import EvalReport
from .eval_scoring import (HEAD_KEYS, PD_VARIANTS, Accumulator, EvalBatch, EvalItem, KeptExamples,
                           PredictionAccumulator, Scorer, eval_item, patch_size, upsample_logits)
from .model_factory import build_model
from .run_inputs import build_dataset
from .run_lock import run_folder_lock


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    test_size: int,
    pd_threshold: float,
    max_long_side: int = 2048,
    heads: Optional[Sequence[str]] = None,
    max_images: Optional[int] = None,
    ignore_index: int = 255,
    progress: bool = True,
    batch_size: int = 1,
    bias_grid: Optional[int] = None,
    examples: int = 0,
    pd_scale: float = 10.0,
    model_pd: Optional[Tuple[float, float]] = None,
    accumulators: Optional[Mapping[str, Sequence[Accumulator]]] = None,
    pd_variants: Sequence[str] = PD_VARIANTS,
    upsampling: str = "crop",
    resize: str = "torch",
) -> EvalReport:
    """Score ``model`` on a labelled split (items ``{"id", "image", "label"}``).

    ``heads`` defaults to every head the model outputs (``maskclip`` always; ``rectified`` and
    ``reclip++`` for ReCLIP++/ReCLIP); ``pd_variants`` to both PD settings (``("pd",)``: with PD
    only, as the release scores). Heads and settings left out are not computed. Whole-image
    inference; up to ``batch_size`` *consecutive*
    images whose resized inputs have the same size share one forward (the result is the same as
    one image at a time, up to float rounding; with varied image sizes batches are mostly 1).
    ``bias_grid`` also accumulates the class- and space-bias metrics of each head (no PD) on a
    ``bias_grid``×``bias_grid`` grid (``report.bias``); ``examples`` keeps the first images and
    their predictions for figures (``report.examples``). ``accumulators`` maps a head to further
    :class:`Accumulator` s, each given an :class:`EvalBatch` of that head per forward (per image
    when label sizes differ within it). PD: softmax(``pd_scale``·logits) against
    ``pd_threshold``; ``model_pd`` = (threshold, scale), by default the model's ``pd_rule`` (set by
    ``build_model`` from ``run_inputs.presence_rule``), replaces that rule on the model's own
    heads (``rectified``, ``reclip++``); MaskCLIP keeps the first. ``upsampling`` and ``resize``:
    the release options ``eval_upsampling`` and ``test_resize`` (module doc).
    """
    model.eval()
    model_pd = model_pd if model_pd is not None else getattr(model, "pd_rule", None)
    scorer = Scorer(model, heads, ignore_index=ignore_index, pd_rule=(pd_threshold, pd_scale), model_pd=model_pd,
                    bias_grid=bias_grid, examples=examples, accumulators=accumulators, pd_variants=pd_variants,
                    upsampling=upsampling)
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    buffer: List[EvalItem] = []
    for i in tqdm(range(n), desc="evaluate", disable=not progress, unit="img"):
        item = eval_item(dataset[i], i, test_size, max_long_side, resize=resize)
        if buffer and (item.input.shape != buffer[0].input.shape or len(buffer) >= batch_size):
            scorer.score(buffer)
            buffer = []
        buffer.append(item)
    if buffer:
        scorer.score(buffer)
    if scorer.metrics is None:
        raise ValueError("the evaluation split is empty.")
    return EvalReport(list(model.class_names), scorer.metrics, n, float(pd_threshold), bias=scorer.bias,
                      examples=scorer.kept.kept if scorer.kept is not None else {})


def evaluate_run(
    cfg: Mapping[str, Any],
    checkpoint: Optional[os.PathLike] = None,
    run_dir: Optional[os.PathLike] = None,
    dataset=None,
    clip: Optional[nn.Module] = None,
    progress: bool = True,
    save: bool = True,
    allow_legacy: bool = False,
) -> EvalReport:
    """Evaluate a trained run (default: the last checkpoint in ``<run>/checkpoints``) with MaskCLIP,
    rectification and ReCLIP++ side by side; saves to ``<run>/eval``. Without any checkpoint (none
    given and none in the run) only MaskCLIP is evaluated.

    The checkpoint is checked before anything is computed (classes, CLIP weights, templates, every
    tensor: ``checkpoint.load_model_weights``; ``allow_legacy`` accepts one predating the CLIP/template
    record), so a refused one never replaces ``eval/``. With ``save`` the run folder's lock is held
    throughout: a concurrent writer (train, another evaluate) is refused, not interleaved."""
    run = Path(run_dir) if run_dir is not None else Path(cfg["output_dir"] or Path("runs") / getattr(cfg, "name", "custom"))
    args = (cfg, checkpoint, run, dataset, clip, progress, save, allow_legacy)
    if not save:
        return _evaluate_run(*args)
    with run_folder_lock(run, "evaluate"):
        return _evaluate_run(*args)


def _evaluate_run(cfg: Mapping[str, Any], checkpoint: Optional[os.PathLike], run: Path, dataset, clip: Optional[nn.Module],
                  progress: bool, save: bool, allow_legacy: bool) -> EvalReport:
    ck = Path(checkpoint) if checkpoint is not None else (run / "checkpoints" if find_checkpoint(run) else None)
    if dataset is None:
        dataset = build_dataset(cfg, cfg["val_split"])
    info: Dict[str, Any] = {"config": getattr(cfg, "name", "custom")}
    if ck is None:
        warnings.warn(f"no checkpoint in {run}: evaluating MaskCLIP only (train first for ReCLIP++).", stacklevel=3)
        model = build_model(cfg, clip=clip, kind="maskclip")
    else:
        model = build_model(cfg, clip=clip)
        state = load_model_weights(model, ck, allow_legacy=allow_legacy)
        info.update(checkpoint=str(ck), epoch=state.get("epoch"), step=state.get("step"), finished=state.get("finished"))
        if state and not state.get("finished", False):
            warnings.warn(f"evaluating an unfinished run: checkpoint at epoch {state.get('epoch')} of "
                          f"{cfg['epoch']}.", stacklevel=3)
    if getattr(model, "pd_rule", None) is not None:
        info["pd_rule"] = {"threshold": model.pd_rule[0], "scale": model.pd_rule[1]}
    report = evaluate(model, dataset, cfg["test_size"], cfg["pd_threshold"], cfg["max_long_side"],
                      max_images=cfg["max_val_images"], progress=progress, batch_size=cfg["eval_batch_size"],
                      pd_scale=cfg.get("pd_scale", 10.0), upsampling=cfg.get("eval_upsampling", "crop"),
                      resize=cfg.get("test_resize", "torch"))
    report.info.update(info)
    if save:
        report.save(run / "eval")
    return report


__all__ = ("evaluate", "evaluate_run", "EvalReport", "EvalBatch", "Accumulator", "PredictionAccumulator",
           "KeptExamples", "Scorer", "upsample_logits", "patch_size", "HEAD_KEYS", "PD_VARIANTS")
