"""Diagnostics of the known-answer lab (``known_answer``): why a model does or does not remove
the planted bias (docs/toy-world.md, "The known-answer world").

- **Amplitude sweep** (training-free): MaskCLIP with the planted amplitudes times a scale, and how
  often true regions (pooled) and their patches are still read right; without and with a patch
  noise (``planted_bias``: zero-mean logit noise per patch, a function of its pixels), which makes
  the patches noisier than the regions they pool into, as on real CLIP.
- **Loss preference**: the training loss of fixed segmentations (MaskCLIP's argmax, the truth) on
  the clean, the biased and the logits-only CLIP: whether the loss points towards the truth; and
  per class, whether it prefers a class's true mask to an empty one (``known_answer_class_terms``).
- **Models on other CLIPs**: ReCLIP++ on the CLIP without the planted bias, ReCLIP++ and the
  rectification alone with the bias planted in the logits only (``planted_bias``,
  ``where="logits"``: MaskCLIP's logits as biased as in the lab, but the loss pools clean
  features), ReCLIP++ with the bias in the features of only one of its two readers (its loss, its
  decoder), ReCLIP++ at smaller amplitudes. The logits-only rows separate "the loss reads the
  bias" from "the optimisation fails"; the one-reader rows say which reader it is. The patch-noise
  rows train on the CLIP with the noise and the planted bias, where a bias flips many patches but
  few pooled regions (the method's premise). ReCLIP++ with its decoder starting as the rectified
  logits (``decoder_init="rectified"``) separates "a random start loses classes" from "the loss
  drops them".
- **First steps**: each class's IoU over ReCLIP++'s first epoch, on the clean and the biased CLIP
  (``known_answer_first_steps``): when a class is lost, and whether it comes back.

    python -m reclip_core.known_answer_diagnostics   # results/toy/known/known_answer_diagnostics.*
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from . import diagnostics
from .backbone import logit_scale
from .checkpoint import load_model_weights
from .known_answer import (SEEDS, maskclip_row, planted_and_grid, save_maps_figure, summarise, trained_row,
                           unbiased_lab)
from .lab import Lab, setup
from .planted_bias import load_spec, plant_bias, planted_map
from .run_inputs import load_config_clip


def diagnostic_lab(biased: Lab, folder: str, clip: torch.nn.Module) -> Lab:
    """A lab like ``biased`` on another CLIP, keeping its hypotheses and runs under
    ``<results>/runs/<folder>/`` (caches: not committed)."""
    lab = unbiased_lab(biased, folder)
    lab.__dict__["clip"] = clip  # the cached property, set to this CLIP
    return lab


#: multiples of the planted amplitudes the training-free sweep measures MaskCLIP at
SWEEP_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)

#: the patch noise of the noisy rows (planted_bias.py, ``patch_noise``: σ in cosine-logit units)
#: and the amplitude scale trained with it: with σ = 0.2 the planted amplitudes × 0.85 cost MaskCLIP
#: 15 points, the least the lab asks of the bias, while most pooled regions are still read right
#: (the training-free sweep on the val images, ``known_answer_amplitude_sweep.md``)
PATCH_NOISE = {"sigma": 0.2, "seed": 0}
NOISY_SCALE = 0.85
#: the scales the sweep measures MaskCLIP at with the patch noise
NOISY_SWEEP_SCALES = (0.0, 0.5, 0.75, NOISY_SCALE, 1.0)


def spec_with_noise(biased: Lab, noise: Mapping[str, Any] | None) -> Dict[str, Any]:
    """The lab's planted-bias spec, with ``noise`` as its patch noise (None: none)."""
    spec = load_spec(biased.cfg["clip"]["planted_bias"])
    return spec if noise is None else dict(spec, patch_noise=dict(noise))


def diagnostic_clip(biased: Lab, unbiased: Lab, noise: Mapping[str, Any] | None, scale: float,
                    where: str = "features") -> torch.nn.Module:
    """The lab's toy CLIP carrying its planted bias × ``scale`` at ``where``, with ``noise`` as its
    patch noise (None: none)."""
    return plant_bias(load_config_clip(unbiased.cfg, unbiased.device), spec_with_noise(biased, noise), scale, where)


