"""What :func:`reclip_core.evaluation.evaluate` does with one forward: the heads' logits brought to
the label size, their argmax with and without PD, the streaming metrics and the accumulators.

Cost: label-resolution work dominates evaluation once the forward caches its bias map (an ADE
image of 150 classes upsampled at full label resolution is hundreds of MB per head), so each head
asked for is upsampled once and both PD settings are read from that one upsampling; heads and PD
settings not asked for are not computed. PD only removes classes: the logits
:func:`~reclip_core.rectify.presence_filter` keeps are left as they are and the removed ones become
the constant ``FILTERED_LOGIT``. Upsampling computes each output value from its own class's
inputs, so the kept classes' upsampled logits are those of the logits without PD, and PD's argmax
is their argmax wherever a kept class is above what a removed one can upsample to
(:class:`_PDArgmax` handles the rest exactly; tests compare the confusion matrices with
upsampling the filtered logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bias_analysis import BiasAccumulator
from .metrics import SegMetric
from .options import UPSAMPLINGS
from .rectify import presence_filter
from .transforms import eval_preprocess, to_image_tensor

#: output key of the model → reported name
HEAD_KEYS = {"maskclip": "clip_logits", "rectified": "rectified", "reclip++": "logits"}
#: the two PD settings each head is scored with
PD_VARIANTS = ("no_pd", "pd")
#: the logit ``presence_filter`` gives a class it removes
FILTERED_LOGIT = -100.0


def upsample_logits(logits: torch.Tensor, patch: int, input_hw: Tuple[int, int], label_hw: Tuple[int, int],
                    mode: str = "crop") -> torch.Tensor:
    """Grid logits [B, C, h, w] of a (zero-padded) input of size ``input_hw`` → [B, C, *label_hw].

    ``mode="crop"``: bilinear to the padded input size (h·patch × w·patch), crop the padding,
    bilinear to the label size. ``"release"``: the padded grid bilinear straight to the unpadded
    input size (the padding is stretched into the image), then to the label size. Both with
    ``align_corners=False``, in float32."""
    if mode == "crop":
        h, w = logits.shape[-2:]
        x = F.interpolate(logits.float(), size=(h * patch, w * patch), mode="bilinear", align_corners=False)
        x = x[..., : input_hw[0], : input_hw[1]]
    elif mode == "release":
        x = F.interpolate(logits.float(), size=tuple(input_hw), mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"upsampling must be one of {UPSAMPLINGS}, got {mode!r}.")
    if tuple(input_hw) != tuple(label_hw):
        x = F.interpolate(x, size=tuple(label_hw), mode="bilinear", align_corners=False)
    return x


def kept_classes(pd_logits: torch.Tensor) -> torch.Tensor:
    """bool [B, C]: the classes of ``presence_filter``'s output that are not the constant
    ``FILTERED_LOGIT`` map (a kept class that happens to be that constant upsamples like a removed
    one, so counting it as removed changes nothing)."""
    return (pd_logits != FILTERED_LOGIT).flatten(2).any(dim=2)


def _kept_argmax(up: torch.Tensor, kept: torch.Tensor, pred: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """argmax over the ``kept`` classes [C] of one image's upsampled logits ``up`` [C, H, W], or
    None where that is not provably PD's answer (a kept maximum at or below ``_FLOOR``, or NaN).
    ``pred``: ``up``'s own argmax; where it is kept and above ``_FLOOR`` it is the answer (every
    earlier class is either kept and smaller, or removed and smaller), so only the other pixels
    are searched."""
    idx = kept.nonzero().squeeze(1)
    if pred is not None:
        rest = ~(kept[pred] & (up.gather(0, pred[None])[0] > _FLOOR))
        n = int(rest.sum())
        if n == 0:
            return pred
        if 4 * n <= rest.numel():  # a few pixels: gather them; else one pass over the kept classes
            ys, xs = rest.nonzero(as_tuple=True)
            top, arg = up[idx[:, None], ys[None], xs[None]].max(dim=0)  # first maximum, as argmax
            if not bool((top > _FLOOR).all()):
                return None
            out = pred.clone()
            out[ys, xs] = idx[arg]
            return out
    top, arg = up.index_select(0, idx).max(dim=0)
    return idx[arg] if bool((top > _FLOOR).all()) else None


#: Bilinear weights are non-negative and sum to 1 up to rounding, so a removed class upsamples to
#: FILTERED_LOGIT within a few float32 ulps (at most 2e-5 in the tests). A kept class above this
#: floor therefore beats every removed one; the rounding differs between classes, so where no kept
#: class is above it the removed classes' exact values decide and are computed as the old path did.
_FLOOR = FILTERED_LOGIT + 1e-3 * abs(FILTERED_LOGIT)


class _PDArgmax:
    """PD's prediction from the upsampled logits without PD (module doc), identical to the argmax
    of upsampling ``presence_filter``'s output. An image without any kept class takes the argmax of
    the upsampled constant map, a function of the shapes only (kept per shape); an image that the
    floor cannot decide is upsampled the old way."""

    def __init__(self, patch: int, mode: str, cache_size: int = 16):
        self.patch, self.mode, self.cache_size = patch, mode, cache_size
        self.constant: Dict[tuple, torch.Tensor] = {}

    def _old(self, pd_logits: torch.Tensor, sizes: tuple) -> torch.Tensor:
        return upsample_logits(pd_logits, self.patch, *sizes, mode=self.mode).argmax(dim=1)

    def _constant(self, pd_logits: torch.Tensor, sizes: tuple) -> torch.Tensor:
        key = (tuple(pd_logits.shape), pd_logits.stride(), pd_logits.dtype, str(pd_logits.device), sizes)
        if key not in self.constant:
            if len(self.constant) >= self.cache_size:
                self.constant.pop(next(iter(self.constant)))
            # same shape and strides as the old path's input: the same arithmetic at every position
            self.constant[key] = self._old(torch.full_like(pd_logits, FILTERED_LOGIT), sizes)
        return self.constant[key]

    def __call__(self, up: torch.Tensor, pd_logits: torch.Tensor, sizes: tuple,
                 pred: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``up`` [B, C, H, W] (the upsampled logits), ``pd_logits`` [B, C, h, w] (``presence_filter``'s
        output for the same images), ``pred``: ``up``'s argmax when known → long [B, H, W]."""
        kept = kept_classes(pd_logits)
        if bool(kept.all()):
            return pred if pred is not None else up.argmax(dim=1)
        rows: List[Optional[torch.Tensor]] = []
        for k in range(up.shape[0]):
            if bool(kept[k].all()):
                rows.append(pred[k] if pred is not None else up[k].argmax(dim=0))
            elif not bool(kept[k].any()):
                rows.append(self._constant(pd_logits, sizes)[k])
            else:
                rows.append(_kept_argmax(up[k], kept[k], pred[k] if pred is not None else None))
        if any(r is None for r in rows):
            old = self._old(pd_logits, sizes)
            rows = [old[k] if r is None else r for k, r in enumerate(rows)]
        return torch.stack(rows)


