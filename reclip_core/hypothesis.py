"""Image-level multi-label hypotheses (pseudo classes) computed once before training (method.md §3).

* ReCLIP++ (``mode="window"``): slide a square window of side ``window`` (int(crop/6)) with step
  ``stride`` (int(window/2)) over the *original* image; every window is resized to the CLIP's input
  size and encoded through the class-token path; its top-1 class against the class text features
  is a vote; the hypothesis is the set of classes with at least one vote. The release runs one
  forward per window; here windows are packed into batches of ``batch_size`` (across images too),
  which changes nothing but speed.
* ReCLIP (``mode="threshold"``): the whole image's score (100·cos) per class; classes at or above
  ``threshold``, or the ``topk`` best when none passes.

Results are a JSON file keyed by image id (never by position), with the settings that produced
them. Computation is resumable: ids already in the file are skipped, and the file is rewritten
atomically every ``save_every`` images. This module never reads a label; hypothesis precision and
recall against ground truth live in :mod:`reclip_core.evaluation`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic_io import StaleFileError, atomic_write_json
from .backbone import encode_image_cls
from .cli_errors import not_a_file
from .config_schema import HYPOTHESIS_MODES
from .run_inputs import build_dataset, resolve_class_names
from .datasets.head import Head
from .provenance import config_hypothesis_kwargs, describe_difference, hypothesis_settings
from .text import PROMPT_TEMPLATES, text_embeddings, validate_class_names
from .transforms import ImageLike, clip_input_size, clip_preprocess, crop_windows, to_image_tensor, window_boxes

FORMAT = "reclip-hypotheses"
Hypotheses = Dict[str, List[int]]


@torch.no_grad()
def window_vote(
    clip: nn.Module,
    images: Iterable[Tuple[str, ImageLike]],
    text: torch.Tensor,
    window: int,
    stride: int,
    input_size: Optional[int] = None,
    batch_size: int = 256,
    ln_eps: Optional[float] = None,
    cls_token: Any = None,
    tiling: str = "fit",
    resize: str = "torch",
) -> Iterator[Tuple[str, List[int]]]:
    """ReCLIP++ hypotheses: yields ``(id, sorted class indices)`` per image, in input order.

    Windows of consecutive images are packed into CLIP forwards of at most ``batch_size`` windows,
    so memory is bounded however many windows an image has. ``input_size`` defaults to the CLIP's
    own pretraining size (224 for ViT-B/16, the toy CLIP's 64). ``tiling`` chooses the window grid
    (``transforms.window_boxes``: "fit" or the release's "release", where an image no larger than
    the window has no window and an empty hypothesis). ``resize`` chooses how a window becomes the
    CLIP input (``transforms.crop_windows``: "torch", or "release", PIL's bicubic on the uint8 window).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    size = input_size or clip_input_size(clip)
    device = clip.visual.conv1.weight.device
    text = text.to(device)
    # Queue of (image id, image tensor, box) not yet encoded; per-image vote sets and counts.
    queue: List[Tuple[int, torch.Tensor, Tuple[int, int]]] = []
    order: List[str] = []
    votes: Dict[int, set] = {}
    remaining: Dict[int, int] = {}
    emitted = 0

    def run(chunk):
        # Consecutive windows of one image are cropped together (one resize call per image).
        groups: Dict[int, List[int]] = {}
        for j, (slot, _, _) in enumerate(chunk):
            groups.setdefault(slot, []).append(j)
        tensors = [crop_windows(chunk[js[0]][1], [chunk[j][2] for j in js], window, size, resize)
                   for js in groups.values()]
        batch = torch.cat(tensors).to(device)
        emb = encode_image_cls(clip, batch, ln_eps=ln_eps, cls_token=cls_token)
        top1 = (emb.float() @ text.float().t()).argmax(dim=1).tolist()
        for slot, js in groups.items():
            votes[slot].update(top1[j] for j in js)
            remaining[slot] -= len(js)

    def ready():
        nonlocal emitted
        while emitted < len(order) and remaining[emitted] == 0:
            yield order[emitted], sorted(votes.pop(emitted))
            emitted += 1

    for image_id, image in images:
        img = to_image_tensor(image)
        slot = len(order)
        order.append(str(image_id))
        boxes = window_boxes(img.shape[-2], img.shape[-1], window, stride, tiling)
        votes[slot], remaining[slot] = set(), len(boxes)
        queue.extend((slot, img, b) for b in boxes)
        while len(queue) >= batch_size:
            run(queue[:batch_size])
            del queue[:batch_size]
            yield from ready()
    if queue:
        run(queue)
    yield from ready()


@torch.no_grad()
def threshold_topk(
    clip: nn.Module,
    images: Iterable[Tuple[str, ImageLike]],
    text: torch.Tensor,
    threshold: float = 23.0,
    topk: int = 1,
    input_size: Optional[int] = None,
    batch_size: int = 64,
    ln_eps: Optional[float] = None,
    cls_token: Any = None,
) -> Iterator[Tuple[str, List[int]]]:
    """ReCLIP hypotheses: whole-image score 100·cos per class ≥ ``threshold``, else the ``topk`` best."""
    size = input_size or clip_input_size(clip)
    device = clip.visual.conv1.weight.device
    text = text.to(device)
    ids: List[str] = []
    batch: List[torch.Tensor] = []

    def run():
        emb = encode_image_cls(clip, torch.cat(batch).to(device), ln_eps=ln_eps, cls_token=cls_token)
        scores = 100.0 * emb.float() @ text.float().t()
        for i, s in zip(ids, scores):
            keep = (s >= threshold).nonzero().flatten().tolist()
            if not keep:
                keep = s.topk(min(topk, s.numel())).indices.tolist()
            yield i, sorted(keep)

    for image_id, image in images:
        ids.append(str(image_id))
        batch.append(clip_preprocess(image, size))
        if len(batch) >= batch_size:
            yield from run()
            ids, batch = [], []
    if batch:
        yield from run()


def load_hypotheses(path: Union[str, os.PathLike], class_names: Optional[Sequence[str]] = None) -> Hypotheses:
    """Read a hypotheses file → {image id: [class indices]}; checks the class list when given."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"hypotheses file {p} {not_a_file(p)}; compute it with "
                                "`python -m reclip_core hypothesis --config ...`.")
    with open(p, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("format") != FORMAT:
        raise ValueError(f"{p} is not a reclip hypotheses file (format {data.get('format')!r}).")
    if class_names is not None and list(class_names) != data["class_names"]:
        raise ValueError(f"{p} was computed for classes {data['class_names'][:5]}... (C={len(data['class_names'])}), "
                         f"not for the {len(class_names)} classes given; recompute it.")
    return check_hypotheses(data.get("hypotheses"), len(data["class_names"]), p)


def check_hypotheses(hyps: Any, num_classes: int, source: Union[str, os.PathLike]) -> Hypotheses:
    """{image id: class indices} with every index an int in 0..C-1, once per image; else ValueError.

    Why strict: ``int()`` would read ``"12"`` or ``1.9`` as other classes, ``True`` as class 1, and a
    negative index picks a class from the end of the list; each silently trains on wrong classes."""
    fix = f"recompute it with `python -m reclip_core hypothesis --config ... --no-resume` or fix {source} by hand."
    if not isinstance(hyps, Mapping):
        raise ValueError(f"{source}: 'hypotheses' must map image ids to lists of class indices; {fix}")
    out: Hypotheses = {}
    for image_id, classes in hyps.items():
        if not isinstance(classes, list):
            raise ValueError(f"{source}: image {image_id!r} has {classes!r}, not a list of class indices; {fix}")
        for c in classes:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
                raise ValueError(f"{source}: image {image_id!r} has the class index {c!r}; indices must be integers "
                                 f"in 0..{num_classes - 1} (the file's {num_classes} classes). {fix[0].upper()}{fix[1:]}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"{source}: image {image_id!r} lists a class twice ({classes}); {fix}")
        out[str(image_id)] = list(classes)
    return out


def require_some_hypothesis(hyps: Mapping[str, Sequence[int]], dataset: Any, source: Union[str, os.PathLike]) -> None:
    """Refuse to train when no training image has a hypothesis class: every step would be skipped
    (nothing to learn from) and the run would still report itself finished."""
    ids = getattr(dataset, "ids", None)
    chosen = [hyps.get(str(i)) for i in ids] if ids is not None else list(hyps.values())
    if not any(chosen):
        raise ValueError(f"none of the {len(chosen)} training images has a hypothesis class in {source}: "
                         "training would take no step. Recompute the hypotheses (`python -m reclip_core hypothesis "
                         "--config ... --no-resume`, e.g. with another hypothesis_window or hypothesis_threshold).")


def _iter_items(dataset, skip: set) -> Iterator[Tuple[str, Any]]:
    """(id, image) of every item not in ``skip``; uses a reader's ``ids`` to skip without decoding."""
    ids = getattr(dataset, "ids", None)
    for i in range(len(dataset)):
        if ids is not None and str(ids[i]) in skip:
            continue
        item = dataset[i]
        if str(item["id"]) in skip:
            continue
        yield str(item["id"]), item["image"]


def _resumable(path: Path, names: List[str], settings: Dict[str, Any]) -> Hypotheses:
    """The hypotheses of an earlier, interrupted pass with the same classes and settings (refused
    otherwise, and checked: a damaged file is never extended)."""
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    if old.get("class_names") != names or old.get("settings") != settings:
        what = describe_difference(old.get("settings") or {}, settings) if old.get("settings") != settings \
            else f"classes {old.get('class_names')} -> {names}"
        raise StaleFileError(path, f"{path} holds hypotheses computed with other settings, classes or "
                             f"images ({what}); pass --no-resume (resume=False) to recompute, or delete it.")
    return check_hypotheses(old.get("hypotheses"), len(names), path)


def compute_hypotheses(
    clip: nn.Module,
    dataset,
    class_names: Sequence[str],
    out_path: Union[str, os.PathLike],
    text: Optional[torch.Tensor] = None,
    mode: str = "window",
    window: int = 56,
    stride: Optional[int] = None,
    input_size: Optional[int] = None,
    batch_size: int = 256,
    threshold: float = 23.0,
    topk: int = 1,
    templates: Optional[Sequence[str]] = None,
    ln_eps: Optional[float] = None,
    cls_token: Any = None,
    tiling: str = "fit",
    resize: str = "torch",
    resume: bool = True,
    save_every: int = 500,
    progress: bool = True,
    max_images: Optional[int] = None,
) -> Hypotheses:
    """Hypotheses for every image of ``dataset`` (items ``{"id", "image"}``), saved to ``out_path``.

    Resumable: with ``resume`` an existing file computed with the same settings is extended (its
    ids are skipped); a file from other settings raises ``ValueError``. The file is rewritten
    atomically every ``save_every`` new images and at the end.
    """
    names = validate_class_names(class_names)
    if mode not in HYPOTHESIS_MODES:
        raise ValueError(f"mode must be 'window' (ReCLIP++) or 'threshold' (ReCLIP), got {mode!r}.")
    templates = list(templates) if templates is not None else list(PROMPT_TEMPLATES)
    if text is None:
        text = text_embeddings(clip, names, templates)
    stride = stride or max(1, window // 2)
    size = input_size or clip_input_size(clip)
    settings = hypothesis_settings(clip, dataset, mode=mode, window=window, stride=stride, input_size=size,
                                   threshold=threshold, topk=topk, templates=templates, ln_eps=ln_eps,
                                   cls_token=cls_token, tiling=tiling, resize=resize)
    out_path = Path(out_path)
    done = _resumable(out_path, names, settings) if out_path.is_file() and resume else {}

    def write():
        atomic_write_json(out_path, {"format": FORMAT, "version": 1, "class_names": names,
                                     "settings": settings, "hypotheses": done})

    n_total = len(dataset) if max_images is None else min(len(dataset), max_images)
    subset = dataset if max_images is None else Head(dataset, n_total)
    items = _iter_items(subset, set(done))
    if mode == "window":
        stream = window_vote(clip, items, text, window, stride, size, batch_size, ln_eps, cls_token, tiling, resize)
    else:
        stream = threshold_topk(clip, items, text, threshold, topk, size, batch_size, ln_eps, cls_token)
    bar = tqdm(total=n_total, initial=min(len(done), n_total), desc=f"hypotheses ({mode})",
               disable=not progress, unit="img")
    new, last_save = 0, time.monotonic()
    for image_id, classes in stream:
        done[image_id] = classes
        new += 1
        bar.update(1)
        if new % save_every == 0 or time.monotonic() - last_save > 120:
            write()
            last_save = time.monotonic()
    bar.close()
    write()
    return done


def hypothesis_stats(hyps: Hypotheses, num_classes: int) -> Dict[str, Any]:
    """Label-free summary: mean classes per image, empty hypotheses, images per class."""
    per_class = [0] * num_classes
    for v in hyps.values():
        for c in v:
            per_class[c] += 1
    sizes = [len(v) for v in hyps.values()]
    return {"images": len(hyps), "mean_classes": sum(sizes) / max(1, len(sizes)),
            "empty": sum(1 for s in sizes if s == 0), "images_per_class": per_class}


__all__ = ("window_vote", "threshold_topk", "compute_hypotheses", "load_hypotheses", "hypothesis_stats", "FORMAT",
           "check_hypotheses", "require_some_hypothesis")


def hypotheses_from_config(cfg: Mapping[str, Any], clip: nn.Module, split: str, out_path: Union[str, os.PathLike],
                           text: Optional[torch.Tensor] = None, resume: bool = True,
                           progress: bool = True) -> Hypotheses:
    """The hypotheses of ``split`` with every setting taken from a run config (what the CLI's
    ``hypothesis`` command and the notebooks both call).

    ``hypothesis_clip: plain`` encodes the windows with CLIP's own LayerNorm eps and class
    embedding whatever ``clip.ln_eps`` / ``clip.cls_token`` say, as the release does (its
    hypotheses come from an unmodified CLIP); ``model`` applies them to the windows too."""
    limit = cfg["max_train_images"] if split == cfg["train_split"] else cfg["max_val_images"]
    return compute_hypotheses(clip, build_dataset(cfg, split), resolve_class_names(cfg), out_path, text=text,
                              batch_size=cfg["hypothesis_batch_size"], resume=resume, progress=progress,
                              max_images=limit, **config_hypothesis_kwargs(cfg))
