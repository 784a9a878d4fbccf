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
# # 02 · The Reference prompt and the positional encoding
#
# ReCLIP++ models the two biases with two small learnable pieces on top of the frozen CLIP
# (method.md §2):
#
# * the **Reference prompt** — `context_length − 4` learnable token embeddings (73 for CLIP),
#   put in front of each class name and run through CLIP's *frozen* text encoder. Its output
#   `ref` [C, D] is what CLIP "prefers" for each class regardless of the image: the
#   class-preference bias. All rows share one global norm.
# * the **positional feature** — a 1×1 convolution of CLIP's (resized) positional embedding:
#   `pe_feat` [D, h, w], what each *position* contributes regardless of the image: the
#   space-preference bias.
#
# Their product `bias[c, y, x] = pe_feat[:, y, x] · ref[c]` is the **bias logit map**. It depends
# only on class and position, never on the image, so at evaluation it is computed once per input
# size. This notebook shows these pieces as they are *before* training; notebook 03 trains them.

# %% tags=["parameters"]
profile = "toy"
dataset = None
device = "auto"
seed = 0
num_threads = None  # CPU threads (None: the config's); results depend on it, docs/reproducibility.md

# %%
import torch
import torch.nn.functional as F

import reclip_core as rc
from reclip_core import plots

lab = rc.lab.setup(profile, dataset, device, seed, num_threads=num_threads)
model = lab.model("reclip++").eval()

# %% [markdown]
# ## What is trainable
# Everything of CLIP is frozen; only these parameters learn (their counts equal the release's
# for the five benchmarks — `tests/test_model.py`).

# %%
# NBVAL_CHECK_OUTPUT
import pandas as pd

parts = pd.DataFrame([{"part": name.split(".")[0], "tensor": name, "shape": tuple(p.shape), "parameters": p.numel()}
                      for name, p in model.named_parameters() if p.requires_grad])
print(parts.to_string(index=False))
print("trainable parameters:", model.num_trainable_parameters())

# %% [markdown]
# ## The Reference prompt at initialisation
# Every learnable token starts as CLIP's embedding of token id 0. Each row of the heatmap is the
# Reference feature of one class compared (cosine) with every class text feature.

# %%
# NBVAL_CHECK_OUTPUT
with torch.no_grad():
    ref = model.reference_features()
    sim = F.normalize(ref, dim=-1) @ lab.text.T
print(f"ref: {tuple(ref.shape)}, global norm = {ref.norm():.3f}")
print("diagonal cosine (Reference of class c vs text of class c), mean:", round(sim.diag().mean().item(), 3))

# %%
# NBVAL_IGNORE_OUTPUT
lab.save_figure(plots.plot_similarity(sim.cpu().numpy(), lab.class_names, lab.class_names,
                                      "Reference (rows) vs class text (columns), at initialisation"), "02_reference_vs_text")

# %% [markdown]
# ## CLIP's positional embedding
# The patch rows of the positional embedding, resized (bicubic) to the token grid of the test
# size. Its first three principal components as RGB show that it encodes a smooth 2-D layout;
# the second figure shows the cosine similarity of every position with four reference positions.

# %%
patch = lab.clip.visual.patch_size[0]
hw = ((lab.cfg["test_size"] + patch - 1) // patch,) * 2
pe = rc.resized_positional_embedding(lab.clip, hw)
print(f"positional embedding resized to {hw}: {tuple(pe.shape)}")

# %%
# NBVAL_IGNORE_OUTPUT
import matplotlib.pyplot as plt

flat = F.normalize(pe.flatten(1).T, dim=-1)
anchors = {"top-left": 0, "top-right": hw[1] - 1, "centre": (hw[0] // 2) * hw[1] + hw[1] // 2, "bottom-left": (hw[0] - 1) * hw[1]}
fig, axes = plt.subplots(1, 5, figsize=(13, 2.8))
axes[0].imshow(plots.pca_image(pe)); axes[0].set_title("PCA of PE (RGB)")
for ax, (name, idx) in zip(axes[1:], anchors.items()):
    ax.imshow((flat @ flat[idx]).reshape(hw).detach().cpu(), cmap="viridis"); ax.set_title(f"cos to {name}")
for ax in axes:
    ax.axis("off")
lab.save_figure(fig, "02_positional_embedding")

# %% [markdown]
# ## The bias logit map at initialisation
# One map per class: `pe_feat · ref[c]`. Before training the 1×1 projection is random, so the
# maps have structure (from the positional embedding) but no meaning yet.

# %%
with torch.no_grad():
    bias = model.bias_map(hw)
print(f"bias map {tuple(bias.shape)}; identical for every image of this size")

# %%
# NBVAL_IGNORE_OUTPUT
lab.save_figure(plots.plot_maps(bias.cpu(), lab.class_names, "bias logit map per class (untrained)"), "02_bias_map_init")

# %% [markdown]
# ## The known-answer world: the map the bias model should learn
# The default toy world's CLIP carries a bias **planted** with known amplitudes (docs/toy-world.md,
# "The known-answer world"): some classes favoured everywhere, some in one region of the image. Its
# planted map `B*` (first row) is what a bias logit map trained on it should become; below it, the
# map above (before training). Both are centred over classes at each position (argmax ignores a
# per-position constant); *bias recovery* is their correlation (1: the planted map up to scale).

# %%
# NBVAL_IGNORE_OUTPUT
if lab.dataset == "known":
    planted, known_hw = rc.known_answer.planted_and_grid(lab)
    at_init = rc.known_answer.learned_map(model, known_hw)
    print(f"bias recovery at initialisation: {rc.bias_recovery.bias_recovery(at_init, planted).overall:.2f}")
    lab.save_figure(rc.known_answer.maps_figure(planted, {"ReCLIP++ at initialisation": at_init}, lab.class_names),
                    "02_planted_vs_init")
