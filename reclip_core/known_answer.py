"""The known-answer bias lab: a toy CLIP whose bias is planted with known amplitudes, and how much
of it each model removes (docs/toy-world.md, "The known-answer world").

    U  = MaskCLIP on the known-answer toy CLIP without the planted bias
    B  = MaskCLIP on the same CLIP with it (``configs/toy_known.yaml``)
    ReCLIP++, rectification only, ReCLIP: trained on the biased CLIP, label-free, over seeds

For every model: mIoU (no PD), the class- and space-bias TVDs of its predictions, and the
recovery of the planted map by its learned bias map (``bias_recovery``; the mean of the model's
``bias_logits`` over the val images, which for ReCLIP++ is the image-independent map itself).
MaskCLIP's readout of true regions (pooled) and of their patches, with and without the bias, says
whether the bias flips patches but not regions — the condition under which the loss, which scores
pooled features, can see past it. ``make reproduce`` runs this lab after the notebooks; the
diagnostic runs that explain its misses are in ``known_answer_diagnostics``.

    python -m reclip_core.known_answer                 # results/toy/known/known_answer.{md,csv,json,png}
    python -m reclip_core.known_answer_diagnostics     # known_answer_diagnostics.* (longer)
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from .bias_recovery import bias_recovery, centre_over_classes
from .clip_loading import clip_fingerprint
from .eval_scoring import EvalBatch
from .lab import Lab, setup
from .lab import run_name as lab_run_name
from .planted_bias import planted_map
from .result_files import write_figure
from .toy_lab import RegionReadout

#: the trained models: label -> (the notebooks' run name, model kind, config overrides, the head scored);
#: same names and overrides as notebooks 03-05, so a seed's run is trained once for both
MODELS: Dict[str, tuple] = {
    "ReCLIP++": ("reclip++", "reclip++", {}, "reclip++"),
    "rectification only": ("rectify_both", "reclip++", {"use_decoder": False, "bias_mode": "both"}, "rectified"),
    "ReCLIP": ("reclip", "reclip", {}, "rectified"),
}
#: models only the diagnostics train (``known_answer_diagnostics``), in the same form
VARIANTS: Dict[str, tuple] = {
    "ReCLIP++ (rectified start)": ("reclip++_rectified_start", "reclip++", {"decoder_init": "rectified"}, "reclip++"),
}
SEEDS = (0, 1, 2)


def model_entry(label: str) -> tuple:
    """(run name, kind, overrides, head) of a lab model (:data:`MODELS`) or a diagnostic one (:data:`VARIANTS`)."""
    return MODELS[label] if label in MODELS else VARIANTS[label]


class MeanBiasMap:
    """Mean of a model's ``bias_logits`` [C, h, w] over the evaluated images."""

    def __init__(self) -> None:
        self.total, self.images = None, 0

    def update(self, batch: EvalBatch) -> None:
        bias = batch.outputs["bias_logits"].detach().double().cpu()  # [B, C, h, w]
        self.total = bias.sum(0) if self.total is None else self.total + bias.sum(0)
        self.images += bias.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / self.images


def _scores(lab: Lab, report: Any, head: str) -> Dict[str, float]:
    bias = report.bias[head]
    return {"mIoU": float(report.metrics[head]["no_pd"].miou()), "class TVD": float(bias.class_bias().tvd),
            "space TVD": float(bias.space_bias().score)}


def maskclip_row(lab: Lab, label: str) -> Dict[str, Any]:
    """MaskCLIP's scores and region/patch readout on ``lab``'s CLIP."""
    readout = RegionReadout(lab.text, len(lab.class_names))
    report = lab.evaluate(lab.model("maskclip"), accumulators={"maskclip": [readout]}, name=f"MaskCLIP {label}")
    result = readout.readout.result(lab.class_names)
    return {"model": f"MaskCLIP ({label})", **_scores(lab, report, "maskclip"),
            "regions read %": 100 * result.region_accuracy, "patches read %": 100 * result.patch_accuracy}


def train_model(lab: Lab, label: str, seed: int) -> torch.nn.Module:
    """The lab's model ``label`` (a key of :data:`MODELS` or :data:`VARIANTS`) trained at ``seed`` on
    ``lab``'s CLIP, in ``runs/<name>-seed<seed>`` (a finished run is reused: the notebooks and the
    lab share it)."""
    name, kind, overrides, _ = model_entry(label)
    return lab.train(name, kind=kind, seed=seed, **overrides)


