"""Segment your own image: ``segment(image, class_names, checkpoint=None)`` → mask + overlay figure.

Without a checkpoint it runs MaskCLIP (frozen CLIP, no training) for any class list. With one it
runs the rectified model; the checkpoint must have been trained for exactly those classes (the
Reference prompt and the decoder are per-class), which is checked.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .clip_loading import load_clip, resolve_device
from .checkpoint import find_checkpoint, load_model_weights
from .cli_errors import not_a_file
from .config import validate
from .eval_scoring import patch_size, upsample_logits
from .model import MaskCLIP, ReCLIPPP
from .model_factory import build_model
from .palette import class_colours
from .rectify import presence_filter
from .text import PROMPT_TEMPLATES, validate_class_names
from .transforms import ImageLike, eval_preprocess, open_image, to_image_tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class SegmentResult:
    mask: np.ndarray  # int64 [H, W], class index per pixel (original image size)
    class_names: List[str]
    figure: Any  # matplotlib Figure: the image and the coloured mask over it
    model: str  # "maskclip" or the trained model kind


def overlay_figure(image: ImageLike, mask: np.ndarray, class_names: Sequence[str], alpha: float = 0.55,
                   title: Optional[str] = None) -> "Figure":
    """A two-panel matplotlib Figure (image | image with the coloured mask and a legend of the
    classes present, in the class colours of ``palette``). Built without pyplot, so it does not touch
    global figure state."""
    # matplotlib: import time; only the single-image command draws a figure
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    img = to_image_tensor(image).permute(1, 2, 0).numpy()
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img
    colours = class_colours(len(class_names)) / 255.0
    over = (1 - alpha) * img + alpha * colours[mask]
    fig = Figure(figsize=(10, 4.5))
    a, b = fig.subplots(1, 2)
    a.imshow(img)
    a.set_title("image")
    b.imshow(np.clip(over, 0, 1))
    b.set_title(title or "segmentation")
    for ax in (a, b):
        ax.axis("off")
    present = [int(c) for c in np.unique(mask)]
    b.legend(handles=[Patch(color=colours[c], label=class_names[c]) for c in present],
             loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _load_for_checkpoint(checkpoint: Union[str, os.PathLike], class_names: Sequence[str], clip: Optional[nn.Module],
                         device: Any, allow_legacy: bool = False) -> tuple:
    latest = find_checkpoint(checkpoint)
    if latest is not None:
        with open(latest, encoding="utf-8") as f:
            state = json.load(f)
        if list(class_names) != state["class_names"]:
            raise ValueError(f"the checkpoint was trained for the classes {state['class_names']}, not {list(class_names)}; "
                             "segment with checkpoint=None (MaskCLIP) or train for your classes.")
        cfg = validate(state["config"])
        model = build_model(cfg, clip=clip, device=device)
        load_model_weights(model, latest, allow_legacy=allow_legacy)
        # the run's evaluation options travel with the model, so every caller of predict_mask
        # (this module, the folder command) segments as the run is evaluated
        model.eval_upsampling, model.test_resize = cfg["eval_upsampling"], cfg["test_resize"]
        return model, cfg["model"], cfg["test_size"]
    # a bare .safetensors / the authors' best_weight.pth: the paper's backbone unless one is given
    clip = clip if clip is not None else load_clip(device=device)
    release = Path(checkpoint).suffix != ".safetensors"  # the authors' file: trained and tested the release's way
    model = ReCLIPPP(clip, class_names, reference_slot="release" if release else "eot")
    load_model_weights(model, checkpoint, allow_legacy=allow_legacy)
    if release:
        model.eval_upsampling, model.test_resize = "release", "release"
    return model.to(device), "reclip++", None


@torch.no_grad()
def predict_mask(model: nn.Module, image: ImageLike, test_size: Optional[int], pd_threshold: Optional[float],
                 device: Any, upsampling: Optional[str] = None, resize: Optional[str] = None) -> np.ndarray:
    """One image through an eval-mode segmenter → int64 class map [H, W] of the image's size.

    ``test_size`` (short side) None: the image's own short side, at most 448. ``upsampling`` /
    ``resize``: the config options ``eval_upsampling`` / ``test_resize`` (None: the model's, which a
    checkpoint's config sets, else the project's ``crop`` / ``torch``). Shared by :func:`segment`
    and the folder command (``segment_folder``), so both give the same masks."""
    upsampling = upsampling or getattr(model, "eval_upsampling", "crop")
    resize = resize or getattr(model, "test_resize", "torch")
    h, w = to_image_tensor(image).shape[-2:]
    size = test_size or min(h, w, 448)
    x = eval_preprocess(image, size, resize=resize).to(device)
    logits = model(images=x)["logits"]
    if pd_threshold is not None:
        # a ReCLIP model's logits live on another scale: its own rule's softmax scale (the release's 100)
        logits = presence_filter(logits, pd_threshold, scale=getattr(model, "pd_rule", (None, 10.0))[1])
    up = upsample_logits(logits, patch_size(model), tuple(x.shape[-2:]), (h, w), mode=upsampling)
    return up.argmax(dim=1)[0].cpu().numpy().astype(np.int64)


@torch.no_grad()
def segment(
    image: Union[ImageLike, str, os.PathLike],
    class_names: Sequence[str],
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    *,
    clip: Optional[nn.Module] = None,
    test_size: Optional[int] = None,
    pd_threshold: Optional[float] = None,
    device: Any = "auto",
    templates: Optional[Sequence[str]] = None,
    allow_legacy: bool = False,
) -> SegmentResult:
    """Segment ``image`` (PIL, array, tensor or a path) into ``class_names``.

    ``checkpoint=None``: MaskCLIP with ``clip`` (default: ``load_clip()``, the paper's ViT-B/16).
    Otherwise a run/checkpoint folder (its config rebuilds the model), a ``.safetensors`` file or the
    authors' ``best_weight.pth``. ``test_size`` (short side) defaults to the checkpoint's config, else
    the image's own short side (at most 448). ``pd_threshold`` enables the presence filter. A checkpoint
    trained with another CLIP or templates, or holding invalid tensors, is refused
    (``checkpoint.load_model_weights``); ``allow_legacy`` accepts one predating the CLIP/template record.
    """
    names = validate_class_names(class_names)
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image {image} {not_a_file(image)}; pass an image file (PNG, JPEG).")
        image = open_image(image)  # RGB; a corrupt file raises ValueError naming it
    dev = resolve_device(device)
    if checkpoint is None:
        clip = clip if clip is not None else load_clip(device=dev)
        model = MaskCLIP(clip, names, templates=templates or PROMPT_TEMPLATES).to(dev)
        kind, ck_size = "maskclip", None
    else:
        model, kind, ck_size = _load_for_checkpoint(checkpoint, names, clip, dev, allow_legacy)
    model.eval()
    mask = predict_mask(model, image, test_size or ck_size, pd_threshold, dev)
    fig = overlay_figure(image, mask, names, title=kind)
    return SegmentResult(mask=mask, class_names=names, figure=fig, model=kind)


__all__ = ("segment", "SegmentResult", "overlay_figure", "predict_mask")
