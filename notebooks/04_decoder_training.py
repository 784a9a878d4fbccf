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
# # 04 · Full ReCLIP++ — the mask decoder and the Gumbel masked contrastive loss
#
# The rectified logits are refined by a small **mask decoder**: the dense features and the
# rectified logits are concatenated, a 5×5 convolution and a BatchNorm give the segmentation
# logits (method.md §3). Training is unsupervised:
#
# 1. **hypotheses** — for each training image, the classes that win at least one sliding window
#    of CLIP's image embedding;
# 2. **Gumbel masks** — a hard Gumbel-Softmax over the decoder's logits gives one class per pixel;
# 3. **masked contrastive loss** — for every hypothesis class *k*, the features under mask *k*
#    are pooled and must be closer to class *k*'s text than to any other class.
#
# Everything trainable (Reference prompt, positional projection, decoder) learns together.
# The checkpoint of the last epoch is kept; no checkpoint is chosen on validation scores.

# %% tags=["parameters"]
profile = "toy"
dataset = None
device = "auto"
seed = 0
num_threads = None  # CPU threads (None: the config's); results depend on it, docs/reproducibility.md
epochs = None     # None: the config's EPOCH
grid = 4

# %%
import torch

import reclip_core as rc
from reclip_core import plots

lab = rc.lab.setup(profile, dataset, device, seed, epoch=epochs, num_threads=num_threads)

# %% [markdown]
# ## Hypotheses
# How good are the image-level hypotheses? Precision/recall against the ground-truth classes is
# measured on the **validation** split (evaluation code; training never sees a label).

# %%
# NBVAL_CHECK_OUTPUT
hypotheses = lab.hypotheses()
quality = lab.hypothesis_quality()
print(f"train: {len(hypotheses)} images; val hypotheses: precision {100 * quality['precision']:.1f}%  "
      f"recall {100 * quality['recall']:.1f}%  exact {100 * quality['exact_match']:.1f}%")

# %% [markdown]
# ## Training

# %%
model = lab.train("reclip++")
history = lab.loss_history("reclip++")
print(f"{len(history)} steps; loss first epoch {history[history.epoch == history.epoch.min()].loss.mean():.3f} "
      f"→ last epoch {history[history.epoch == history.epoch.max()].loss.mean():.3f}")

# %%
# NBVAL_IGNORE_OUTPUT
lab.save_figure(plots.plot_loss_curve(history, title="ReCLIP++ training loss (Gumbel masked contrastive)"), "04_loss")

# %% [markdown]
# ## Gumbel masks and decoder outputs
# For a few validation images: CLIP's argmax (MaskCLIP), the rectified logits, the decoder's
# output, and one draw of the hard Gumbel masks the loss pools features with.

# %%
report = lab.evaluate(model, bias_grid=grid, examples=4)
print(lab.save_table(report.summary(), "04_reclippp_miou", title="ReCLIP++ (rectification + decoder)").to_string(index=False))

# %% [markdown]
# Class by class (IoU %, PD off): where the decoder gains and loses against MaskCLIP. A class at 0
# is one the decoder never predicts: through the hard Gumbel-Softmax a class that stops winning
# pixels early gets almost no gradient back, and a class MaskCLIP hardly reads (and the hypotheses
# hardly name) gives the loss nothing to start from (docs/training.md).

# %%
print(lab.save_table(report.per_class_iou(), "04_per_class_iou", title="IoU per class (%)").to_string(index=False))

# %% [markdown]
# ## What the loss prefers
# The loss scores each hypothesis class's pooled features as `s · pooled_k · textᵀ`. The method's
# `s = 100` is OpenAI CLIP's own logit scale; the toy config uses the toy CLIP's (`score_scale:
# clip`, about 21), because its cosines spread wider. The table gives the loss (lower = preferred)
# of fixed segmentations of the validation images, with their label-free hypotheses: MaskCLIP's
# argmax, that argmax restricted to the hypothesis, the truth (labels read here only, evaluation
# code), and this model's output. The decoder can only move towards what the loss prefers.

# %%
preference = lab.loss_preference(model).reset_index()
print(lab.save_table(preference, "04_loss_preference", floatfmt=".3f",
                     title="Loss of fixed segmentations (val, lower = preferred by the loss)").to_string(index=False))

# %% [markdown]
# ## The known-answer world: did the bias map learn the planted bias?
# On the default toy world: the recovery of the planted `B*` by this model's bias logit map, as in
# notebook 03 for the rectification alone.

# %%
if lab.dataset == "known":
    planted, known_hw = rc.known_answer.planted_and_grid(lab)
    learned = rc.known_answer.learned_map(model, known_hw)
    print(lab.save_table(rc.known_answer.recovery_table(learned, planted, lab.class_names), "04_bias_recovery",
                         floatfmt=".3f", title="Bias recovery of ReCLIP++'s bias map").to_string(index=False))

# %%
# NBVAL_IGNORE_OUTPUT
ex = report.examples
gumbel = lab.gumbel_draw(model, ex)
lab.save_figure(plots.plot_segmentations(ex["images"], {"truth": ex["labels"], "MaskCLIP": ex["maskclip"],
                                                        "rectified": ex["rectified"], "Gumbel draw": gumbel,
                                                        "ReCLIP++": ex["reclip++"]},
                                         len(lab.class_names), lab.class_names), "04_examples")
print("checkpoint:", (lab.run_dir("reclip++") / "checkpoints").relative_to(rc.lab.RESULTS_DIR.parent))  # no machine path