def patch_size(model: nn.Module) -> int:
    """The ViT patch side of a segmenter's CLIP (the token grid step)."""
    ps = model.clip.visual.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


@dataclass
class EvalItem:
    """One image waiting for its batch's forward."""

    input: torch.Tensor  # [1, 3, H', W'] normalised (CPU)
    label: np.ndarray
    id: Any
    image: Any


def eval_item(item: Mapping[str, Any], index: int, test_size: int, max_long_side: int = 2048,
              resize: str = "torch") -> EvalItem:
    """A dataset item ``{"id", "image", "label"}`` → its model input and label, refused when it has
    no label or one of another size than the image."""
    if "label" not in item:
        raise ValueError("evaluation needs labelled items {'id', 'image', 'label'}: use the validation split.")
    image, label = item["image"], np.asarray(item["label"])
    hw = (image.height, image.width) if hasattr(image, "height") else tuple(to_image_tensor(image).shape[-2:])
    if label.shape != hw:
        # upsampling to the label size would silently score a stretched prediction
        raise ValueError(f"image {item.get('id', index)!r} is {hw[0]}x{hw[1]} but its label has shape {label.shape}: "
                         "a label must be an H x W map of the image's own size. Fix the dataset reader, or "
                         "regenerate the labels (benchmarks: `python -m data_prep NAME --root ROOT --force`).")
    return EvalItem(eval_preprocess(image, test_size, max_long_side, resize=resize), label, item["id"], image)


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
    """An extra measurement of :func:`~reclip_core.evaluation.evaluate`, fed batch by batch."""

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


def _rows(value: Any, rows: List[int], batch: int) -> Any:
    """``value[rows]`` for a per-image output of a forward of ``batch`` images; anything else as is."""
    return value[rows] if torch.is_tensor(value) and value.ndim and value.shape[0] == batch else value