def amplitude_sweep(biased: Lab, unbiased: Lab, scales: Sequence[float] = SWEEP_SCALES,
                    noisy_scales: Sequence[float] = NOISY_SWEEP_SCALES) -> pd.DataFrame:
    """MaskCLIP with the planted amplitudes times each scale, without and with the patch noise:
    mIoU, and how often true regions (pooled) and their patches are still read right — where the
    bias flips patches but not regions."""
    rows = []
    for noise, grid in ((None, scales), (PATCH_NOISE, noisy_scales)):
        for scale in grid:
            clip = diagnostic_clip(biased, unbiased, noise, scale)
            row = maskclip_row(diagnostic_lab(biased, "sweep", clip), f"amplitude × {scale:g}")
            rows.append({"patch noise σ": 0.0 if noise is None else noise["sigma"], "amplitude scale": scale,
                         **{k: v for k, v in row.items() if k != "model"}})
    return pd.DataFrame(rows)


def class_terms(labs: Mapping[str, Lab]) -> pd.DataFrame:
    """Per class and CLIP, the loss's term for the class on its true mask against an empty mask
    (``diagnostics.class_terms``, at the toy CLIP's own score scale the lab trains with): where the
    true mask costs more, the loss lowers by dropping the class."""
    tables = []
    for label, lab in labs.items():
        table = diagnostics.class_terms(lab.model("maskclip"), lab.val, lab.val_hypotheses(), lab.cfg["test_size"],
                                        logit_scale(lab.clip), lab.cfg["max_long_side"],
                                        max_images=lab.cfg["max_val_images"], resize=lab.cfg["test_resize"])
        tables.append(table.assign(CLIP=label))
    out = pd.concat(tables, ignore_index=True)
    return out[["CLIP"] + [c for c in out.columns if c != "CLIP"]]


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


#: models trained again on other CLIPs: row label -> (results subfolder, the model's label in
#: ``known_answer.MODELS`` or ``VARIANTS``, where the bias is planted (None: no bias), multiple of the
#: planted amplitudes, patch noise or None); the folder "lab" is the lab itself (its CLIP and runs)
DIAGNOSTICS = {
    "ReCLIP++ (CLIP without the planted bias)": ("unbiased", "ReCLIP++", None, 0.0, None),
    "ReCLIP++ (bias planted in the logits only)": ("logits_only", "ReCLIP++", "logits", 1.0, None),
    "rectification only (bias planted in the logits only)": ("logits_only", "rectification only", "logits", 1.0,
                                                             None),
    "ReCLIP++ (bias in the logits and the loss's features; decoder's clean)": ("loss_only", "ReCLIP++", "loss", 1.0,
                                                                                None),
    "ReCLIP++ (bias in the logits and the decoder's features; loss's clean)": ("decoder_only", "ReCLIP++", "decoder",
                                                                                1.0, None),
    "ReCLIP++ (decoder starting as the rectified logits)": ("lab", "ReCLIP++ (rectified start)", "features", 1.0,
                                                            None),
    "ReCLIP++ (planted amplitudes × 0.75)": ("amplitude_0.75", "ReCLIP++", "features", 0.75, None),
    "ReCLIP++ (patch noise, amplitudes × 0.85)": ("patch_noise", "ReCLIP++", "features", NOISY_SCALE, PATCH_NOISE),
    "rectification only (patch noise, amplitudes × 0.85)": ("patch_noise", "rectification only", "features",
                                                            NOISY_SCALE, PATCH_NOISE),
    "ReCLIP (patch noise, amplitudes × 0.85)": ("patch_noise", "ReCLIP", "features", NOISY_SCALE, PATCH_NOISE),
}


#: the training-free rows of the patch-noise world: its U and its B
NOISY_U, NOISY_B = "MaskCLIP (patch noise, no planted bias)", "MaskCLIP (patch noise, amplitudes × 0.85)"


def noisy_world_rows(sweep: pd.DataFrame, sigma: float, scale: float = NOISY_SCALE) -> list:
    """MaskCLIP on the CLIP with patch noise ``sigma``, without the planted bias (its U) and with the
    amplitudes × ``scale`` (its B), as rows of the diagnostics table: read from the sweep, which
    measured both."""
    rows = []
    for label, at in ((NOISY_U, 0.0), (NOISY_B, scale)):
        hit = sweep[(sweep["patch noise σ"] == sigma) & (sweep["amplitude scale"] == at)]
        if len(hit) != 1:
            raise ValueError(f"the sweep has {len(hit)} rows at patch noise σ {sigma:g} and amplitude × {at:g}; "
                             f"it must measure that CLIP once (NOISY_SWEEP_SCALES).")
        row = hit.iloc[0].drop(["patch noise σ", "amplitude scale"]).to_dict()
        rows.append({"model": label, **row})
    return rows