def run_name(label: str, seed: int) -> str:
    """The folder name of ``label``'s run at ``seed`` under ``runs/``."""
    return lab_run_name(model_entry(label)[0], seed)


def trained_row(lab: Lab, label: str, seed: int, planted: torch.Tensor, row_label: str | None = None) -> tuple:
    """Train ``label`` at ``seed`` on ``lab``'s CLIP → (row, per-class recovery, learned map)."""
    head = model_entry(label)[3]
    model, name = train_model(lab, label, seed), run_name(label, seed)
    mean_map = MeanBiasMap()
    report = lab.evaluate(model, accumulators={head: [mean_map]}, name=name)
    learned = mean_map.mean().float()
    rec = bias_recovery(learned, planted, lab.class_names)
    row_label = row_label or label
    row = {"model": row_label, "seed": seed, **_scores(lab, report, head), "recovery": rec.overall,
           "recovery scale": rec.scale}
    # each class's IoU beside its recovery: which classes a run drops
    per_class = rec.per_class.assign(IoU=100 * report.metrics[head]["no_pd"].iou(), model=row_label, seed=seed)
    return row, per_class, learned


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per model: mean and sd over seeds (training-free rows: one run, sd 0; a metric a model has
    no value of: NaN), and the run count."""
    metrics = [c for c in rows.columns if c not in ("model", "seed")]
    out = []
    for model, grp in rows.groupby("model", sort=False):
        row: Dict[str, Any] = {"model": model, "runs": len(grp)}
        for m in metrics:
            vals = grp[m].dropna().to_numpy(dtype=float)
            row[m] = float(vals.mean()) if len(vals) else np.nan
            # one run: sd 0; no value (a metric the model has not): no sd either
            row[f"{m} sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0 if len(vals) else np.nan
        out.append(row)
    return pd.DataFrame(out)


def goal_lines(summary: pd.DataFrame) -> list:
    """The lab's goals, each checked on the mean and the spread over seeds."""
    by = summary.set_index("model")
    u, b = by.loc["MaskCLIP (no planted bias)", "mIoU"], by.loc["MaskCLIP (planted bias)", "mIoU"]
    lines = [f"- The planted bias costs MaskCLIP {u - b:.1f} points (U {u:.1f}, B {b:.1f}; goal ≥ 15): "
             f"{'met' if u - b >= 15 else 'MISSED'}."]
    for label, need in (("ReCLIP++", 0.6), ("rectification only", 0.4)):
        if label not in by.index:
            continue
        m, sd = by.loc[label, "mIoU"], by.loc[label, "mIoU sd"]
        share = (m - b) / (u - b) if u > b else np.nan
        lines.append(f"- {label}: mIoU {m:.1f} ± {sd:.1f}, {100 * share:.0f}% of U − B recovered (goal ≥ "
                     f"{100 * need:.0f}%; {'met' if share >= need and m - sd > b else 'MISSED'}); "
                     f"bias recovery {by.loc[label, 'recovery']:.2f} ± {by.loc[label, 'recovery sd']:.2f} "
                     f"(goal ≥ 0.8: {'met' if by.loc[label, 'recovery'] >= 0.8 else 'MISSED'}).")
        for tvd in ("class TVD", "space TVD"):
            ratio = by.loc[label, tvd] / by.loc["MaskCLIP (planted bias)", tvd]
            lines.append(f"  - {tvd} {by.loc[label, tvd]:.3f} ± {by.loc[label, tvd + ' sd']:.3f}, "
                         f"{abs(100 * (1 - ratio)):.0f}% {'below' if ratio <= 1 else 'above'} MaskCLIP's "
                         f"(goal ≥ 50% below: {'met' if ratio <= 0.5 else 'MISSED'}).")
    if "ReCLIP++" in by.index:
        m, sd = by.loc["ReCLIP++", "mIoU"], by.loc["ReCLIP++", "mIoU sd"]
        lines.append(f"- ReCLIP++ − B = {m - b:+.1f} ± {sd:.1f} (goal ≥ +10: "
                     f"{'met' if m - b >= 10 and m - sd - b > 0 else 'MISSED'}).")
    return lines