class Scorer:
    """One forward per batch and what it scores: the metrics of every head and PD setting asked for
    and the accumulators, created at the first forward (its outputs say which heads the model has).
    ``pd_rule`` = (threshold, scale) of PD; ``model_pd`` replaces it on the model's own heads."""

    def __init__(self, model: nn.Module, heads: Optional[Sequence[str]] = None, *, ignore_index: int = 255,
                 pd_rule: Tuple[float, float] = (1.0, 10.0), model_pd: Optional[Tuple[float, float]] = None,
                 bias_grid: Optional[int] = None, examples: int = 0,
                 accumulators: Optional[Mapping[str, Sequence[Accumulator]]] = None,
                 pd_variants: Sequence[str] = PD_VARIANTS, upsampling: str = "crop"):
        bad = [v for v in pd_variants if v not in PD_VARIANTS]
        if bad or not pd_variants:
            raise ValueError(f"pd_variants must be a non-empty subset of {PD_VARIANTS}, got {list(pd_variants)}.")
        if upsampling not in UPSAMPLINGS:
            raise ValueError(f"upsampling must be one of {UPSAMPLINGS}, got {upsampling!r}.")
        self.model, self.heads, self.ignore_index = model, heads, ignore_index
        self.pd_rule, self.model_pd = pd_rule, model_pd
        self.variants = [v for v in PD_VARIANTS if v in pd_variants]
        self.upsampling = upsampling
        self.patch = patch_size(model)
        self.pd_argmax = _PDArgmax(self.patch, upsampling)
        self.bias_grid, self.examples, self.extra = bias_grid, examples, dict(accumulators or {})
        self.device = model.clip.visual.conv1.weight.device
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
        self.metrics = {h: {v: SegMetric(C, ignore) for v in self.variants} for h in chosen}
        if self.bias_grid:
            self.bias = {h: BiasAccumulator(C, grid=self.bias_grid, ignore_index=ignore) for h in chosen}
        if self.examples and chosen:
            self.kept = KeptExamples(self.examples, chosen[0])
        for h in chosen:
            self.accumulators[h] = ([PredictionAccumulator(self.bias[h])] if h in self.bias else []) \
                + ([self.kept] if self.kept is not None else []) + list(self.extra.get(h, ()))

    @torch.no_grad()
    def score(self, items: Sequence[EvalItem]) -> None:
        """One forward of ``items`` (inputs of one size) and everything it scores."""
        x = torch.cat([b.input for b in items]).to(self.device)
        out = self.model(images=x)
        if self.metrics is None:
            self._start(out)
        # one upsampling per label size: the whole batch, or image by image when label sizes differ
        same = all(b.label.shape == items[0].label.shape for b in items)
        groups = [list(range(len(items)))] if same else [[j] for j in range(len(items))]
        targets = [torch.from_numpy(np.stack([items[j].label for j in js]).astype(np.int64)) for js in groups]
        for head, by_tag in self.metrics.items():
            logits = out[HEAD_KEYS[head]]
            pd_logits = None
            if "pd" in by_tag:
                pd_t, pd_s = self.model_pd if self.model_pd is not None and head != "maskclip" else self.pd_rule
                pd_logits = presence_filter(logits, pd_t, scale=pd_s)
            for js, target in zip(groups, targets):
                sizes = (tuple(x.shape[-2:]), tuple(target.shape[-2:]))
                up = upsample_logits(logits[js], self.patch, *sizes, mode=self.upsampling)
                pred = up.argmax(dim=1) if "no_pd" in by_tag or self.accumulators[head] else None
                pred_cpu = pred.cpu() if pred is not None else None  # one copy for the metric and the accumulators
                if "no_pd" in by_tag:
                    by_tag["no_pd"].update(pred_cpu, target)
                if self.accumulators[head]:
                    batch = self._batch(head, items, js, x, out, target, up, pred_cpu)
                    for acc in self.accumulators[head]:
                        acc.update(batch)
                if pd_logits is not None:
                    by_tag["pd"].update(self.pd_argmax(up, pd_logits[js], sizes, pred).cpu(), target)

    @staticmethod
    def _batch(head: str, items: Sequence[EvalItem], js: List[int], x: torch.Tensor, out: Dict[str, torch.Tensor],
               target: torch.Tensor, up: torch.Tensor, pred: torch.Tensor) -> EvalBatch:
        whole = len(js) == len(items)  # the usual case: no copy of the inputs and outputs
        return EvalBatch(head=head, ids=[items[j].id for j in js], images=[items[j].image for j in js],
                         inputs=x if whole else x[js],
                         outputs=out if whole else {k: _rows(v, js, len(items)) for k, v in out.items()},
                         label=target, logits=up, pred=pred)


__all__ = ("Scorer", "EvalItem", "eval_item", "EvalBatch", "Accumulator", "PredictionAccumulator", "KeptExamples",
           "upsample_logits", "kept_classes", "patch_size", "HEAD_KEYS", "PD_VARIANTS",
           "UPSAMPLINGS", "FILTERED_LOGIT")
