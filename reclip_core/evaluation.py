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
size and reuses them.

Choices (documented deviations or unknowns of the release):

* PD is applied to the logits at the token grid, before upsampling (the max over pixels of a
  bilinear upsampling of the grid can only differ by interpolation of neighbouring logits);
* the logits are first upsampled to the padded input size, the padding is cropped off, then they
  are upsampled to the label size (mmseg's order);
* the last checkpoint is evaluated; no checkpoint is chosen by validation score.

This is evaluation code: it reads labels (training never does).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .bias_analysis import BiasAccumulator
from .checkpoint import find_checkpoint, load_model_weights
from .eval_report import EvalReport
from .metrics import SegMetric
from .model_factory import build_model
from .rectify import presence_filter
from .run_inputs import build_dataset
from .run_lock import run_folder_lock
from .transforms import eval_preprocess, to_image_tensor

#: output key of the model → reported name
HEAD_KEYS = {"maskclip": "clip_logits", "rectified": "rectified", "reclip++": "logits"}


def upsample_logits(logits: torch.Tensor, patch: int, input_hw: Tuple[int, int], label_hw: Tuple[int, int]) -> torch.Tensor:
    """Grid logits [B, C, h, w] of a (zero-padded) input of size ``input_hw`` → [B, C, *label_hw]:
    bilinear to the padded input size, crop the padding, bilinear to the label size."""
    h, w = logits.shape[-2:]
    x = F.interpolate(logits.float(), size=(h * patch, w * patch), mode="bilinear", align_corners=False)
    x = x[..., : input_hw[0], : input_hw[1]]
    if tuple(input_hw) != tuple(label_hw):
        x = F.interpolate(x, size=tuple(label_hw), mode="bilinear", align_corners=False)
    return x


def patch_size(model: nn.Module) -> int:
    """The ViT patch side of a segmenter's CLIP (the token grid step)."""
    ps = model.clip.visual.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


@dataclass
class EvalBatch:
    """What an accumulator sees: one head's predictions for images of one forward whose labels have
    one size (usually the whole batch)."""

    head: str
    ids: List[Any]
    #: the dataset's images, as it returned them
    images: List[Any]
    #: the normalised model inputs [B, 3, H', W'] (on the model's device)
    inputs: torch.Tensor
    #: the model's outputs for these images (``feat``, ``clip_logits``, ...)
    outputs: Dict[str, torch.Tensor]
    #: long [B, H, W] labels (CPU), ``ignore_index`` = not scored
    label: torch.Tensor
    #: this head's logits without PD, upsampled to the label size [B, C, H, W]
    logits: torch.Tensor
    #: their argmax, long [B, H, W] (CPU): what the no-PD metrics score
    pred: torch.Tensor


class Accumulator(Protocol):
    """An extra measurement of :func:`evaluate`, fed batch by batch."""

    def update(self, batch: EvalBatch) -> None: ...


class PredictionAccumulator:
    """An accumulator of ``update(pred, label)`` (``BiasAccumulator``, ``SegMetric``) as an
    :class:`Accumulator` of a head's no-PD predictions."""

    def __init__(self, target: Any):
        self.target = target

    def update(self, batch: EvalBatch) -> None:
        self.target.update(batch.pred, batch.label)


class KeptExamples:
    """The first ``n`` images and their predictions, for figures: ``ids``, ``images`` (uint8
    HxWx3), ``labels``, ``inputs`` (the normalised model inputs, [1, 3, H', W'] on the CPU) and one
    predicted label map per head. Register it for every head; ``first_head`` keeps the images."""

    def __init__(self, n: int, first_head: str):
        self.n, self.first_head = int(n), first_head
        self.kept: Dict[str, List[Any]] = {"ids": [], "images": [], "labels": [], "inputs": []}

    def update(self, batch: EvalBatch) -> None:
        preds = self.kept.setdefault(batch.head, [])
        for k in range(len(batch.ids)):
            if len(preds) < self.n:
                preds.append(batch.pred[k].numpy())
            if batch.head == self.first_head and len(self.kept["ids"]) < self.n:
                self.kept["ids"].append(batch.ids[k])
                self.kept["images"].append(np.asarray(batch.images[k].convert("RGB")))
                self.kept["labels"].append(batch.label[k].numpy())
                self.kept["inputs"].append(batch.inputs[k:k + 1].cpu().clone())


@dataclass
class _Item:
    """One image waiting for its batch's forward."""

    input: torch.Tensor  # [1, 3, H', W'] normalised (CPU)
    label: np.ndarray
    id: Any
    image: Any


def _labelled_item(dataset, i: int) -> Tuple[Dict[str, Any], np.ndarray]:
    """Item ``i`` and its label as an array, refused when it has none or one of another size."""
    item = dataset[i]
    if "label" not in item:
        raise ValueError("evaluation needs labelled items {'id', 'image', 'label'}: use the validation split.")
    image, label = item["image"], np.asarray(item["label"])
    hw = (image.height, image.width) if hasattr(image, "height") else tuple(to_image_tensor(image).shape[-2:])
    if label.shape != hw:
        # upsampling to the label size would silently score a stretched prediction
        raise ValueError(f"image {item.get('id', i)!r} is {hw[0]}x{hw[1]} but its label has shape {label.shape}: "
                         "a label must be an H x W map of the image's own size. Fix the dataset reader, or "
                         "regenerate the labels (benchmarks: `python -m data_prep NAME --root ROOT --force`).")
    return item, label


def _rows(value: Any, rows: List[int], batch: int) -> Any:
    """``value[rows]`` for a per-image output of a forward of ``batch`` images; anything else as is."""
    return value[rows] if torch.is_tensor(value) and value.ndim and value.shape[0] == batch else value


class _Scorer:
    """One forward per batch and what it scores: the metrics of every head (PD off and on) and the
    accumulators, created at the first forward (its outputs say which heads the model has)."""

    def __init__(self, model: nn.Module, heads: Optional[Sequence[str]], ignore_index: int,
                 pd_rule: Tuple[float, float], model_pd: Optional[Tuple[float, float]], bias_grid: Optional[int],
                 examples: int, accumulators: Optional[Mapping[str, Sequence[Accumulator]]]):
        self.model, self.heads, self.ignore_index = model, heads, ignore_index
        self.pd_rule, self.model_pd = pd_rule, model_pd
        self.bias_grid, self.examples, self.extra = bias_grid, examples, dict(accumulators or {})
        self.device = model.clip.visual.conv1.weight.device
        self.patch = patch_size(model)
        self.num_classes = len(model.class_names)
        self.metrics: Optional[Dict[str, Dict[str, SegMetric]]] = None
        self.bias: Dict[str, BiasAccumulator] = {}
        self.kept: Optional[KeptExamples] = None
        self.accumulators: Dict[str, List[Accumulator]] = {}

    def _start(self, out: Mapping[str, torch.Tensor]) -> None:
        # logits == rectified without a decoder (ReCLIP, rectification-only ReCLIP++): one head
        available = ["maskclip"] + (["rectified"] if "rectified" in out else [])
        available += ["reclip++"] if getattr(self.model, "use_decoder", False) else []
        chosen = list(self.heads) if self.heads is not None else available
        bad = [h for h in chosen if h not in available]
        if bad:
            raise ValueError(f"heads {bad} are not produced by {type(self.model).__name__}; available: {available}.")
        unscored = [h for h in self.extra if h not in chosen]
        if unscored:
            raise ValueError(f"accumulators given for heads {unscored}, which are not evaluated; evaluated: {chosen}.")
        C, ignore = self.num_classes, self.ignore_index
        self.metrics = {h: {"no_pd": SegMetric(C, ignore), "pd": SegMetric(C, ignore)} for h in chosen}
        if self.bias_grid:
            self.bias = {h: BiasAccumulator(C, grid=self.bias_grid, ignore_index=ignore) for h in chosen}
        if self.examples and chosen:
            self.kept = KeptExamples(self.examples, chosen[0])
        for h in chosen:
            self.accumulators[h] = ([PredictionAccumulator(self.bias[h])] if h in self.bias else []) \
                + ([self.kept] if self.kept is not None else []) + list(self.extra.get(h, ()))

    def score(self, buffer: Sequence[_Item]) -> None:
        x = torch.cat([b.input for b in buffer]).to(self.device)
        out = self.model(images=x)
        if self.metrics is None:
            self._start(out)
        # one upsampling per label size: the whole batch, or image by image when label sizes differ
        same = all(b.label.shape == buffer[0].label.shape for b in buffer)
        groups = [list(range(len(buffer)))] if same else [[j] for j in range(len(buffer))]
        targets = [torch.from_numpy(np.stack([buffer[j].label for j in js]).astype(np.int64)) for js in groups]
        for head, by_tag in self.metrics.items():
            logits = out[HEAD_KEYS[head]]
            pd_t, pd_s = self.model_pd if self.model_pd is not None and head != "maskclip" else self.pd_rule
            pd_logits = presence_filter(logits, pd_t, scale=pd_s)
            for js, target in zip(groups, targets):
                sizes = (tuple(x.shape[-2:]), tuple(target.shape[-2:]))
                up = upsample_logits(logits[js], self.patch, *sizes)
                pred = up.argmax(dim=1).cpu()
                by_tag["no_pd"].update(pred, target)
                if self.accumulators[head]:
                    batch = self._batch(head, buffer, js, x, out, target, up, pred)
                    for acc in self.accumulators[head]:
                        acc.update(batch)
                by_tag["pd"].update(upsample_logits(pd_logits[js], self.patch, *sizes).argmax(dim=1).cpu(), target)

    @staticmethod
    def _batch(head: str, buffer: Sequence[_Item], js: List[int], x: torch.Tensor, out: Dict[str, torch.Tensor],
               target: torch.Tensor, up: torch.Tensor, pred: torch.Tensor) -> EvalBatch:
        whole = len(js) == len(buffer)  # the usual case: no copy of the inputs and outputs
        return EvalBatch(head=head, ids=[buffer[j].id for j in js], images=[buffer[j].image for j in js],
                         inputs=x if whole else x[js],
                         outputs=out if whole else {k: _rows(v, js, len(buffer)) for k, v in out.items()},
                         label=target, logits=up, pred=pred)


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
) -> EvalReport:
    """Score ``model`` on a labelled split (items ``{"id", "image", "label"}``).

    ``heads`` defaults to every head the model outputs (``maskclip`` always; ``rectified`` and
    ``reclip++`` for ReCLIP++/ReCLIP). Whole-image inference; up to ``batch_size`` *consecutive*
    images whose resized inputs have the same size share one forward (the result is the same as
    one image at a time, up to float rounding; with varied image sizes batches are mostly 1).
    ``bias_grid`` also accumulates the class- and space-bias metrics of each head (no PD) on a
    ``bias_grid``×``bias_grid`` grid (``report.bias``); ``examples`` keeps the first images and
    their predictions for figures (``report.examples``). ``accumulators`` maps a head to further
    :class:`Accumulator` s, each given an :class:`EvalBatch` of that head per forward (per image
    when label sizes differ within it). PD: softmax(``pd_scale``·logits) against
    ``pd_threshold``; ``model_pd`` = (threshold, scale), by default the model's ``pd_rule`` (set by
    ``build_model`` from ``run_inputs.presence_rule``), replaces that rule on the model's own
    heads (``rectified``, ``reclip++``); MaskCLIP keeps the first.
    """
    model.eval()
    model_pd = model_pd if model_pd is not None else getattr(model, "pd_rule", None)
    scorer = _Scorer(model, heads, ignore_index, (pd_threshold, pd_scale), model_pd, bias_grid, examples,
                     accumulators)
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    buffer: List[_Item] = []
    for i in tqdm(range(n), desc="evaluate", disable=not progress, unit="img"):
        item, label = _labelled_item(dataset, i)
        x = eval_preprocess(item["image"], test_size, max_long_side)
        if buffer and (x.shape != buffer[0].input.shape or len(buffer) >= batch_size):
            scorer.score(buffer)
            buffer = []
        buffer.append(_Item(x, label, item["id"], item["image"]))
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
                      pd_scale=cfg.get("pd_scale", 10.0))
    report.info.update(info)
    if save:
        report.save(run / "eval")
    return report


__all__ = ("evaluate", "evaluate_run", "EvalReport", "EvalBatch", "Accumulator", "PredictionAccumulator",
           "KeptExamples", "upsample_logits", "patch_size", "HEAD_KEYS")
