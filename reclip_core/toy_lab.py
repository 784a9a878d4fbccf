"""The toy bias lab's report: MaskCLIP on the toy world, and its two biases. This module builds the
measurements (accumulators of :func:`reclip_core.evaluation.evaluate`), runs the evaluation and
writes the files; ``bias_lab_report`` renders the Markdown and the figure.

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

import argparse
import json
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .atomic_io import atomic_write_csv, atomic_write_json, atomic_write_text
from .backbone import encode_image_cls
from .clip_loading import load_clip
from .bias_analysis import RegionReadoutAccumulator
from .bias_lab_report import bias_lab_markdown, save_bias_lab_figure
from .datasets.toyworld import IGNORE_INDEX, ToyWorld, load_preset, preset_hash
from .evaluation import EvalBatch, evaluate
from .metrics import SegMetric
from .model import MaskCLIP

# the biased model, the same recipe on the uniform preset, and the biased recipe's second seed
DEFAULT_MODELS = {"biased": "biased", "uniform": "uniform", "biased, seed 1": "biased_seed1"}
REPO_ROOT = Path(__file__).resolve().parents[1]
#: this report shows MaskCLIP without PD (``pd_variants=("no_pd",)``), so the threshold is unused
_UNUSED_PD_THRESHOLD = 0.5
#: the scalar metrics of one model, in the order of ``bias_lab.csv``
SCALAR_KEYS = ("n_val", "miou", "miou_release", "pixel_accuracy", "chance_miou", "top2_miou", "oracle_miou",
               "zeroshot_top1", "class_bias_tvd", "space_bias_tvd", "region_readout", "patch_readout")


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


# ------------------------------------------------------------------------------------------------
# Accumulators of evaluate(): the measurements beyond mIoU and the biases (they read labels)
# ------------------------------------------------------------------------------------------------
def _present_classes(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """bool [B, C]: the classes each label map holds."""
    present = torch.zeros(len(label), num_classes, dtype=torch.bool)
    for k in range(len(label)):
        present[k, label[k][label[k] != IGNORE_INDEX].unique()] = True
    return present


def _argmax_within(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Per-pixel argmax over the classes ``allowed`` [B, C] for each image → long [B, H, W] (CPU)."""
    neg = torch.finfo(logits.dtype).min
    return logits.masked_fill(~allowed.to(logits.device)[:, :, None, None], neg).argmax(1).cpu()


class OracleClasses:
    """mIoU of the logits restricted to each image's true classes: what perfect image-level
    hypotheses would give."""

    def __init__(self, num_classes: int):
        self.metric = SegMetric(num_classes)

    def update(self, batch: EvalBatch) -> None:
        present = _present_classes(batch.label, self.metric.num_classes)
        self.metric.update(_argmax_within(batch.logits, present), batch.label)


class ClassTokenHypotheses:
    """Label-free image-level hypotheses from the class-token image embedding: the mIoU of the
    logits restricted to its ``k`` best classes, and how often its top-1 class is in the image."""

    def __init__(self, clip: torch.nn.Module, text: torch.Tensor, num_classes: int, k: int = 2):
        self.clip, self.text, self.k = clip, text, k
        self.metric = SegMetric(num_classes)
        self.top1_hits, self.images = 0, 0

    def update(self, batch: EvalBatch) -> None:
        present = _present_classes(batch.label, self.metric.num_classes)
        scores = (encode_image_cls(self.clip, batch.inputs) @ self.text.T).cpu()
        self.top1_hits += int(present[torch.arange(len(present)), scores.argmax(1)].sum())
        self.images += len(present)
        best = torch.zeros_like(present)
        best.scatter_(1, scores.topk(self.k, dim=1).indices, True)
        self.metric.update(_argmax_within(batch.logits, best), batch.label)


class RegionReadout:
    """``bias_analysis.RegionReadoutAccumulator`` on the model's dense features."""

    def __init__(self, text: torch.Tensor, num_classes: int):
        self.text, self.readout = text, RegionReadoutAccumulator(num_classes)

    def update(self, batch: EvalBatch) -> None:
        self.readout.update(batch.outputs["feat"], self.text, batch.label)


class LookalikePairs:
    """The look-alike-pair counts (:class:`_PairCounter`) of the predictions."""

    def __init__(self, pairs: Sequence[dict], size: int):
        self.counter = _PairCounter(pairs, size)

    def update(self, batch: EvalBatch) -> None:
        self.counter.update(batch.pred.numpy(), batch.label.numpy())


