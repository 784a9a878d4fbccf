"""Evaluation-side diagnostics that read labels: how good the image-level hypotheses are
(:func:`hypothesis_quality`), which fixed segmentation the training loss prefers
(:func:`loss_preference`, on the token grid of :func:`token_labels`), and, per class, whether the
loss prefers a class's true mask to an empty one (:func:`class_terms`). Evaluation code only:
training never sees a label.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .evaluation import patch_size
from .loss import gumbel_masked_contrastive_loss
from .model import MaskCLIP
from .transforms import eval_preprocess


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


def _with_hypotheses(dataset, hypotheses: Mapping[str, Sequence[int]], max_images: Optional[int]):
    """Each item of ``dataset`` (the first ``max_images``) with its hypothesis as a list of ints."""
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    for i in range(n):
        item = dataset[i]
        if str(item["id"]) not in hypotheses:
            raise KeyError(f"no hypothesis for image {item['id']!r}: compute hypotheses on this split first.")
        yield item, [int(c) for c in hypotheses[str(item["id"])]]


def _one_hot(seg: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A segmentation [h, w] as fixed logits [1, C, h, w] that no Gumbel draw can flip."""
    return F.one_hot(seg, num_classes).permute(2, 0, 1)[None].float() * 1e4


def loss_preference(model: nn.Module, dataset, hypotheses: Mapping[str, Sequence[int]], test_size: int,
                    score_scales: Sequence[float] = (100.0,), max_long_side: int = 2048,
                    max_images: Optional[int] = None, ignore_index: int = 255, resize: str = "torch") -> pd.DataFrame:
    """Which hard segmentation does the training loss prefer? A diagnostic of the loss, not a score.
    ``resize``: the config's ``test_resize`` (the input evaluation sees).

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
    model.eval()
    device = model.clip.visual.conv1.weight.device
    patch, C = patch_size(model), model.num_classes
    names = ["MaskCLIP argmax", "MaskCLIP argmax within the hypothesis", "truth (other tokens: MaskCLIP argmax)"]
    names += [] if isinstance(model, MaskCLIP) else ["model"]
    sums = np.zeros((len(names), len(score_scales)))
    count = 0
    with torch.no_grad():
        for item, hyp in _with_hypotheses(dataset, hypotheses, max_images):
            if not hyp:
                continue
            x = eval_preprocess(item["image"], test_size, max_long_side, resize=resize).to(device)
            out = model(images=x)
            feat, mc = out["feat"], out["clip_logits"][0]
            tok = token_labels(item["label"], tuple(x.shape[-2:]), patch, C, ignore_index).to(device)
            in_hyp = torch.full_like(mc, float("-inf"))
            in_hyp[hyp] = mc[hyp]
            truth = torch.where(tok == C, mc.argmax(0), tok.clamp(max=C - 1))
            segs = [mc.argmax(0), in_hyp.argmax(0), truth] + ([out["logits"][0].argmax(0)] if "model" in names else [])
            for r, seg in enumerate(segs):
                onehot = _one_hot(seg, C)
                for j, s in enumerate(score_scales):
                    sums[r, j] += float(gumbel_masked_contrastive_loss(onehot, feat, model.text, [hyp], gumbel_scale=1.0,
                                                                       score_scale=float(s)))
            count += 1
    if not count:
        raise ValueError("no image with a non-empty hypothesis: nothing to compare.")
    return pd.DataFrame(sums / count, index=pd.Index(names, name="segmentation"),
                        columns=[f"scale {s:g}" for s in score_scales])


def class_mask(seg: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
    """Fixed logits [1, C, h, w] whose hard mask of class ``k`` is exactly ``seg == k``: every other
    token goes to one other class, so no Gumbel draw moves a token into or out of k's mask."""
    other = (k + 1) % num_classes
    logits = torch.zeros(1, num_classes, *seg.shape, device=seg.device)
    logits[0, k] = (seg == k).float() * 1e4
    logits[0, other] = (seg != k).float() * 1e4
    return logits


