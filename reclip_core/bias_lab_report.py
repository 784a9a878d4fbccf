"""The toy bias lab's Markdown report and figure, rendered from the results of
:func:`reclip_core.toy_lab.run_bias_lab` (numbers in, text and pixels out; nothing is measured
here)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .atomic_io import atomic_save_figure
from .markdown import markdown_table


def _fmt(x: Any, nd: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def save_bias_lab_figure(results: Mapping[str, dict], names: Sequence[str], path: str | Path) -> Path:
    """``bias_lab.png``: the predicted/true pixel share per class of each model, beside each
    model's per-cell space-bias map."""
    # matplotlib is imported here, not at the top: importing the report module (and toy_lab) must
    # not pull in a plotting backend, and the Agg backend is chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), see above

    labels = list(results)
    fig, axes = plt.subplots(1, 1 + len(labels), figsize=(5 + 3.2 * len(labels), 4.2),
                             gridspec_kw={"width_ratios": [2.2] + [1] * len(labels)})
    ax = axes[0]
    width = 0.8 / len(labels)
    xs = np.arange(len(names))
    for k, lab in enumerate(labels):
        ratio = results[lab]["classes"]["ratio"].values
        ax.bar(xs + k * width - 0.4 + width / 2, ratio, width, label=f"pretrained: {lab}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(xs, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("predicted / true pixel share")
    ax.set_title("class-preference bias (MaskCLIP, val)")
    ax.legend(fontsize=8)
    vmax = max(np.nanmax(r["space_per_cell"]) for r in results.values())
    for ax, lab in zip(axes[1:], labels):
        im = ax.imshow(results[lab]["space_per_cell"], vmin=0, vmax=vmax, cmap="magma")
        ax.set_title(f"space bias, {lab}\n(TVD per cell, mean {results[lab]['space_bias_tvd']:.2f})",
                     fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=axes[1:], shrink=0.8)
    try:
        return atomic_save_figure(fig, path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def _per_class_table(results: Mapping[str, dict], names: Sequence[str], cell: Callable[[Any], str]) -> list[str]:
    """One row per class, one column per model, ``cell(row of its classes table)``."""
    labels = list(results)
    rows = ([name] + [cell(results[lab]["classes"].iloc[k]) for lab in labels] for k, name in enumerate(names))
    return markdown_table(["class"] + labels, rows)


def _per_model_table(results: Mapping[str, dict], headers: Sequence[str],
                     cells: Callable[[dict], list[str]]) -> list[str]:
    """One row per model: its label, then ``cells(its results)``."""
    return markdown_table(["toy CLIP pretrained on"] + list(headers),
                          ([lab] + cells(r) for lab, r in results.items()))


# The per-model sections of the report: title, column headers, the cells of one model's row, the note below.
_MODEL_SECTIONS = (
    ("Segmentation",
     ["MaskCLIP mIoU", "release mIoU", "pixel acc.", "chance", "top-2 image classes (label-free)",
      "oracle image classes", "image-level top-1"],
     lambda r: [_fmt(r[k]) for k in ("miou", "miou_release", "pixel_accuracy", "chance_miou", "top2_miou",
                                     "oracle_miou")] + [f"{_fmt(100 * r['zeroshot_top1'])} %"],
     "*chance*: expected mIoU of uniformly random per-pixel classes. *oracle*: MaskCLIP "
     "logits restricted to each image's true classes. *top-2*: restricted to the two best "
     "classes of the class-token image embedding. *image-level top-1*: the class-token "
     "top-1 class is in the image."),
    ("Biases",
     ["class bias: TVD of predicted vs true pixel shares", "space bias: mean per-cell TVD (4×4 grid)"],
     lambda r: [f"{r['class_bias_tvd']:.3f}", f"{r['space_bias_tvd']:.3f}"],
     "0 = unbiased, 1 = disjoint. A position-independent class bias also raises the "
     "per-cell TVD: compare the two columns, and see the pairs below."),
    ("What the training loss can see",
     ["objects read right from their pooled dense features", "patches read right one by one"],
     lambda r: [f"{_fmt(100 * r['region_readout'])} %", f"{_fmt(100 * r['patch_readout'])} %"],
     "ReCLIP++'s loss scores each hypothesis class's *pooled* dense feature against the class "
     "texts (method.md §3), so it can teach the decoder no more than what a region's pooled "
     "feature says. Left: each val object's dense features averaged over its own pixels, "
     "classified against the texts; right: its patches (tokens more than half covered) one by "
     "one; class means. When the two are close, the loss sees what MaskCLIP's argmax sees "
     "(docs/training.md)."),
)


def _pairs_table(results: Mapping[str, dict]) -> list[str]:
    rows = ([lab, p["pair"], "top/bottom" if p["axis"] == "y" else "left/right", str(p["pixels"]),
             f"{p['follow_position']:.2f}", f"{p['pair_accuracy']:.2f}"]
            for lab, r in results.items() for p in r["pairs"])
    return markdown_table(["toy CLIP pretrained on", "pair", "split along", "pixels",
                           "follows pretraining position", "pair accuracy"], rows)


def _provenance_lines(provenance: Mapping[str, Any]) -> list[str]:
    lines = []
    for lab, prov in provenance["models"].items():
        m = prov["manifest"]
        lines.append(f"- **{lab}**: weights `{prov['source']}`, sha256 `{m.get('sha256', '?')[:16]}…`, "
                     f"pretrained on preset `{m.get('preset')}` (hash `{m.get('preset_hash')}`), "
                     f"seed {m.get('seed')}, {m.get('steps')} steps × batch {m.get('batch_size')}, "
                     f"{'bf16 autocast' if m.get('amp') == 'bf16' else 'float32'}, "
                     f"{m.get('wall_time_s')} s on {m.get('threads')} thread(s).")
    return lines


def bias_lab_markdown(results: Mapping[str, dict], provenance: Mapping[str, Any], names: Sequence[str]) -> str:
    """``bias_lab.md``: the numbers of every model, what they mean, and where they came from."""
    labels = list(results)
    L = ["# Toy bias lab: MaskCLIP on the toy world\n"]
    L.append(f"Generated by `reclip_core.toy_lab.run_bias_lab` on {provenance['created_utc']} "
             f"in {provenance['seconds']:.0f} s. Evaluation: the toy world's `val` split "
             f"({results[labels[0]]['n_val']} images, 64×64, uniform class frequencies and "
             f"positions) of preset `{provenance['val_preset']}` (hash "
             f"`{provenance['val_preset_hash']}`); `train`/`val` are the same images under both "
             f"presets. MaskCLIP = frozen toy CLIP, dense value-path features, text features "
             f"from the 85 CLIP prompt templates, argmax (no training). mIoU in %, mmseg "
             f"definition (classes with non-zero union), background ignored.\n")
    for title, headers, cells, note in _MODEL_SECTIONS:
        L.append(f"## {title}\n")
        L += _per_model_table(results, headers, cells)
        L.append(f"\n{note}\n")
    L.append("### Look-alike pairs (same colour; separated by position in the biased pretraining)\n")
    L += _pairs_table(results)
    L.append("\nAmong val pixels of either class of a pair that are predicted as one of the two: "
             "*follows pretraining position* = share given the class whose biased-pretraining "
             "region holds the pixel (0.5: position plays no role; 1: position decides); *pair "
             "accuracy* = share given the right class (0.5 = chance).\n")
    L.append("### Per class: predicted / true pixel share (IoU %)\n")
    L += _per_class_table(results, names, lambda r: f"{r['ratio']:.2f} ({_fmt(r['iou'])})")
    L.append("\n### Per class: objects / patches read right (%)\n")
    L += _per_class_table(results, names, lambda r: f"{_fmt(100 * r['region_readout'])} / "
                                                    f"{_fmt(100 * r['patch_readout'])}")
    L.append("\n## Provenance\n")
    L += _provenance_lines(provenance)
    L.append("\nFigures: `bias_lab.png` (per-class share ratio; per-cell space-bias maps). "
             "Tables: `bias_lab.csv`, `bias_lab_classes.csv`, `bias_lab_cells.csv`; "
             "everything in `bias_lab.json`.\n")
    return "\n".join(L)


__all__ = ("bias_lab_markdown", "save_bias_lab_figure")
