"""Diagnostics of the known-answer lab (``known_answer``): why a model does or does not remove
the planted bias (docs/toy-world.md, "The known-answer world").

- **Amplitude sweep** (training-free): MaskCLIP with the planted amplitudes times a scale, and how
  often true regions (pooled) and their patches are still read right.
- **Loss preference**: the training loss of fixed segmentations (MaskCLIP's argmax, the truth) on
  the clean, the biased and the logits-only CLIP: whether the loss points towards the truth.
- **Models on other CLIPs**: ReCLIP++ on the CLIP without the planted bias, ReCLIP++ and the
  rectification alone with the bias planted in the logits only (``planted_bias``,
  ``where="logits"``: MaskCLIP's logits as biased as in the lab, but the loss pools clean
  features), ReCLIP++ at smaller amplitudes. The logits-only rows separate "the loss reads the
  bias" from "the optimisation fails".

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

from .backbone import logit_scale
from .known_answer import (SEEDS, maskclip_row, planted_and_grid, save_maps_figure, summarise, trained_row,
                           unbiased_lab)
from .lab import Lab, setup
from .planted_bias import plant_bias, planted_map
from .run_inputs import load_config_clip


def diagnostic_lab(biased: Lab, folder: str, clip: torch.nn.Module) -> Lab:
    """A lab like ``biased`` on another CLIP, keeping its hypotheses and runs under
    ``<results>/runs/<folder>/`` (caches: not committed)."""
    lab = unbiased_lab(biased, folder)
    lab.__dict__["clip"] = clip  # the cached property, set to this CLIP
    return lab


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


#: models trained again on other CLIPs: row label -> (results subfolder, the lab's model label,
#: where the bias is planted (None: no bias), multiple of the planted amplitudes)
DIAGNOSTICS = {
    "ReCLIP++ (CLIP without the planted bias)": ("unbiased", "ReCLIP++", None, 0.0),
    "ReCLIP++ (bias planted in the logits only)": ("logits_only", "ReCLIP++", "logits", 1.0),
    "rectification only (bias planted in the logits only)": ("logits_only", "rectification only", "logits", 1.0),
    "ReCLIP++ (planted amplitudes × 0.75)": ("amplitude_0.75", "ReCLIP++", "features", 0.75),
}


def run_diagnostics(seeds: Sequence[int] = SEEDS, device: str = "auto") -> Dict[str, Any]:
    """The diagnostics → their tables, also written under ``results/toy/known/``
    (``known_answer_diagnostics{,_runs,_recovery_per_class}``, ``known_answer_amplitude_sweep``,
    ``known_answer_loss_preference``, the diagnostic maps figure, JSON)."""
    t0 = time.perf_counter()
    biased = setup("toy", "known", device=device)
    unbiased = unbiased_lab(biased)
    planted, hw = planted_and_grid(biased)
    labs: Dict[str, Lab] = {"unbiased": unbiased}
    rows, per_class, learned = [], [], {}
    for row_label, (folder, model_label, where, scale) in DIAGNOSTICS.items():
        if folder not in labs:
            clip = plant_bias(load_config_clip(unbiased.cfg, unbiased.device), biased.cfg["clip"]["planted_bias"],
                              scale, where)
            labs[folder] = diagnostic_lab(biased, folder, clip)
        lab = labs[folder]
        own_map = planted if where is None else planted_map(lab.clip, hw).cpu()  # this CLIP's own B*
        for seed in seeds:
            row, rec, bmap = trained_row(lab, model_label, seed, own_map, row_label)
            if where is None:  # nothing planted: nothing to recover
                row = dict(row, recovery=np.nan, **{"recovery scale": np.nan})
            else:
                per_class.append(rec)
                if seed == seeds[0]:
                    learned[f"{row_label} (seed {seed})"] = bmap
            rows.append(row)
    sweep = amplitude_sweep(biased, unbiased)
    preference = loss_preference({"no planted bias": unbiased, "planted bias": biased,
                                  "bias in the logits only": labs["logits_only"]})
    table = pd.DataFrame(rows)
    summary = summarise(table)
    biased.save_table(table, "known_answer_diagnostics_runs", floatfmt=".3f",
                      title="Known-answer lab, diagnostic models: every run")
    biased.save_table(summary, "known_answer_diagnostics", floatfmt=".3f",
                      title="Known-answer lab, diagnostic models: mean and sd over seeds")
    biased.save_table(pd.concat(per_class, ignore_index=True), "known_answer_diagnostics_recovery_per_class",
                      floatfmt=".3f", title="Diagnostic models: bias recovery per class")
    biased.save_table(preference, "known_answer_loss_preference", floatfmt=".3f",
                      title="Training loss of fixed segmentations (lower = preferred by the loss)")
    biased.save_table(sweep, "known_answer_amplitude_sweep", floatfmt=".3f",
                      title="MaskCLIP with the planted amplitudes scaled (training-free)")
    save_maps_figure(planted, learned, biased.class_names, biased.results / "known_answer_diagnostic_maps.png")
    biased.save_json({"seeds": list(seeds), "diagnostics": {k: list(v) for k, v in DIAGNOSTICS.items()},
                      "sweep_scales": list(SWEEP_SCALES), "planted_bias": biased.clip.planted_bias_spec,
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


__all__ = ("DIAGNOSTICS", "SWEEP_SCALES", "amplitude_sweep", "diagnostic_lab", "loss_preference", "run_diagnostics")


if __name__ == "__main__":
    sys.exit(main())