def class_terms(model: MaskCLIP, dataset, hypotheses: Mapping[str, Sequence[int]], test_size: int,
                score_scale: float, max_long_side: int = 2048, max_images: Optional[int] = None,
                ignore_index: int = 255, resize: str = "torch") -> pd.DataFrame:
    """Per class, the loss's term for that class on its true mask, against an empty mask.

    The loss of method.md §3 averages one term per hypothesis class k, which reads only k's mask:
    ``CE(s · pooled_k · textᵀ, k)`` with ``pooled_k`` the mask's summed features over h·w. An empty
    mask pools nothing, so its term is exactly log C, whatever the image. Where a class's true mask
    (its labelled tokens) costs more than log C, the loss lowers by emptying that class's mask, and
    a decoder trained on it can drop the class. For each class, over the images where it is both
    labelled and in the (label-free) hypothesis: the mean term of its true mask, the share of those
    images where it exceeds log C, and the mean term of MaskCLIP's argmax mask.

    Dropping a class also hands its tokens to other classes, whose terms change too. So the whole
    image's loss (every hypothesis class, the truth with MaskCLIP's argmax on unlabelled tokens, as
    in :func:`loss_preference`) is compared with the same segmentation whose tokens of k go to
    MaskCLIP's best other class there: the mean change, and how often it lowers the loss.
    """
    model.eval()
    device = model.clip.visual.conv1.weight.device
    patch, C = patch_size(model), model.num_classes
    terms: Dict[int, list] = {k: [] for k in range(C)}
    argmax_terms: Dict[int, list] = {k: [] for k in range(C)}
    given_away: Dict[int, list] = {k: [] for k in range(C)}

    def loss(logits: torch.Tensor, feat: torch.Tensor, hyp: Sequence[int]) -> float:
        return float(gumbel_masked_contrastive_loss(logits, feat, model.text, [list(hyp)], gumbel_scale=1.0,
                                                    score_scale=score_scale))

    with torch.no_grad():
        for item, hyp in _with_hypotheses(dataset, hypotheses, max_images):
            x = eval_preprocess(item["image"], test_size, max_long_side, resize=resize).to(device)
            out = model(images=x)
            feat, mc = out["feat"], out["clip_logits"][0]
            tok = token_labels(item["label"], tuple(x.shape[-2:]), patch, C, ignore_index).to(device)
            present = set(int(c) for c in tok.unique()) - {C}
            argmax = mc.argmax(0)
            truth = torch.where(tok == C, argmax, tok)
            truth_loss = loss(_one_hot(truth, C), feat, hyp)  # the same for every class given away
            for k in sorted(present & set(hyp)):
                terms[k].append(loss(class_mask(tok, k, C), feat, [k]))
                argmax_terms[k].append(loss(class_mask(argmax, k, C), feat, [k]))
                others = mc.clone()
                others[k] = float("-inf")
                dropped = torch.where(truth == k, others.argmax(0), truth)  # k's tokens to its best rival
                given_away[k].append(loss(_one_hot(dropped, C), feat, hyp) - truth_loss)
    empty = math.log(C)  # CE of C equal scores
    rows = []
    for k in range(C):
        t, a, g = np.asarray(terms[k]), np.asarray(argmax_terms[k]), np.asarray(given_away[k])
        rows.append({"class": model.class_names[k], "images": len(t),
                     "true mask": float(t.mean()) if len(t) else np.nan, "empty mask": empty,
                     "true mask above empty %": 100 * float((t > empty).mean()) if len(t) else np.nan,
                     "MaskCLIP argmax mask": float(a.mean()) if len(a) else np.nan,
                     "loss change, given away": float(g.mean()) if len(g) else np.nan,
                     "giving away lowers the loss %": 100 * float((g < 0).mean()) if len(g) else np.nan})
    return pd.DataFrame(rows)


__all__ = ("class_mask", "class_terms", "hypothesis_quality", "token_labels", "loss_preference")
