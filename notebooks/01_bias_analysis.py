# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Bias analysis — what frozen CLIP gets wrong
#
# MaskCLIP reads dense predictions out of a frozen CLIP: each patch's feature (the last block's
# value path, method.md §1) is compared with the text features of the class names, and the
# best class wins. No training, no labels. ReCLIP++ starts from the observation that these
# predictions are **biased** in two ways:
#
# * **class-preference bias** — some classes take far more pixels than they really cover, others
#   far fewer;
# * **space-preference bias** — the preferred class depends on *where* in the image a patch is.
#
# This notebook measures both on the validation split. The toy profile's default world (`known`)
# carries a bias **planted** in its CLIP's dense path with known amplitudes (docs/toy-world.md), so
# the measurements can be set against a known answer; in its second world (`toyworld`) the CLIP
# learned its biases from biased pretraining data (class frequencies, and look-alike class pairs
# shown only in one image region). Ground-truth masks are read here only by evaluation code.

# %% tags=["parameters"]
profile = "toy"   # "toy" (CPU, minutes, synthetic world) or "paper" (OpenAI ViT-B/16, real benchmark, GPU)
dataset = None    # None: the profile's default ("known" / "voc"); "toyworld": the toy world of learned biases
device = "auto"   # "auto", "cpu" or "cuda"
seed = 0
num_threads = None  # CPU threads (None: the config's); results depend on it, docs/reproducibility.md
n_val = None      # evaluate only the first n validation images (None: the config's value)
grid = 4          # the space-bias grid has grid × grid cells

# %%
import reclip_core as rc
from reclip_core import plots

lab = rc.lab.setup(profile, dataset, device, seed, max_val_images=n_val, num_threads=num_threads)
print(f"profile={lab.profile} dataset={lab.dataset} classes={len(lab.class_names)}")

# %% [markdown]
# ## MaskCLIP on the validation split
# Whole-image inference at the dataset's test size; mIoU with the mmseg definition (mean over
# classes present) and the release's (absent classes count 0); PD is the presence filter.

# %%
# NBVAL_CHECK_OUTPUT
maskclip = lab.model("maskclip")
report = lab.evaluate(maskclip, bias_grid=grid, examples=4)
print(lab.save_table(report.summary(), "01_maskclip_miou", title="MaskCLIP").to_string(index=False))

# %% [markdown]
# ## Class-preference bias
# Predicted pixel share of each class against its true share. A ratio far from 1 is a class
# CLIP prefers (>1) or avoids (<1); the total variation distance (TVD) sums it up (0 = none).

# %%
# NBVAL_CHECK_OUTPUT
class_bias = report.bias["maskclip"].class_bias(lab.class_names)
print(f"class-bias TVD = {class_bias.tvd:.3f}")
print(lab.save_table(class_bias.table, "01_class_bias", floatfmt=".3f").to_string(index=False))

# %%
# NBVAL_IGNORE_OUTPUT
lab.save_figure(plots.plot_class_shares(class_bias.table, "MaskCLIP: predicted vs true pixel share"), "01_class_shares")

# %%
# NBVAL_IGNORE_OUTPUT
lab.save_figure(plots.plot_confusion(report.metrics["maskclip"]["no_pd"].confusion, lab.class_names), "01_confusion")

# %% [markdown]
# ## Space-preference bias
# For every cell of a grid over the image, the predicted class distribution is compared with the
# true one (TVD per cell, then the pixel-weighted mean). The maps show, per class, where MaskCLIP
# predicts it more (red) or less (blue) than it occurs.

# %%
space_bias = report.bias["maskclip"].space_bias()
print(f"space-bias score (pixel-weighted TVD over {grid}x{grid} cells) = {space_bias.score:.3f}")

# %%
# NBVAL_IGNORE_OUTPUT
lab.save_figure(plots.plot_space_bias(space_bias.diff, lab.class_names), "01_space_bias")

# %%
# NBVAL_IGNORE_OUTPUT
ex = report.examples
lab.save_figure(plots.plot_segmentations(ex["images"], {"truth": ex["labels"], "MaskCLIP": ex["maskclip"]},
                                         len(lab.class_names), lab.class_names), "01_examples")

# %% [markdown]
# ## The known-answer world: MaskCLIP with and without the planted bias
# `U` is MaskCLIP on the same toy CLIP with the planted bias removed, `B` with it (the run above).
# `regions read %` classifies each val object by its dense features averaged over its own pixels,
# `patches read %` its patches one by one: the planted bias is sized to flip many patches, and
# ReCLIP++'s loss scores pooled features (notebook 04). The lab over three seeds is
# `results/toy/known/known_answer.md` (`make reproduce` runs it after the notebooks).

# %%
# NBVAL_CHECK_OUTPUT
if lab.dataset == "known":
    import pandas as pd

    rows = [rc.known_answer.maskclip_row(rc.known_answer.unbiased_lab(lab), "no planted bias"),
            rc.known_answer.maskclip_row(lab, "planted bias")]
    print(lab.save_table(pd.DataFrame(rows), "01_planted_vs_clean", floatfmt=".2f",
                         title="MaskCLIP without (U) and with (B) the planted bias").to_string(index=False))

# %% [markdown]
# ## The toy world of learned biases: biased vs uniform pretraining
# (Runs with `dataset="toyworld"`.) Two toy CLIPs, one pretrained on the **biased** preset and one
# on a **uniform** one, are evaluated with MaskCLIP on the same validation images, beside a second
# pretraining seed of the biased recipe (how much of a difference is only the seed?).
# `follow_position` is, for a look-alike pair, the share of the pair's pixels labelled with the
# class whose pretraining region contains the pixel (0.5: position plays no role); the readout
# columns are as above. This writes the lab report `results/toy/bias_lab.md`.

# %%
if lab.dataset == "toyworld":
    bias_lab = rc.toy_lab.run_bias_lab(out_dir=rc.lab.RESULTS_DIR / "toy", n_val=lab.cfg["max_val_images"])
    import pandas as pd

    rows = [{"pretraining": name, "MaskCLIP mIoU": r["miou"], "chance mIoU": r["chance_miou"],
             "oracle mIoU": r["oracle_miou"], "class TVD": r["class_bias_tvd"], "space TVD": r["space_bias_tvd"],
             "objects read pooled %": 100 * r["region_readout"], "patches read %": 100 * r["patch_readout"],
             **{f"follow_position {p['pair']}": p["follow_position"] for p in r["pairs"]}}
            for name, r in bias_lab.items()]
    print(lab.save_table(pd.DataFrame(rows), "01_biased_vs_uniform", floatfmt=".2f").to_string(index=False))
