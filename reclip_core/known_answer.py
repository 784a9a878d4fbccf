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
pooled features, can see past it. Two diagnostic rows train ReCLIP++ again: on the CLIP without
the planted bias (what the method does to a clean CLIP), and with the bias planted in the logits
only (``planted_bias``, ``where="logits"``: the loss pools clean features), which separates "the
loss reads the bias" from "the optimisation fails".

    python -m reclip_core.known_answer            # results/toy/known/known_answer.{md,csv,json,png}
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from .backbone import logit_scale
from .bias_recovery import bias_recovery, centre_over_classes
from .clip_loading import clip_fingerprint
from .eval_scoring import EvalBatch
from .lab import Lab, setup
from .planted_bias import plant_bias, planted_map
from .result_files import write_figure
from .run_inputs import load_config_clip
from .toy_lab import RegionReadout

#: the trained models: label -> (model kind, config overrides, the head scored)
MODELS: Dict[str, tuple] = {
    "ReCLIP++": ("reclip++", {}, "reclip++"),
    "rectification only": ("reclip++", {"use_decoder": False}, "rectified"),
    "ReCLIP": ("reclip", {}, "rectified"),
}
SEEDS = (0, 1, 2)


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


def trained_row(lab: Lab, label: str, seed: int, planted: torch.Tensor, row_label: str | None = None) -> tuple:
    """Train ``label`` at ``seed`` on ``lab``'s CLIP → (row, per-class recovery, learned map)."""
    kind, overrides, head = MODELS[label]
    name = f"{kind}{'-rectify' if overrides.get('use_decoder') is False else ''}-seed{seed}"
    model = lab.train(name, kind=kind, seed=seed, **overrides)
    mean_map = MeanBiasMap()
    report = lab.evaluate(model, accumulators={head: [mean_map]}, name=name)
    learned = mean_map.mean().float()
    rec = bias_recovery(learned, planted, lab.class_names)
    row_label = row_label or label
    row = {"model": row_label, "seed": seed, **_scores(lab, report, head), "recovery": rec.overall,
           "recovery scale": rec.scale}
    return row, rec.per_class.assign(model=row_label, seed=seed), learned