#: ReCLIP++'s first epoch as the first-steps table follows it: a checkpoint every this many steps,
#: each scored on the first this many validation images (300 of the lab's 1,000, which keeps the
#: 16 checkpoints of each run quick to score)
FIRST_STEPS_EVERY = 4
FIRST_STEPS_VAL_IMAGES = 300


def first_steps(labs: Mapping[str, Lab], seeds: Sequence[int] = SEEDS, every: int = FIRST_STEPS_EVERY,
                val_images: int = FIRST_STEPS_VAL_IMAGES) -> pd.DataFrame:
    """Each class's IoU over ReCLIP++'s first epoch on each lab's CLIP: the lab's run stopped after
    one epoch (the same steps as the first epoch of the full run: same seed, views and learning
    rate), with a checkpoint every ``every`` steps, each scored on ``val_images`` validation images."""
    rows = []
    for label, lab in labs.items():
        for seed in seeds:
            lab.train("reclip++_first_steps", kind="reclip++", seed=seed, epoch=1, checkpoint_every=every,
                      keep_checkpoints=10_000)
            checkpoints = lab.run_dir("reclip++_first_steps", seed) / "checkpoints"
            for weights in sorted(checkpoints.glob("step*.safetensors")):
                model = lab.model("reclip++")
                load_model_weights(model, weights)
                report = lab.evaluate(model.eval(), max_images=val_images, name=f"first steps {weights.stem}")
                scores = report.metrics["reclip++"]["no_pd"]
                rows.append({"CLIP": label, "seed": seed, "step": int(weights.stem.removeprefix("step")),
                             "mIoU": float(scores.miou()),
                             **dict(zip(lab.class_names, (100 * scores.iou()).tolist()))})
    return pd.DataFrame(rows)


