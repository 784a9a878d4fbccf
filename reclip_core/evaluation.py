"""Evaluation (method.md §4): whole-image inference at the test size, PD on and off, bilinear
upsampling to the label size, dataset-level mIoU (both definitions) and the per-class table.

One forward of a ReCLIP++ model gives three segmentations — ``maskclip`` (the frozen CLIP logits,
the biased baseline), ``rectified`` (CLIP logits − bias map) and ``reclip++`` (the decoder
output) — so all three are scored in one pass, each with and without PD, into streaming
:class:`~reclip_core.metrics.SegMetric` confusion matrices (nothing is written per image).
The model runs in eval mode under ``no_grad``, where it computes the Reference features and the
bias map once per input size and reuses them.

Choices (documented deviations or unknowns of the release):

* PD is applied to the logits at the token grid, before upsampling (the max over pixels of a
  bilinear upsampling of the grid can only differ by interpolation of neighbouring logits);
* the logits are first upsampled to the padded input size, the padding is cropped off, then they
  are upsampled to the label size (mmseg's order);
* the last checkpoint is evaluated; no checkpoint is chosen by validation score.

Hypothesis precision/recall against ground truth is here too: labels are read only in this module.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import SegMetric
from .rectify import presence_filter
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


@dataclass
class EvalReport:
    """Metrics per head and PD setting: ``metrics[head]["pd"|"no_pd"]`` is a :class:`SegMetric`."""

    class_names: List[str]
    metrics: Dict[str, Dict[str, SegMetric]]
    images: int
    pd_threshold: float
    info: Dict[str, Any] = field(default_factory=dict)
    #: per head, a BiasAccumulator of the predictions without PD (``evaluate(..., bias_grid=g)``)
    bias: Dict[str, Any] = field(default_factory=dict)
    #: the first ``examples`` images: ``ids``, ``images`` (uint8 HxWx3), ``labels``, ``inputs``
    #: (the normalised model inputs) and one predicted label map per head (``evaluate(..., examples=n)``)
    examples: Dict[str, List[Any]] = field(default_factory=dict)

    def summary(self) -> "Any":
        """DataFrame: one row per head; mIoU (mmseg and release definitions) with PD off and on, pixel acc."""
        import pandas as pd

        rows = []
        for head, by_pd in self.metrics.items():
            row = {"model": head}
            for tag in ("no_pd", "pd"):
                m = by_pd[tag]
                row[f"mIoU_{tag}"] = m.miou()
                row[f"mIoU_release_{tag}"] = m.miou_release()
                row[f"aAcc_{tag}"] = m.pixel_accuracy()
            rows.append(row)
        return pd.DataFrame(rows)

    def per_class(self, head: str, pd: bool = False):
        return self.metrics[head]["pd" if pd else "no_pd"].table(self.class_names)

    def per_class_iou(self, pd: bool = False) -> "Any":
        """DataFrame: one row per class, its IoU (%) under every head side by side (NaN where the
        class has no union) — where a head gains or loses, class by class."""
        import pandas as pd_

        table = pd_.DataFrame({"class": self.class_names})
        for head in self.metrics:
            table[head] = self.per_class(head, pd=pd)["iou"].to_numpy()
        return table

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"images": self.images, "pd_threshold": self.pd_threshold,
                               "class_names": self.class_names, "info": self.info, "results": {}}
        for head, by_pd in self.metrics.items():
            out["results"][head] = {
                tag: {"mIoU": m.miou(), "mIoU_release": m.miou_release(), "aAcc": m.pixel_accuracy(),
                      "IoU": [None if math.isnan(v) else v * 100 for v in m.iou().tolist()]}
                for tag, m in by_pd.items()}
        return out

    def save(self, folder: os.PathLike) -> Path:
        """``metrics.json``, ``summary.csv`` and ``per_class_<head>_<pd|no_pd>.csv`` (atomic)."""
        from .atomic_io import atomic_write_files

        folder = Path(folder)
        # Rendered in memory, then written as one unit: a failure (full disk) leaves every previous
        # file as it was, never a new metrics.json beside old per-class tables.
        files = {folder / "metrics.json": json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n",
                 folder / "summary.csv": self.summary().to_csv(index=False)}
        for head, by_pd in self.metrics.items():
            for tag, m in by_pd.items():
                files[folder / f"per_class_{head.replace('+', 'p')}_{tag}.csv"] = m.table(self.class_names).to_csv(index=False)
        atomic_write_files(files)
        return folder

    def format(self) -> str:
        """Side-by-side text table of the heads (mmseg mIoU, release mIoU; PD off / on)."""
        lines = [f"{'model':<10} {'mIoU':>7} {'mIoU+PD':>8} {'rel.mIoU':>9} {'rel.+PD':>8}   ({self.images} images, "
                 f"PD threshold {self.pd_threshold})"]
        for head, by_pd in self.metrics.items():
            a, b = by_pd["no_pd"], by_pd["pd"]
            lines.append(f"{head:<10} {a.miou():7.2f} {b.miou():8.2f} {a.miou_release():9.2f} {b.miou_release():8.2f}")
        return "\n".join(lines)


def _patch(model: nn.Module) -> int:
    ps = model.clip.visual.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


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
) -> EvalReport:
    """Score ``model`` on a labelled split (items ``{"id", "image", "label"}``).

    ``heads`` defaults to every head the model outputs (``maskclip`` always; ``rectified`` and
    ``reclip++`` for ReCLIP++/ReCLIP). Whole-image inference; up to ``batch_size`` *consecutive*
    images whose resized inputs have the same size share one forward (the result is the same as
    one image at a time, up to float rounding; with varied image sizes batches are mostly 1).
    ``bias_grid`` also accumulates the class- and space-bias metrics of each head (no PD) on a
    ``bias_grid``×``bias_grid`` grid (``report.bias``); ``examples`` keeps the first images and
    their predictions for figures (``report.examples``). PD: softmax(``pd_scale``·logits) against
    ``pd_threshold``; ``model_pd`` = (threshold, scale), by default the model's ``pd_rule`` (set by
    ``training.build_model`` from ``rectify.presence_rule``), replaces that rule on the model's own
    heads (``rectified``, ``reclip++``); MaskCLIP keeps the first.
    """
    from tqdm.auto import tqdm

    model.eval()
    model_pd = model_pd if model_pd is not None else getattr(model, "pd_rule", None)
    device = model.clip.visual.conv1.weight.device
    patch = _patch(model)
    names = list(model.class_names)
    C = len(names)
    state: Dict[str, Any] = {"metrics": None}
    buffer: List[Tuple[torch.Tensor, np.ndarray, Any]] = []
    bias: Dict[str, Any] = {}
    kept: Dict[str, List[Any]] = {"ids": [], "images": [], "labels": [], "inputs": []}

    def choose_heads(out: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, SegMetric]]:
        # logits == rectified without a decoder (ReCLIP, rectification-only ReCLIP++): one head
        available = ["maskclip"] + (["rectified"] if "rectified" in out else [])
        available += ["reclip++"] if getattr(model, "use_decoder", False) else []
        chosen = list(heads) if heads is not None else available
        bad = [h for h in chosen if h not in available]
        if bad:
            raise ValueError(f"heads {bad} are not produced by {type(model).__name__}; available: {available}.")
        return {h: {"no_pd": SegMetric(C, ignore_index), "pd": SegMetric(C, ignore_index)} for h in chosen}

    def flush() -> None:
        x = torch.cat([b[0] for b in buffer]).to(device)
        out = model(images=x)
        if state["metrics"] is None:
            state["metrics"] = choose_heads(out)
            if bias_grid:
                from .bias_analysis import BiasAccumulator

                bias.update({h: BiasAccumulator(C, grid=bias_grid, ignore_index=ignore_index) for h in state["metrics"]})
        labels = [b[1] for b in buffer]
        keep = [j for j in range(len(buffer)) if len(kept["ids"]) + j < examples]
        for j in keep:
            kept["ids"].append(buffer[j][2]["id"])
            kept["images"].append(np.asarray(buffer[j][2]["image"].convert("RGB")))
            kept["labels"].append(labels[j])
            kept["inputs"].append(buffer[j][0])
        same = all(lab.shape == labels[0].shape for lab in labels)
        groups = [list(range(len(buffer)))] if same else [[j] for j in range(len(buffer))]
        for head, by_tag in state["metrics"].items():
            logits = out[HEAD_KEYS[head]]
            pd_t, pd_s = model_pd if model_pd is not None and head != "maskclip" else (pd_threshold, pd_scale)
            for tag, lg in (("no_pd", logits), ("pd", presence_filter(logits, pd_t, scale=pd_s))):
                for js in groups:
                    up = upsample_logits(lg[js], patch, tuple(x.shape[-2:]), tuple(labels[js[0]].shape[-2:]))
                    target = torch.from_numpy(np.stack([labels[j] for j in js]).astype(np.int64))
                    pred = up.argmax(dim=1).cpu()
                    by_tag[tag].update(pred, target)
                    if tag == "no_pd":
                        if head in bias:
                            bias[head].update(pred, target)
                        for k, j in enumerate(js):
                            if j in keep:
                                kept.setdefault(head, []).append(pred[k].numpy())
        buffer.clear()

    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    for i in tqdm(range(n), desc="evaluate", disable=not progress, unit="img"):
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
        x = eval_preprocess(image, test_size, max_long_side)
        if buffer and (x.shape != buffer[0][0].shape or len(buffer) >= batch_size):
            flush()
        buffer.append((x, label, item if i < examples else {"id": item["id"]}))
    if buffer:
        flush()
    if state["metrics"] is None:
        raise ValueError("the evaluation split is empty.")
    return EvalReport(names, state["metrics"], n, float(pd_threshold), bias=bias,
                      examples=kept if examples else {})


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
    from .run_lock import run_folder_lock

    run = Path(run_dir) if run_dir is not None else Path(cfg["output_dir"] or Path("runs") / getattr(cfg, "name", "custom"))
    args = (cfg, checkpoint, run, dataset, clip, progress, save, allow_legacy)
    if not save:
        return _evaluate_run(*args)
    with run_folder_lock(run, "evaluate"):
        return _evaluate_run(*args)


def _evaluate_run(cfg: Mapping[str, Any], checkpoint: Optional[os.PathLike], run: Path, dataset, clip: Optional[nn.Module],
                  progress: bool, save: bool, allow_legacy: bool) -> EvalReport:
    from .checkpoint import find_checkpoint, load_model_weights
    from .config import build_dataset
    from .training import build_model

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


# ------------------------------------------------------------------------------------------------
# Hypothesis quality (reads labels: evaluation code only)
# ------------------------------------------------------------------------------------------------
def hypothesis_quality(hypotheses: Mapping[str, Sequence[int]], dataset, num_classes: int,
                       ignore_index: int = 255, max_images: Optional[int] = None) -> Dict[str, Any]:
    """Precision/recall of image-level hypotheses against the classes present in the labels.

    Micro: over all (image, class) pairs; per class: precision/recall of "class c is in the image".
    Images of ``dataset`` without a hypothesis are an error (compute them on the same split).
    """
    tp = np.zeros(num_classes, dtype=np.int64)
    fp = np.zeros(num_classes, dtype=np.int64)
    fn = np.zeros(num_classes, dtype=np.int64)
    exact, n = 0, len(dataset) if max_images is None else min(len(dataset), max_images)
    for i in range(n):
        item = dataset[i]
        image_id = str(item["id"])
        if image_id not in hypotheses:
            raise KeyError(f"no hypothesis for image {image_id!r}: compute hypotheses on this split first.")
        gt = {int(c) for c in np.unique(np.asarray(item["label"])) if c != ignore_index}
        pred = {int(c) for c in hypotheses[image_id]}
        for c in pred & gt:
            tp[c] += 1
        for c in pred - gt:
            fp[c] += 1
        for c in gt - pred:
            fn[c] += 1
        exact += pred == gt

    def ratio(a, b):
        return float(a / b) if b else float("nan")

    return {
        "images": n,
        "precision": ratio(tp.sum(), tp.sum() + fp.sum()),
        "recall": ratio(tp.sum(), tp.sum() + fn.sum()),
        "exact_match": ratio(exact, n),
        "per_class_precision": [ratio(t, t + f) for t, f in zip(tp, fp)],
        "per_class_recall": [ratio(t, t + f) for t, f in zip(tp, fn)],
    }


def token_labels(label: np.ndarray, input_hw: Tuple[int, int], patch: int, num_classes: int,
                 ignore_index: int = 255) -> torch.Tensor:
    """The majority label of each token of the padded input grid → long [h, w]; tokens that are
    mostly ignored (background of VOC-style data, padding) get ``num_classes``."""
    lab = torch.from_numpy(np.asarray(label).astype(np.int64))
    lab = torch.where((lab == ignore_index) | (lab < 0) | (lab >= num_classes), num_classes, lab)
    lab = F.interpolate(lab[None, None].float(), size=tuple(input_hw), mode="nearest")[0, 0].long()
    H, W = input_hw
    lab = F.pad(lab, (0, -W % patch, 0, -H % patch), value=num_classes)  # the model pads right/bottom
    onehot = F.one_hot(lab, num_classes + 1).permute(2, 0, 1).float()[None]
    return F.avg_pool2d(onehot, patch)[0].argmax(0)


def loss_preference(model: nn.Module, dataset, hypotheses: Mapping[str, Sequence[int]], test_size: int,
                    score_scales: Sequence[float] = (100.0,), max_long_side: int = 2048,
                    max_images: Optional[int] = None, ignore_index: int = 255) -> "Any":
    """Which hard segmentation does the training loss prefer? A diagnostic of the loss, not a score.

    For each labelled image, with its hypotheses (computed on this split, label-free), the loss of
    method.md §3 is evaluated on fixed one-hot masks at the token grid (no Gumbel noise):

    * ``MaskCLIP argmax`` — what the frozen CLIP says;
    * ``MaskCLIP argmax within the hypothesis`` — every token to its best hypothesis class: what
      the image-level hypothesis adds, label-free;
    * ``truth (other tokens: MaskCLIP argmax)`` — the labelled classes where a token is mostly one
      class, MaskCLIP's argmax on background/ignored tokens (the loss must put them somewhere);
    * ``model`` — the argmax of ``model``'s own logits (the trained decoder or rectified head).

    Returns a DataFrame (rows: segmentations, columns: score scales) of the mean loss over images
    with a non-empty hypothesis; lower = preferred. When the truth's loss is not below MaskCLIP's,
    the loss cannot teach the decoder to leave MaskCLIP's segmentation (docs/training.md).
    """
    import pandas as pd

    from .loss import gumbel_masked_contrastive_loss
    from .model import MaskCLIP

    model.eval()
    device = model.clip.visual.conv1.weight.device
    patch, C = _patch(model), model.num_classes
    names = ["MaskCLIP argmax", "MaskCLIP argmax within the hypothesis", "truth (other tokens: MaskCLIP argmax)"]
    names += [] if isinstance(model, MaskCLIP) else ["model"]
    sums = np.zeros((len(names), len(score_scales)))
    count = 0
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    with torch.no_grad():
        for i in range(n):
            item = dataset[i]
            if str(item["id"]) not in hypotheses:
                raise KeyError(f"no hypothesis for image {item['id']!r}: compute hypotheses on this split first.")
            hyp = [int(c) for c in hypotheses[str(item["id"])]]
            if not hyp:
                continue
            x = eval_preprocess(item["image"], test_size, max_long_side).to(device)
            out = model(images=x)
            feat, mc = out["feat"], out["clip_logits"][0]
            tok = token_labels(item["label"], tuple(x.shape[-2:]), patch, C, ignore_index).to(device)
            in_hyp = torch.full_like(mc, float("-inf"))
            in_hyp[hyp] = mc[hyp]
            truth = torch.where(tok == C, mc.argmax(0), tok.clamp(max=C - 1))
            segs = [mc.argmax(0), in_hyp.argmax(0), truth] + ([out["logits"][0].argmax(0)] if "model" in names else [])
            for r, seg in enumerate(segs):
                onehot = F.one_hot(seg, C).permute(2, 0, 1)[None].float() * 1e4  # no Gumbel draw can flip it
                for j, s in enumerate(score_scales):
                    sums[r, j] += float(gumbel_masked_contrastive_loss(onehot, feat, model.text, [hyp], gumbel_scale=1.0,
                                                                       score_scale=float(s)))
            count += 1
    if not count:
        raise ValueError("no image with a non-empty hypothesis: nothing to compare.")
    return pd.DataFrame(sums / count, index=pd.Index(names, name="segmentation"),
                        columns=[f"scale {s:g}" for s in score_scales])


__all__ = ("evaluate", "evaluate_run", "EvalReport", "upsample_logits", "hypothesis_quality", "HEAD_KEYS",
           "token_labels", "loss_preference")
