"""Figures of the walk-through notebooks. Each function returns a matplotlib Figure and computes
nothing the library does not already provide (the numbers come from bias_analysis / metrics)."""
from __future__ import annotations

from typing import Optional, Sequence

import matplotlib
import matplotlib.patches  # noqa: F401  (legend patches)
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from .palette import class_colours

IGNORE = 255


def palette(num_classes: int) -> np.ndarray:
    """The class colours (``palette.class_colours``, uint8 [C+1, 3]); the last row is the ignore colour (black)."""
    return np.concatenate([class_colours(num_classes), np.zeros((1, 3), np.uint8)])


def colorize(label_map: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer label map (255 = ignore) → RGB uint8 image."""
    label_map = np.asarray(label_map)
    idx = np.where(label_map == IGNORE, num_classes, label_map).astype(np.int64)
    return palette(num_classes)[idx]


def _to_numpy_image(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] == 3:
            image = image.transpose(1, 2, 0)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 1)
    return image


def plot_class_shares(table: pd.DataFrame, title: str = "Class-preference bias") -> plt.Figure:
    """Predicted vs true pixel share per class (table from ``bias_analysis.class_bias``)."""
    long = table.melt(id_vars="class", value_vars=["true_share", "pred_share"], var_name="", value_name="pixel share")
    long[""] = long[""].map({"true_share": "ground truth", "pred_share": "predicted"})
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(table)), 3.5))
    sns.barplot(data=long, x="class", y="pixel share", hue="", ax=ax)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    return fig


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], title: str = "Confusion (row-normalised)") -> plt.Figure:
    """Row-normalised confusion matrix: row = true class, column = predicted class."""
    conf = np.asarray(confusion, dtype=np.float64)
    rows = conf.sum(axis=1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    size = max(5, 0.45 * len(class_names))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    sns.heatmap(norm, xticklabels=class_names, yticklabels=class_names, vmin=0, vmax=1, cmap="viridis",
                annot=len(class_names) <= 12, fmt=".2f", ax=ax)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_space_bias(diff: np.ndarray, class_names: Sequence[str], classes: Optional[Sequence[int]] = None,
                    title: str = "Space-preference bias: predicted − true share per grid cell") -> plt.Figure:
    """Per-class grid of (predicted − true) share; ``diff`` is ``SpaceBias.diff`` [g, g, C]."""
    diff = np.nan_to_num(np.asarray(diff))
    classes = list(range(diff.shape[-1])) if classes is None else list(classes)
    cols = min(5, len(classes))
    rows = int(np.ceil(len(classes) / cols))
    lim = max(1e-6, np.abs(diff[..., classes]).max())
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, c in zip(axes.flat, classes):
        im = ax.imshow(diff[..., c], cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(class_names[c], fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_segmentations(images: Sequence, maps: dict, num_classes: int, class_names: Sequence[str]) -> plt.Figure:
    """Rows = images; columns = the image then each named label map (e.g. truth, MaskCLIP, ReCLIP++)."""
    cols = 1 + len(maps)
    fig, axes = plt.subplots(len(images), cols, figsize=(2.2 * cols, 2.2 * len(images) + 0.8), squeeze=False)
    for r, image in enumerate(images):
        axes[r, 0].imshow(_to_numpy_image(image))
        for c, (name, label_maps) in enumerate(maps.items(), start=1):
            axes[r, c].imshow(colorize(label_maps[r], num_classes), interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
        for ax in axes[r]:
            ax.axis("off")
    axes[0, 0].set_title("image", fontsize=9)
    pal = palette(num_classes) / 255.0
    handles = [matplotlib.patches.Patch(color=pal[i], label=n) for i, n in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(5, num_classes), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def pca_image(pe: torch.Tensor) -> np.ndarray:
    """[width, h, w] embedding → its first 3 principal components as an RGB image in [0, 1]."""
    width, h, w = pe.shape
    x = pe.detach().float().reshape(width, h * w).t()
    x = x - x.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    comps = x @ v[:3].t()  # [hw, 3]
    comps = (comps - comps.min(0).values) / (comps.max(0).values - comps.min(0).values).clamp_min(1e-12)
    return comps.reshape(h, w, 3).numpy()


def plot_maps(maps: torch.Tensor, class_names: Sequence[str], title: str, cmap: str = "RdBu_r",
              symmetric: bool = True) -> plt.Figure:
    """One small image per class of a [C, h, w] map (e.g. the bias logit map)."""
    maps = maps.detach().float().cpu().numpy()
    C = maps.shape[0]
    cols = min(5, C)
    rows = int(np.ceil(C / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows + 0.6), squeeze=False)
    lim = np.abs(maps).max() if symmetric else None
    for ax in axes.flat:
        ax.axis("off")
    for c, ax in enumerate(axes.flat[:C]):
        im = ax.imshow(maps[c], cmap=cmap, vmin=-lim if symmetric else None, vmax=lim)
        ax.set_title(class_names[c], fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_similarity(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(cols) + 2), max(3, 0.4 * len(rows) + 1)))
    sns.heatmap(np.asarray(matrix), xticklabels=cols, yticklabels=rows, cmap="magma", annot=len(cols) <= 12,
                fmt=".2f", ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_loss_curve(steps: pd.DataFrame, x: str = "step", y: str = "loss", hue: Optional[str] = None,
                    title: str = "Training loss") -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    sns.lineplot(data=steps, x=x, y=y, hue=hue, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    return fig