def diagnostic_lab(biased: Lab, folder: str, clip: torch.nn.Module) -> Lab:
    """A lab like ``biased`` on another CLIP, keeping its hypotheses and runs under
    ``<results>/runs/<folder>/`` (caches: not committed)."""
    lab = setup("toy", "known", device=str(biased.device), **{"clip.planted_bias": "null"})
    lab.results = biased.results / "runs" / folder
    lab.results.mkdir(parents=True, exist_ok=True)
    lab.__dict__["clip"] = clip  # the cached property, set to this CLIP
    return lab


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per model: mean and sd over seeds (training-free rows: one run, sd 0), and the run count."""
    metrics = [c for c in rows.columns if c not in ("model", "seed")]
    out = []
    for model, grp in rows.groupby("model", sort=False):
        row: Dict[str, Any] = {"model": model, "runs": len(grp)}
        for m in metrics:
            vals = grp[m].dropna().to_numpy(dtype=float)
            row[m] = float(vals.mean()) if len(vals) else np.nan
            row[f"{m} sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
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
                         f"{100 * (1 - ratio):.0f}% below MaskCLIP's (goal ≥ 50%: "
                         f"{'met' if ratio <= 0.5 else 'MISSED'}).")
    if "ReCLIP++" in by.index:
        m, sd = by.loc["ReCLIP++", "mIoU"], by.loc["ReCLIP++", "mIoU sd"]
        lines.append(f"- ReCLIP++ − B = {m - b:+.1f} ± {sd:.1f} (goal ≥ +10: "
                     f"{'met' if m - b >= 10 and m - sd - b > 0 else 'MISSED'}).")
    return lines


def save_maps_figure(planted: torch.Tensor, learned: Mapping[str, torch.Tensor], names: Sequence[str],
                     path: Path) -> Path:
    """Planted and learned bias maps, centred over classes, class by class (one row each)."""
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
    write_figure(path.parent, fig, path.stem)
    plt.close(fig)
    return path


#: multiples of the planted amplitudes the training-free sweep measures MaskCLIP at
SWEEP_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


def amplitude_sweep(biased: Lab, unbiased: Lab, scales: Sequence[float] = SWEEP_SCALES) -> pd.DataFrame:
    """MaskCLIP with the planted amplitudes times each scale: mIoU, and how often true regions
    (pooled) and their patches are still read right — where the bias flips patches but not regions."""
    rows = []
    for scale in scales:
        clip = plant_bias(load_config_clip(unbiased.cfg, unbiased.device), biased.cfg["clip"]["planted_bias"],
                          scale=scale)
        row = maskclip_row(diagnostic_lab(biased, "sweep", clip), f"amplitude × {scale:g}")
        rows.append({"amplitude scale": scale, **{k: v for k, v in row.items() if k != "model"}})
    return pd.DataFrame(rows)


def loss_preference(labs: Mapping[str, Lab]) -> pd.DataFrame:
    """The training loss of fixed segmentations (``diagnostics.loss_preference``: MaskCLIP's argmax,
    within the hypothesis, the truth) on each lab's CLIP: whether the loss prefers the truth to what
    the biased CLIP says. Lower = preferred."""
    tables = []
    for label, lab in labs.items():
        # the method's 100 and the toy CLIP's own scale, which configs/toy_known.yaml trains with
        table = lab.loss_preference(lab.model("maskclip"), score_scales=[100.0, logit_scale(lab.clip)])
        table.columns = [f"loss at {c}" for c in table.columns]  # "scale 100", the CLIP's own scale
        tables.append(table.reset_index().assign(CLIP=label))
    out = pd.concat(tables, ignore_index=True)
    return out[["CLIP"] + [c for c in out.columns if c != "CLIP"]]


#: ReCLIP++ trained again: row label -> (results subfolder, where the bias is planted (None: no
#: bias), multiple of the planted amplitudes)
DIAGNOSTICS = {"ReCLIP++ (CLIP without the planted bias)": ("unbiased", None, 0.0),
               "ReCLIP++ (bias planted in the logits only)": ("logits_only", "logits", 1.0),
               "ReCLIP++ (planted amplitudes × 0.75)": ("amplitude_0.75", "features", 0.75)}


def run_known_answer(seeds: Sequence[int] = SEEDS, models: Sequence[str] = tuple(MODELS),
                     device: str = "auto", diagnostics: bool = True) -> Dict[str, Any]:
    """The whole lab → its tables (also written under ``results/toy/known/``)."""
    t0 = time.perf_counter()
    biased = setup("toy", "known", device=device)
    unbiased = setup("toy", "known", device=device, **{"clip.planted_bias": "null"})
    unbiased.results = biased.results / "runs" / DIAGNOSTICS["ReCLIP++ (CLIP without the planted bias)"][0]
    unbiased.results.mkdir(parents=True, exist_ok=True)  # its own hypotheses: another CLIP fingerprint
    hw = (biased.cfg["test_size"] // biased.clip.visual.patch_size[0],) * 2
    planted = planted_map(biased.clip, hw).cpu()
    offset_norm = biased.clip.visual.planted_bias.feature_offset(hw).norm(dim=1)  # [h*w]
    rows = [maskclip_row(unbiased, "no planted bias"), maskclip_row(biased, "planted bias")]
    per_class, learned = [], {}
    for label in models:
        for seed in seeds:
            row, rec, bmap = trained_row(biased, label, seed, planted)
            rows.append(row)
            per_class.append(rec)
            if seed == seeds[0]:
                learned[f"{label} (seed {seed})"] = bmap
    labs = [biased, unbiased]
    sweep = amplitude_sweep(biased, unbiased)
    by_folder = {}
    for row_label, (folder, where, scale) in (DIAGNOSTICS.items() if diagnostics else ()):
        if where is None:  # ReCLIP++ on the clean CLIP: the unbiased lab itself
            lab = unbiased
        else:
            clip = plant_bias(load_config_clip(unbiased.cfg, unbiased.device), biased.cfg["clip"]["planted_bias"],
                              scale, where)
            lab = diagnostic_lab(biased, folder, clip)
            labs.append(lab)
        by_folder[folder] = lab
        own_map = planted if where is None else planted_map(clip, hw).cpu()  # this CLIP's own B*
        for seed in seeds:
            row, rec, bmap = trained_row(lab, "ReCLIP++", seed, own_map, row_label)
            rows.append(row if where is not None else dict(row, recovery=np.nan, **{"recovery scale": np.nan}))
            if where is not None:
                per_class.append(rec)
                if seed == seeds[0]:
                    learned[f"{row_label} (seed {seed})"] = bmap
    preference = loss_preference({"no planted bias": unbiased, "planted bias": biased,
                                  **({"bias in the logits only": by_folder["logits_only"]} if diagnostics else {})})
    table = pd.DataFrame(rows)
    summary = summarise(table)
    out = biased.results
    biased.save_table(table, "known_answer_runs", floatfmt=".3f", title="Known-answer lab: every run")
    biased.save_table(summary, "known_answer", floatfmt=".3f",
                      title="Known-answer lab: mean and sd over seeds (training-free rows: one run)")
    if per_class:
        biased.save_table(pd.concat(per_class, ignore_index=True), "known_answer_recovery_per_class",
                          floatfmt=".3f", title="Bias recovery per class (correlation with the planted map)")
    biased.save_table(preference, "known_answer_loss_preference", floatfmt=".3f",
                      title="Training loss of fixed segmentations (lower = preferred by the loss)")
    biased.save_table(sweep, "known_answer_amplitude_sweep", floatfmt=".3f",
                      title="MaskCLIP with the planted amplitudes scaled (training-free)")
    save_maps_figure(planted, learned, biased.class_names, out / "known_answer_maps.png")
    goals = goal_lines(summary)
    biased.save_json({"seeds": list(seeds), "models": list(models), "goals": goals,
                      "clip": {"biased": clip_fingerprint(biased.clip), "unbiased": clip_fingerprint(unbiased.clip)},
                      "planted_bias": biased.clip.planted_bias_spec, "grid": list(hw),
                      # the planted component's size beside the unit-norm dense features it is added to
                      "planted_offset_norm": {"mean": float(offset_norm.mean()), "min": float(offset_norm.min()),
                                              "max": float(offset_norm.max())},
                      "timings_s": [lab.timings for lab in labs], "wall_s": round(time.perf_counter() - t0, 1)},
                     "known_answer")
    return {"runs": table, "summary": summary, "sweep": sweep, "loss_preference": preference, "goals": goals,
            "planted": planted, "learned": learned}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The known-answer bias lab (toy profile, world 'known').")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-diagnostics", action="store_true", help="skip the diagnostic ReCLIP++ rows and the loss-preference table's logits-only CLIP")
    args = ap.parse_args(argv)
    result = run_known_answer(args.seeds, args.models, args.device, diagnostics=not args.no_diagnostics)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(result["summary"].round(3).to_string(index=False))
    print("\n".join(result["goals"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
