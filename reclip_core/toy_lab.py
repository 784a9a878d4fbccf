"""The toy bias lab's first report: MaskCLIP on the toy world, and its two biases.

:func:`run_bias_lab` evaluates MaskCLIP (frozen toy CLIP, dense value-path features, argmax;
method.md §6) on the toy world's ``val`` split for a toy CLIP pretrained on the ``biased`` preset
and one pretrained on the ``uniform`` preset, and writes

    results/toy/bias_lab.md          the report (numbers, what they mean, provenance)
    results/toy/bias_lab.csv         one row per model: every scalar metric
    results/toy/bias_lab_classes.csv per model and class: IoU, predicted/true pixel share, ratio
    results/toy/bias_lab_cells.csv   per model and grid cell: space-bias divergence
    results/toy/bias_lab.png         class shares, space-bias maps, look-alike pair behaviour
    results/toy/bias_lab.json        everything above plus provenance (presets, manifests)

through ``reclip_core.atomic_io``. Measured per model:

* ``miou`` (mmseg) and ``miou_release`` of MaskCLIP, pixel accuracy;
* ``chance_miou``: expected mIoU of a predictor that draws every pixel's class uniformly at
  random, computed from the true pixel counts (ratio of expected intersection and union per
  class; about 1/(2C-1) for balanced classes);
* ``oracle_miou``: MaskCLIP's logits restricted to each image's true classes (classes absent
  from the image get -inf) — an upper bound for what perfect image-level hypotheses give;
* ``top2_miou``: restricted to the image's 2 best classes by the class-token image embedding
  (what a label-free image-level hypothesis can give);
* ``zeroshot_top1``: the class-token top-1 class is one of the image's classes;
* class bias (``reclip_core.bias_analysis``): predicted vs true pixel share per class, TVD;
* space bias: per cell of a ``grid`` x ``grid`` grid, TVD between the predicted and the true
  class distribution, pixel-weighted mean;
* region readout (``bias_analysis.RegionReadoutAccumulator``): each true object's dense features
  pooled over its pixels, classified against the texts (``region_readout``), beside its patches
  classified one by one (``patch_readout``), class means: what ReCLIP++'s loss can see;
* look-alike pairs (pairs of classes whose pretraining positions the preset separates): among
  pixels of either class predicted as one of the two, the share given the class whose pretraining
  region contains the pixel (``follow_position``; 0.5 = position plays no role) and the share
  given the right class (``pair_accuracy``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# the biased model, the same recipe on the uniform preset, and the biased recipe's second seed
DEFAULT_MODELS = {"biased": "biased", "uniform": "uniform", "biased, seed 1": "biased_seed1"}
REPO_ROOT = Path(__file__).resolve().parents[1]


def expected_chance_miou(true_pixels: np.ndarray) -> float:
    """mIoU (%) expected from uniformly random per-pixel predictions, from true pixel counts."""
    n = np.asarray(true_pixels, dtype=np.float64)
    N, C = n.sum(), len(n)
    inter = n / C
    union = n + N / C - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), np.nan)
    return float(np.nanmean(iou[(n > 0)]) * 100)


def lookalike_pairs(preset: Mapping) -> list[dict]:
    """Pairs of classes with the same colour whose pretraining centre regions are disjoint along
    one axis: ``[{"a", "b", "axis", "a_low"}]`` (class indices; ``a_low``: a lives on the low
    side — top or left)."""
    classes = preset["classes"]
    pos = preset["splits"]["pretrain"].get("positions") or {}
    names = [c["name"] for c in classes]
    pairs = []
    for i in range(len(classes)):
        for j in range(i + 1, len(classes)):
            if list(classes[i]["colour"]) != list(classes[j]["colour"]):
                continue
            for axis in ("y", "x"):
                ri = (pos.get(names[i]) or {}).get(axis)
                rj = (pos.get(names[j]) or {}).get(axis)
                if ri is not None and rj is not None and (ri[1] <= rj[0] or rj[1] <= ri[0]):
                    pairs.append({"a": i, "b": j, "axis": axis, "a_low": ri[1] <= rj[0]})
    return pairs


class _PairCounter:
    """Counts for the look-alike-pair statistics of one model."""

    def __init__(self, pairs: Sequence[dict], size: int):
        self.pairs = list(pairs)
        self.size = size
        self.counts = [{"follow": 0, "correct": 0, "n": 0} for _ in self.pairs]

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        yy, xx = np.mgrid[0:self.size, 0:self.size]
        for pair, c in zip(self.pairs, self.counts):
            a, b = pair["a"], pair["b"]
            coord = yy if pair["axis"] == "y" else xx
            low = np.broadcast_to(coord < self.size / 2, label.shape)
            sel = np.isin(label, (a, b)) & np.isin(pred, (a, b))
            position_class = np.where(low == pair["a_low"], a, b)
            c["n"] += int(sel.sum())
            c["follow"] += int((pred == position_class)[sel].sum())
            c["correct"] += int((pred == label)[sel].sum())

    def results(self, names: Sequence[str]) -> list[dict]:
        out = []
        for pair, c in zip(self.pairs, self.counts):
            n = max(c["n"], 1)
            out.append({"pair": f"{names[pair['a']]} / {names[pair['b']]}",
                        "axis": pair["axis"], "pixels": c["n"],
                        "follow_position": c["follow"] / n, "pair_accuracy": c["correct"] / n})
        return out


@torch.no_grad()
def evaluate_maskclip(clip, preset: Mapping, root=None, n_val: int | None = None,
                      batch_size: int = 200, grid: int = 4) -> dict:
    """MaskCLIP metrics of one toy CLIP on the toy world's val split (see module doc)."""
    from .backbone import encode_image_cls, normalize_images
    from .bias_analysis import BiasAccumulator, RegionReadoutAccumulator
    from .datasets.toyworld import ToyWorld
    from .metrics import SegMetric
    from .model import MaskCLIP

    val = ToyWorld("val", preset, root=root)
    names = val.class_names
    C = len(names)
    n = len(val) if n_val is None else min(n_val, len(val))
    model = MaskCLIP(clip, names)
    text = model.text
    seg, oracle, top2 = SegMetric(C), SegMetric(C), SegMetric(C)
    bias = BiasAccumulator(C, grid=grid)
    readout = RegionReadoutAccumulator(C)
    pairs = _PairCounter(lookalike_pairs(preset), int(preset["image_size"]))
    zs_hits = 0
    for s in range(0, n, batch_size):
        items = [val[i] for i in range(s, min(n, s + batch_size))]
        x = torch.stack([torch.from_numpy(np.array(it["image"])).permute(2, 0, 1)
                         for it in items]).float().div(255)
        x = normalize_images(x)
        label = torch.from_numpy(np.stack([it["label"] for it in items]))
        out = model(x)
        readout.update(out["feat"], text, label)
        logits = F.interpolate(out["logits"], size=label.shape[-2:], mode="bilinear",
                               align_corners=False)
        pred = logits.argmax(1)
        seg.update(pred, label)
        bias.update(pred, label)
        pairs.update(pred.numpy(), label.numpy())
        present = torch.zeros(len(items), C, dtype=torch.bool)
        for k in range(len(items)):
            cls = label[k][label[k] != 255].unique()
            present[k, cls] = True
        neg = torch.finfo(logits.dtype).min
        oracle.update(logits.masked_fill(~present[:, :, None, None], neg).argmax(1), label)
        emb = encode_image_cls(clip, x)
        scores = emb @ text.T
        zs_hits += int(present[torch.arange(len(items)), scores.argmax(1)].sum())
        keep = torch.zeros_like(present)
        keep.scatter_(1, scores.topk(2, dim=1).indices, True)
        top2.update(logits.masked_fill(~keep[:, :, None, None], neg).argmax(1), label)
    cb = bias.class_bias(names)
    sb = bias.space_bias("tvd")
    table = seg.table(names)
    cls_table = cb.table.copy()
    cls_table["iou"] = table["iou"].values
    ro = readout.result(names)
    cls_table["region_readout"] = ro.table["region_accuracy"].values
    cls_table["patch_readout"] = ro.table["patch_accuracy"].values
    return {
        "n_val": n,
        "miou": float(seg.miou()),
        "miou_release": float(seg.miou_release()),
        "pixel_accuracy": seg.pixel_accuracy(),
        "chance_miou": expected_chance_miou(table["gt_pixels"].values),
        "oracle_miou": float(oracle.miou()),
        "top2_miou": float(top2.miou()),
        "zeroshot_top1": zs_hits / n,
        "class_bias_tvd": cb.tvd,
        "space_bias_tvd": sb.score,
        "region_readout": ro.region_accuracy,
        "patch_readout": ro.patch_accuracy,
        "space_per_cell": sb.per_cell,
        "space_diff": sb.diff,
        "classes": cls_table,
        "pairs": pairs.results(names),
    }