def maps_figure(planted: torch.Tensor, learned: Mapping[str, torch.Tensor], names: Sequence[str]) -> plt.Figure:
    """Planted and learned bias maps [C, h, w], centred over classes, class by class: one row each,
    the planted B* first."""
    rows = {"planted B*": planted, **learned}
    C = len(names)
    fig, axes = plt.subplots(len(rows), C, figsize=(1.3 * C, 1.45 * len(rows)), squeeze=False)
    for r, (label, bmap) in enumerate(rows.items()):
        centred = centre_over_classes(bmap.numpy())
        lim = float(np.abs(centred).max()) or 1.0
        for c in range(C):
            ax = axes[r, c]
            ax.imshow(centred[c], cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(names[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(textwrap.fill(label, 18), fontsize=6)
    fig.suptitle("bias maps centred over classes (red: favoured; each row on its own scale)", fontsize=8)
    return fig


def save_maps_figure(planted: torch.Tensor, learned: Mapping[str, torch.Tensor], names: Sequence[str],
                     path: Path) -> Path:
    """:func:`maps_figure` written to ``path`` (PNG, atomically)."""
    fig = maps_figure(planted, learned, names)
    write_figure(path.parent, fig, path.stem)
    plt.close(fig)
    return path


def unbiased_lab(biased: Lab, folder: str = "unbiased") -> Lab:
    """The lab of the same CLIP without the planted bias (U), keeping its hypotheses and runs
    under ``<results>/runs/<folder>/`` (another CLIP fingerprint, so its own caches)."""
    lab = setup("toy", "known", device=str(biased.device), seed=biased.seed, num_threads=biased.cfg["num_threads"],
                **{"clip.planted_bias": "null"})
    lab.results = biased.results / "runs" / folder
    lab.results.mkdir(parents=True, exist_ok=True)
    return lab


def planted_and_grid(lab: Lab) -> tuple:
    """(B* [C, h, w] on CPU, (h, w)) at the lab's test size."""
    hw = (lab.cfg["test_size"] // lab.clip.visual.patch_size[0],) * 2
    return planted_map(lab.clip, hw).cpu(), hw


def learned_map(model: torch.nn.Module, hw: tuple) -> torch.Tensor:
    """A ReCLIP++ model's bias map [C, h, w] (image-independent: no images needed), on CPU."""
    with torch.no_grad():
        return model.eval().bias_map(tuple(hw)).detach().float().cpu()


def recovery_table(learned: torch.Tensor, planted: torch.Tensor, names: Sequence[str]) -> pd.DataFrame:
    """Bias recovery of ``learned`` over all classes (first row) and per class, with the size of the
    learned map along the planted one (``scale``, 1: the planted size)."""
    rec = bias_recovery(learned, planted, names)
    overall = {"class": "all classes", "recovery": rec.overall, "scale": rec.scale}
    return pd.concat([pd.DataFrame([overall]), rec.per_class[["class", "recovery", "scale"]]], ignore_index=True)


def share_of_gap(benchmark: pd.DataFrame, u: float, baseline: str = "MaskCLIP") -> pd.DataFrame:
    """Notebook 05's benchmark rows (``model``, ``mIoU``) with U prepended and each model's share of
    U − B recovered, in % (B: the ``baseline`` row, MaskCLIP on the biased CLIP)."""
    b = float(benchmark.set_index("model").loc[baseline, "mIoU"])
    rows = [{"model": "MaskCLIP (no planted bias) = U", "mIoU": u, "% of U − B": 100.0}]
    rows += [{"model": m + (" = B" if m == baseline else ""), "mIoU": v, "% of U − B": 100 * (v - b) / (u - b)}
             for m, v in zip(benchmark["model"], benchmark["mIoU"])]
    return pd.DataFrame(rows)


def run_known_answer(seeds: Sequence[int] = SEEDS, models: Sequence[str] = tuple(MODELS),
                     device: str = "auto", val_hypotheses: bool = False) -> Dict[str, Any]:
    """U, B and the trained models over ``seeds`` → their tables, also written under
    ``results/toy/known/`` (``known_answer{,_runs,_recovery_per_class}``, the maps figure, JSON).
    ``val_hypotheses``: compute the validation split's hypotheses first, for notebook 04 (beside
    the notebooks, while they compute the training split's)."""
    t0 = time.perf_counter()
    biased = setup("toy", "known", device=device)
    if val_hypotheses:  # not this lab's input: notebook 04 scores them (`make reproduce` runs both)
        biased.val_hypotheses()
    unbiased = unbiased_lab(biased)
    planted, hw = planted_and_grid(biased)
    offset_norm = biased.clip.visual.planted_bias.feature_offset(hw).norm(dim=1)  # [h*w]
    rows = [maskclip_row(unbiased, "no planted bias"), maskclip_row(biased, "planted bias")]
    per_class, learned, trained = [], {}, {}
    # the notebooks train the first seed's runs: beside them (`make reproduce`) this lab takes the
    # other seeds first and, by the time it reaches the first, reads most of those runs finished
    for seed in sorted(seeds, key=lambda s: (s == seeds[0], s)):
        for label in models:
            trained[label, seed] = trained_row(biased, label, seed, planted)
    for label in models:  # the tables list each model's seeds in order
        for seed in seeds:
            row, rec, bmap = trained[label, seed]
            rows.append(row)
            per_class.append(rec)
            if seed == seeds[0]:
                learned[f"{label} (seed {seed})"] = bmap
    table = pd.DataFrame(rows)
    summary = summarise(table)
    biased.save_table(table, "known_answer_runs", floatfmt=".3f", title="Known-answer lab: every run")
    biased.save_table(summary, "known_answer", floatfmt=".3f",
                      title="Known-answer lab: mean and sd over seeds (training-free rows: one run)")
    biased.save_table(pd.concat(per_class, ignore_index=True), "known_answer_recovery_per_class",
                      floatfmt=".3f", title="Bias recovery (correlation with the planted map) and IoU per class")
    save_maps_figure(planted, learned, biased.class_names, biased.results / "known_answer_maps.png")
    goals = goal_lines(summary)
    biased.save_json({"seeds": list(seeds), "models": list(models), "goals": goals,
                      "clip": {"biased": clip_fingerprint(biased.clip), "unbiased": clip_fingerprint(unbiased.clip)},
                      "planted_bias": biased.clip.planted_bias_spec, "grid": list(hw),
                      # the planted component's size beside the unit-norm dense features it is added to
                      "planted_offset_norm": {"mean": float(offset_norm.mean()), "min": float(offset_norm.min()),
                                              "max": float(offset_norm.max())},
                      "timings_s": [biased.timings, unbiased.timings], "wall_s": round(time.perf_counter() - t0, 1)},
                     "known_answer")
    return {"runs": table, "summary": summary, "goals": goals, "planted": planted, "learned": learned}


#: the summary.md columns of the lab's table: (column, its sd column or None, decimals)
SUMMARY_COLUMNS = (("mIoU", "mIoU sd", 1), ("class TVD", "class TVD sd", 3), ("space TVD", "space TVD sd", 3),
                   ("recovery", "recovery sd", 2))


def summary_section(results: Path) -> list:
    """``summary.md``'s known-answer section (markdown lines) from the lab's files under
    ``results`` (``<results>/toy/known/``); empty when the lab has not run there."""
    folder = Path(results) / "toy" / "known"
    table, meta = folder / "known_answer.csv", folder / "known_answer.json"
    if not (table.is_file() and meta.is_file()):
        return []
    df, info = pd.read_csv(table), json.loads(meta.read_text(encoding="utf-8"))

    def cell(row, col, sd, dec):
        if pd.isna(row[col]):
            return "—"
        return f"{row[col]:.{dec}f}" + (f" ± {row[sd]:.{dec}f}" if row["runs"] > 1 else "")

    lines = ["## Known-answer world ([known/known_answer.md](known/known_answer.md))", "",
             "A bias of known amplitudes planted in a toy CLIP (docs/toy-world.md): U = MaskCLIP without it, "
             f"B = MaskCLIP with it; trained rows: mean ± sd over seeds {', '.join(map(str, info['seeds']))}. "
             "Bias recovery: correlation of the learned and the planted bias maps, centred over classes.", "",
             "| model | runs | " + " | ".join(c for c, _, _ in SUMMARY_COLUMNS) + " |",
             "|---|---|" + "---|" * len(SUMMARY_COLUMNS)]
    for _, row in df.iterrows():
        lines.append(f"| {row['model']} | {row['runs']} | " +
                     " | ".join(cell(row, c, sd, dec) for c, sd, dec in SUMMARY_COLUMNS) + " |")
    # the goal lines from the table (not the JSON's copy), so they read as this version words them
    lines += ["", "Goals:", ""] + goal_lines(df) + ["", "![planted and learned bias maps]"
                                                           "(known/known_answer_maps.png)", ""]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The known-answer bias lab (toy profile, world 'known').")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--val-hypotheses", action="store_true",
                    help="first compute the validation split's hypotheses (notebook 04 reads them)")
    args = ap.parse_args(argv)
    result = run_known_answer(args.seeds, args.models, args.device, args.val_hypotheses)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(result["summary"].round(3).to_string(index=False))
    print("\n".join(result["goals"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
