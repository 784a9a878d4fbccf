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
  few pooled regions (the method's premise).

    python -m reclip_core.known_answer_diagnostics   # results/toy/known/known_answer_diagnostics.*
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from . import diagnostics
from .backbone import logit_scale
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


def amplitude_sweep(biased: Lab, unbiased: Lab, scales: Sequence[float] = SWEEP_SCALES,
                    noisy_scales: Sequence[float] = NOISY_SWEEP_SCALES) -> pd.DataFrame:
    """MaskCLIP with the planted amplitudes times each scale, without and with the patch noise:
    mIoU, and how often true regions (pooled) and their patches are still read right — where the
    bias flips patches but not regions."""
    rows = []
    for noise, grid in ((None, scales), (PATCH_NOISE, noisy_scales)):
        for scale in grid:
            clip = plant_bias(load_config_clip(unbiased.cfg, unbiased.device), spec_with_noise(biased, noise),
                              scale=scale)
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


#: models trained again on other CLIPs: row label -> (results subfolder, the lab's model label,
#: where the bias is planted (None: no bias), multiple of the planted amplitudes, patch noise or None)
DIAGNOSTICS = {
    "ReCLIP++ (CLIP without the planted bias)": ("unbiased", "ReCLIP++", None, 0.0, None),
    "ReCLIP++ (bias planted in the logits only)": ("logits_only", "ReCLIP++", "logits", 1.0, None),
    "rectification only (bias planted in the logits only)": ("logits_only", "rectification only", "logits", 1.0,
                                                             None),
    "ReCLIP++ (bias in the logits and the loss's features; decoder's clean)": ("loss_only", "ReCLIP++", "loss", 1.0,
                                                                                None),
    "ReCLIP++ (bias in the logits and the decoder's features; loss's clean)": ("decoder_only", "ReCLIP++", "decoder",
                                                                                1.0, None),
    "ReCLIP++ (planted amplitudes × 0.75)": ("amplitude_0.75", "ReCLIP++", "features", 0.75, None),
    "ReCLIP++ (patch noise, amplitudes × 0.85)": ("patch_noise", "ReCLIP++", "features", NOISY_SCALE, PATCH_NOISE),
    "rectification only (patch noise, amplitudes × 0.85)": ("patch_noise", "rectification only", "features",
                                                            NOISY_SCALE, PATCH_NOISE),
    "ReCLIP (patch noise, amplitudes × 0.85)": ("patch_noise", "ReCLIP", "features", NOISY_SCALE, PATCH_NOISE),
}


#: the training-free rows of the patch-noise world: its U and its B
NOISY_U, NOISY_B = "MaskCLIP (patch noise, no planted bias)", "MaskCLIP (patch noise, amplitudes × 0.85)"


def noisy_world_rows(biased: Lab, unbiased: Lab, noisy: Lab, noise: Mapping[str, Any]) -> list:
    """MaskCLIP on the CLIP with the patch noise, without the planted bias (its U) and with it (its B)."""
    clean = plant_bias(load_config_clip(unbiased.cfg, unbiased.device), spec_with_noise(biased, noise), 0.0)
    return [maskclip_row(diagnostic_lab(biased, "patch_noise_unbiased", clean), "patch noise, no planted bias"),
            maskclip_row(noisy, "patch noise, amplitudes × 0.85")]


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
    labs: Dict[str, Lab] = {"unbiased": unbiased}
    rows, per_class, learned = [], [], {}
    for row_label, (folder, model_label, where, scale, noise) in DIAGNOSTICS.items():
        if folder not in labs:
            clip = plant_bias(load_config_clip(unbiased.cfg, unbiased.device), spec_with_noise(biased, noise),
                              scale, where or "features")
            labs[folder] = diagnostic_lab(biased, folder, clip)
            if noise is not None:  # that world's own U and B, before its trained rows
                rows += noisy_world_rows(biased, unbiased, labs[folder], noise)
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
    sweep = amplitude_sweep(biased, unbiased)
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
    save_maps_figure(planted, learned, biased.class_names, biased.results / "known_answer_diagnostic_maps.png")
    biased.save_json({"seeds": list(seeds), "diagnostics": {k: list(v) for k, v in DIAGNOSTICS.items()},
                      "sweep_scales": list(SWEEP_SCALES), "noisy_sweep_scales": list(NOISY_SWEEP_SCALES),
                      "patch_noise": PATCH_NOISE, "planted_bias": biased.clip.planted_bias_spec,
                      "timings_s": [lab.timings for lab in (biased, *labs.values())],
                      "wall_s": round(time.perf_counter() - t0, 1)}, "known_answer_diagnostics")
    return {"runs": table, "summary": summary, "sweep": sweep, "loss_preference": preference, "learned": learned}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Diagnostics of the known-answer bias lab (toy profile, world 'known').")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    result = run_diagnostics(args.seeds, args.device)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(result["summary"].round(3).to_string(index=False))
    return 0


__all__ = ("DIAGNOSTICS", "NOISY_B", "NOISY_SCALE", "NOISY_U", "PATCH_NOISE", "SWEEP_SCALES", "amplitude_sweep",
           "class_terms", "diagnostic_lab", "loss_preference", "noisy_world_rows", "run_diagnostics",
           "share_of_noisy_gap")


if __name__ == "__main__":
    sys.exit(main())