def evaluate_maskclip(clip: torch.nn.Module, preset: Mapping, root=None, n_val: int | None = None,
                      batch_size: int = 200, grid: int = 4) -> dict:
    """MaskCLIP metrics of one toy CLIP on the toy world's val split (see module doc)."""
    val = ToyWorld("val", preset, root=root)
    names = val.class_names
    C, size = len(names), int(preset["image_size"])
    model = MaskCLIP(clip, names)
    oracle, class_token = OracleClasses(C), ClassTokenHypotheses(clip, model.text, C)
    readout, pairs = RegionReadout(model.text, C), LookalikePairs(lookalike_pairs(preset), size)
    # test_size = the image side: no resize, so the inputs are the images /255, CLIP-normalised;
    # and a side of whole patches, so the logits reach the label size in one bilinear upsampling
    report = evaluate(model, val, test_size=size, pd_threshold=_UNUSED_PD_THRESHOLD, heads=["maskclip"],
                      max_images=n_val, progress=False, batch_size=batch_size, bias_grid=grid, pd_variants=("no_pd",),
                      accumulators={"maskclip": [oracle, class_token, readout, pairs]})
    seg, bias = report.metrics["maskclip"]["no_pd"], report.bias["maskclip"]
    cb, sb = bias.class_bias(names), bias.space_bias("tvd")
    table = seg.table(names)
    ro = readout.readout.result(names)
    cls_table = cb.table.copy()
    cls_table["iou"] = table["iou"].values
    cls_table["region_readout"] = ro.table["region_accuracy"].values
    cls_table["patch_readout"] = ro.table["patch_accuracy"].values
    return {
        "n_val": report.images,
        "miou": float(seg.miou()),
        "miou_release": float(seg.miou_release()),
        "pixel_accuracy": seg.pixel_accuracy(),
        "chance_miou": expected_chance_miou(table["gt_pixels"].values),
        "oracle_miou": float(oracle.metric.miou()),
        "top2_miou": float(class_token.metric.miou()),
        "zeroshot_top1": class_token.top1_hits / report.images,
        "class_bias_tvd": cb.tvd,
        "space_bias_tvd": sb.score,
        "region_readout": ro.region_accuracy,
        "patch_readout": ro.patch_accuracy,
        "space_per_cell": sb.per_cell,
        "space_diff": sb.diff,
        "classes": cls_table,
        "pairs": pairs.counter.results(names),
    }


def _model_rows(results: Mapping[str, dict], prov: Mapping[str, dict], preset: Mapping) -> pd.DataFrame:
    """``bias_lab.csv``: one row per model, its provenance, every scalar metric and pair statistic."""
    rows = []
    for lab, r in results.items():
        m = prov[lab]["manifest"]
        row = {"model": lab, "pretrain_preset": m.get("preset"), "seed": m.get("seed"),
               "weights_sha256": m.get("sha256"), "val_preset": preset["name"],
               "val_preset_hash": preset_hash(preset)}
        row.update({k: r[k] for k in SCALAR_KEYS})
        for p in r["pairs"]:
            row[f"follow_position[{p['pair']}]"] = p["follow_position"]
            row[f"pair_accuracy[{p['pair']}]"] = p["pair_accuracy"]
        rows.append(row)
    return pd.DataFrame(rows)


def _cell_rows(results: Mapping[str, dict], grid: int) -> pd.DataFrame:
    """``bias_lab_cells.csv``: per model and grid cell, the space-bias divergence."""
    return pd.DataFrame([{"model": lab, "row": i, "col": j, "tvd": float(r["space_per_cell"][i, j])}
                         for lab, r in results.items() for i in range(grid) for j in range(grid)])


def _json_blob(results: Mapping[str, dict], provenance: Mapping) -> dict:
    """``bias_lab.json``: every result (arrays as lists, tables as records) and the provenance."""
    blob = {"provenance": provenance,
            "results": {lab: {k: (v.tolist() if isinstance(v, np.ndarray) else
                                  v.to_dict(orient="records") if hasattr(v, "to_dict") else v)
                              for k, v in r.items()} for lab, r in results.items()}}
    return json.loads(json.dumps(blob, default=float))


def run_bias_lab(out_dir: str | Path | None = None, models: Mapping[str, str] | None = None,
                 val_preset: str = "biased", root=None, n_val: int | None = None,
                 device: str = "cpu", grid: int = 4) -> dict:
    """Evaluate MaskCLIP for each toy CLIP in ``models`` (label -> ``load_clip("toy", pretrained=
    ...)`` spec: ``"biased"``, ``"uniform"`` or a weights folder) and write the report files to
    ``out_dir`` (default ``results/toy``). Returns the results dict."""
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
    atomic_write_csv(out / "bias_lab.csv", _model_rows(results, prov, preset))
    atomic_write_csv(out / "bias_lab_classes.csv",
                     pd.concat([r["classes"].assign(model=lab) for lab, r in results.items()]))
    atomic_write_csv(out / "bias_lab_cells.csv", _cell_rows(results, grid))
    save_bias_lab_figure(results, names, out / "bias_lab.png")
    atomic_write_text(out / "bias_lab.md", bias_lab_markdown(results, provenance, names))
    atomic_write_json(out / "bias_lab.json", _json_blob(results, provenance), indent=2)
    return results


def main(argv: Sequence[str] | None = None) -> int:
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