def first_steps_figure(table: pd.DataFrame, seed: int) -> plt.Figure:
    """One panel per CLIP: each class's IoU against the step, at ``seed``."""
    clips = list(dict.fromkeys(table["CLIP"]))
    classes = [c for c in table.columns if c not in ("CLIP", "seed", "step", "mIoU")]
    fig, axes = plt.subplots(1, len(clips), figsize=(4.2 * len(clips), 3.2), sharey=True, squeeze=False)
    for ax, clip in zip(axes[0], clips):
        part = table[(table["CLIP"] == clip) & (table["seed"] == seed)]
        for c in classes:
            ax.plot(part["step"], part[c], label=c, linewidth=1.2)
        ax.set_title(f"{clip} (seed {seed})", fontsize=9)
        ax.set_xlabel("training step (first epoch)")
    axes[0, 0].set_ylabel("IoU (%)")
    axes[0, -1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("ReCLIP++'s first epoch, class by class", fontsize=9)
    return fig


def share_of_noisy_gap(summary: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with "% of U − B" for the patch-noise rows: the share of that world's own gap
    between its U and B (``NOISY_U``, ``NOISY_B``) each row recovers."""
    by = summary.set_index("model")["mIoU"]
    u, b = by.get(NOISY_U), by.get(NOISY_B)
    share = [100 * (v - b) / (u - b) if u is not None and "patch noise" in m else np.nan
             for m, v in zip(summary["model"], summary["mIoU"])]
    return summary.assign(**{"% of U − B": share})


def run_diagnostics(seeds: Sequence[int] = SEEDS, device: str = "auto") -> Dict[str, Any]:
    """The diagnostics → their tables, also written under ``results/toy/known/``
    (``known_answer_diagnostics{,_runs,_recovery_per_class}``, ``known_answer_amplitude_sweep``,
    ``known_answer_loss_preference``, ``known_answer_class_terms``, the diagnostic maps figure, JSON)."""
    t0 = time.perf_counter()
    biased = setup("toy", "known", device=device)
    unbiased = unbiased_lab(biased)
    planted, hw = planted_and_grid(biased)
    sweep = amplitude_sweep(biased, unbiased)  # first: the noisy world's U and B are two of its rows
    labs: Dict[str, Lab] = {"unbiased": unbiased, "lab": biased}
    rows, per_class, learned = [], [], {}
    for row_label, (folder, model_label, where, scale, noise) in DIAGNOSTICS.items():
        if folder not in labs:
            labs[folder] = diagnostic_lab(biased, folder, diagnostic_clip(biased, unbiased, noise, scale,
                                                                          where or "features"))
            if noise is not None:  # that world's own U and B, before its trained rows
                rows += noisy_world_rows(sweep, noise["sigma"], scale)
        lab = labs[folder]
        own_map = planted if where is None else planted_map(lab.clip, hw).cpu()  # this CLIP's own B*
        for seed in seeds:
            row, rec, bmap = trained_row(lab, model_label, seed, own_map, row_label)
            if where is None:  # nothing planted: nothing to recover
                row = dict(row, recovery=np.nan, **{"recovery scale": np.nan})
                rec = rec.assign(recovery=np.nan, scale=np.nan, planted_range=np.nan)
            elif seed == seeds[0]:
                learned[f"{row_label} (seed {seed})"] = bmap
            per_class.append(rec)
            rows.append(row)
    preference = loss_preference({"no planted bias": unbiased, "planted bias": biased,
                                  "bias in the logits only": labs["logits_only"],
                                  "patch noise and planted bias × 0.85": labs["patch_noise"]})
    terms = class_terms({"no planted bias": unbiased, "planted bias": biased,
                         "patch noise and planted bias × 0.85": labs["patch_noise"]})
    table = pd.DataFrame(rows).astype({"seed": "Int64"})  # training-free rows have no seed
    summary = share_of_noisy_gap(summarise(table))
    biased.save_table(table, "known_answer_diagnostics_runs", floatfmt=".3f",
                      title="Known-answer lab, diagnostic models: every run")
    biased.save_table(summary, "known_answer_diagnostics", floatfmt=".3f",
                      title="Known-answer lab, diagnostic models: mean and sd over seeds")
    biased.save_table(pd.concat(per_class, ignore_index=True), "known_answer_diagnostics_recovery_per_class",
                      floatfmt=".3f", title="Diagnostic models: bias recovery and IoU per class")
    biased.save_table(preference, "known_answer_loss_preference", floatfmt=".3f",
                      title="Training loss of fixed segmentations (lower = preferred by the loss)")
    biased.save_table(terms, "known_answer_class_terms", floatfmt=".3f",
                      title="The loss per class: its term on the true mask against an empty mask, and the "
                            "image's loss change when the class's tokens are given away")
    biased.save_table(sweep, "known_answer_amplitude_sweep", floatfmt=".3f",
                      title="MaskCLIP with the planted amplitudes scaled (training-free)")
    steps = first_steps({"no planted bias": unbiased, "planted bias": biased}, seeds)
    biased.save_table(steps, "known_answer_first_steps", floatfmt=".1f",
                      title=f"ReCLIP++'s first epoch: mIoU and each class's IoU (%) at every {FIRST_STEPS_EVERY}th "
                            f"step, on the first {FIRST_STEPS_VAL_IMAGES} validation images")
    biased.save_figure(first_steps_figure(steps, seeds[0]), "known_answer_first_steps")
    save_maps_figure(planted, learned, biased.class_names, biased.results / "known_answer_diagnostic_maps.png")
    biased.save_json({"seeds": list(seeds), "diagnostics": {k: list(v) for k, v in DIAGNOSTICS.items()},
                      "sweep_scales": list(SWEEP_SCALES), "noisy_sweep_scales": list(NOISY_SWEEP_SCALES),
                      "patch_noise": PATCH_NOISE, "planted_bias": biased.clip.planted_bias_spec,
                      "first_steps": {"every": FIRST_STEPS_EVERY, "val_images": FIRST_STEPS_VAL_IMAGES},
                      "timings_s": [lab.timings for lab in labs.values()],
                      "wall_s": round(time.perf_counter() - t0, 1)}, "known_answer_diagnostics")
    return {"runs": table, "summary": summary, "sweep": sweep, "loss_preference": preference, "learned": learned,
            "first_steps": steps}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Diagnostics of the known-answer bias lab (toy profile, world 'known').")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    result = run_diagnostics(args.seeds, args.device)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(result["summary"].round(3).to_string(index=False))
    return 0


__all__ = ("DIAGNOSTICS", "FIRST_STEPS_EVERY", "FIRST_STEPS_VAL_IMAGES", "NOISY_B", "NOISY_SCALE", "NOISY_U",
           "PATCH_NOISE", "SWEEP_SCALES", "amplitude_sweep", "class_terms", "diagnostic_clip", "diagnostic_lab",
           "first_steps", "first_steps_figure", "loss_preference", "noisy_world_rows", "run_diagnostics",
           "share_of_noisy_gap")


if __name__ == "__main__":
    sys.exit(main())