def _fmt(x, nd=1):
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def _figure(results: dict, names: Sequence[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    return fig


def _per_class_table(results: dict, names: Sequence[str], cell) -> list[str]:
    """Markdown rows: one per class, one column per model, ``cell(row of its classes table)``."""
    labels = list(results)
    rows = ["| class | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for k, name in enumerate(names):
        rows.append(f"| {name} | " + " | ".join(cell(results[lab]["classes"].iloc[k])
                                                for lab in labels) + " |")
    return rows


def _per_model_table(results: dict, headers: Sequence[str], cells) -> list[str]:
    """Markdown rows: one per model, its label then ``cells(its results)`` (a list of strings)."""
    rows = ["| toy CLIP pretrained on | " + " | ".join(headers) + " |",
            "|---|" + "---|" * len(headers)]
    rows += [f"| {lab} | " + " | ".join(cells(r)) + " |" for lab, r in results.items()]
    return rows


def _markdown(results: dict, provenance: dict, names: Sequence[str]) -> str:
    labels = list(results)
    L = []
    L.append("# Toy bias lab: MaskCLIP on the toy world\n")
    L.append(f"Generated by `reclip_core.toy_lab.run_bias_lab` on {provenance['created_utc']} "
             f"in {provenance['seconds']:.0f} s. Evaluation: the toy world's `val` split "
             f"({results[labels[0]]['n_val']} images, 64×64, uniform class frequencies and "
             f"positions) of preset `{provenance['val_preset']}` (hash "
             f"`{provenance['val_preset_hash']}`); `train`/`val` are the same images under both "
             f"presets. MaskCLIP = frozen toy CLIP, dense value-path features, text features "
             f"from the 85 CLIP prompt templates, argmax (no training). mIoU in %, mmseg "
             f"definition (classes with non-zero union), background ignored.\n")
    L.append("## Segmentation\n")
    L += _per_model_table(
        results, ["MaskCLIP mIoU", "release mIoU", "pixel acc.", "chance",
                  "top-2 image classes (label-free)", "oracle image classes", "image-level top-1"],
        lambda r: [_fmt(r[k]) for k in ("miou", "miou_release", "pixel_accuracy", "chance_miou",
                                        "top2_miou", "oracle_miou")]
        + [f"{_fmt(100 * r['zeroshot_top1'])} %"])
    L.append("\n*chance*: expected mIoU of uniformly random per-pixel classes. *oracle*: MaskCLIP "
             "logits restricted to each image's true classes. *top-2*: restricted to the two best "
             "classes of the class-token image embedding. *image-level top-1*: the class-token "
             "top-1 class is in the image.\n")
    L.append("## Biases\n")
    L += _per_model_table(
        results, ["class bias: TVD of predicted vs true pixel shares",
                  "space bias: mean per-cell TVD (4×4 grid)"],
        lambda r: [f"{r['class_bias_tvd']:.3f}", f"{r['space_bias_tvd']:.3f}"])
    L.append("\n0 = unbiased, 1 = disjoint. A position-independent class bias also raises the "
             "per-cell TVD: compare the two columns, and see the pairs below.\n")
    L.append("## What the training loss can see\n")
    L += _per_model_table(
        results, ["objects read right from their pooled dense features",
                  "patches read right one by one"],
        lambda r: [f"{_fmt(100 * r['region_readout'])} %", f"{_fmt(100 * r['patch_readout'])} %"])
    L.append("\nReCLIP++'s loss scores each hypothesis class's *pooled* dense feature against the class "
             "texts (method.md §3), so it can teach the decoder no more than what a region's pooled "
             "feature says. Left: each val object's dense features averaged over its own pixels, "
             "classified against the texts; right: its patches (tokens more than half covered) one by "
             "one; class means. When the two are close, the loss sees what MaskCLIP's argmax sees "
             "(docs/training.md).\n")
    L.append("### Look-alike pairs (same colour; separated by position in the biased pretraining)\n")
    L.append("| toy CLIP pretrained on | pair | split along | pixels | follows pretraining "
             "position | pair accuracy |")
    L.append("|---|---|---|---|---|---|")
    for lab in labels:
        for p in results[lab]["pairs"]:
            L.append(f"| {lab} | {p['pair']} | {'top/bottom' if p['axis'] == 'y' else 'left/right'}"
                     f" | {p['pixels']} | {p['follow_position']:.2f} | {p['pair_accuracy']:.2f} |")
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
    for lab, prov in provenance["models"].items():
        m = prov["manifest"]
        L.append(f"- **{lab}**: weights `{prov['source']}`, sha256 `{m.get('sha256', '?')[:16]}…`, "
                 f"pretrained on preset `{m.get('preset')}` (hash `{m.get('preset_hash')}`), "
                 f"seed {m.get('seed')}, {m.get('steps')} steps × batch {m.get('batch_size')}, "
                 f"{'bf16 autocast' if m.get('amp') == 'bf16' else 'float32'}, "
                 f"{m.get('wall_time_s')} s on {m.get('threads')} thread(s).")
    L.append("\nFigures: `bias_lab.png` (per-class share ratio; per-cell space-bias maps). "
             "Tables: `bias_lab.csv`, `bias_lab_classes.csv`, `bias_lab_cells.csv`; "
             "everything in `bias_lab.json`.\n")
    return "\n".join(L)


def run_bias_lab(out_dir: str | Path | None = None, models: Mapping[str, str] | None = None,
                 val_preset: str = "biased", root=None, n_val: int | None = None,
                 device: str = "cpu", grid: int = 4) -> dict:
    """Evaluate MaskCLIP for each toy CLIP in ``models`` (label -> ``load_clip("toy", pretrained=
    ...)`` spec: ``"biased"``, ``"uniform"`` or a weights folder) and write the report files to
    ``out_dir`` (default ``results/toy``). Returns the results dict."""
    import pandas as pd

    from .atomic_io import atomic_save_figure, atomic_write_csv, atomic_write_json, \
        atomic_write_text
    from .backbone import load_clip
    from .datasets.toyworld import load_preset, preset_hash

    t0 = time.time()
    out = Path(out_dir) if out_dir is not None else REPO_ROOT / "results" / "toy"
    models = dict(models or DEFAULT_MODELS)
    preset = load_preset(val_preset)
    names = [c["name"] for c in preset["classes"]]
    results, prov = {}, {}
    for lab, spec in models.items():
        clip = load_clip("toy", pretrained=spec, device=device)
        results[lab] = evaluate_maskclip(clip, preset, root=root, n_val=n_val, grid=grid)
        prov[lab] = {"source": str(spec), "manifest": getattr(clip, "toy_manifest", {})}
    provenance = {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": time.time() - t0,
        "val_preset": preset["name"], "val_preset_hash": preset_hash(preset),
        "val_preset_content": preset, "grid": grid, "models": prov,
    }
    out.mkdir(parents=True, exist_ok=True)
    scalar_keys = ("n_val", "miou", "miou_release", "pixel_accuracy", "chance_miou", "top2_miou",
                   "oracle_miou", "zeroshot_top1", "class_bias_tvd", "space_bias_tvd",
                   "region_readout", "patch_readout")
    rows = []
    for lab, r in results.items():
        m = prov[lab]["manifest"]
        row = {"model": lab, "pretrain_preset": m.get("preset"), "seed": m.get("seed"),
               "weights_sha256": m.get("sha256"), "val_preset": preset["name"],
               "val_preset_hash": preset_hash(preset)}
        row.update({k: r[k] for k in scalar_keys})
        for p in r["pairs"]:
            row[f"follow_position[{p['pair']}]"] = p["follow_position"]
            row[f"pair_accuracy[{p['pair']}]"] = p["pair_accuracy"]
        rows.append(row)
    atomic_write_csv(out / "bias_lab.csv", pd.DataFrame(rows))
    cls = pd.concat([r["classes"].assign(model=lab) for lab, r in results.items()])
    atomic_write_csv(out / "bias_lab_classes.csv", cls)
    cells = []
    for lab, r in results.items():
        for i in range(grid):
            for j in range(grid):
                cells.append({"model": lab, "row": i, "col": j,
                              "tvd": float(r["space_per_cell"][i, j])})
    atomic_write_csv(out / "bias_lab_cells.csv", pd.DataFrame(cells))
    fig = _figure(results, names)
    atomic_save_figure(fig, out / "bias_lab.png", dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write_text(out / "bias_lab.md", _markdown(results, provenance, names))
    blob = {"provenance": provenance,
            "results": {lab: {k: (v.tolist() if isinstance(v, np.ndarray) else
                                  v.to_dict(orient="records") if hasattr(v, "to_dict") else v)
                              for k, v in r.items()} for lab, r in results.items()}}
    atomic_write_json(out / "bias_lab.json", json.loads(json.dumps(blob, default=float)), indent=2)
    return results


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Write results/toy/bias_lab.{md,csv,png}.")
    ap.add_argument("--out", default=None)
    ap.add_argument("--n-val", type=int, default=None)
    ap.add_argument("--model", action="append", default=None, metavar="LABEL=SPEC",
                    help="toy CLIP to evaluate (repeatable), e.g. biased=biased, "
                         "seed1=path/to/weights; default: biased, uniform and the biased second seed")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    models = dict(m.split("=", 1) for m in args.model) if args.model else None
    res = run_bias_lab(args.out, models=models, n_val=args.n_val)
    for lab, r in res.items():
        print(f"{lab}: mIoU {r['miou']:.1f} (chance {r['chance_miou']:.1f}, oracle "
              f"{r['oracle_miou']:.1f}), class TVD {r['class_bias_tvd']:.3f}, space TVD "
              f"{r['space_bias_tvd']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
