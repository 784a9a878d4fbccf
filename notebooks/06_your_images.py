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
# # 06 · Your own images
#
# ReCLIP++ needs images and class names, not masks. This notebook runs, on one folder, the chain
# that the command line runs as four commands (docs/your-images.md):
#
# ```bash
# F="--config folder --set data_root=DIR --set class_names=FILE"
# python -m reclip_core hypothesis $F   # image-level classes, label-free
# python -m reclip_core train      $F   # the Reference prompt, the positional projection, the decoder
# python -m reclip_core evaluate   $F   # only when DIR/labels/ holds some masks
# python -m reclip_core segment    $F --checkpoint runs/folder --images DIR --out OUT
# ```
#
# By default the folder is 200 toy-world images exported as PNG files with their masks
# (`data/your_images_toy/200-images/`), so the notebook runs anywhere and the mIoU table has a truth to score
# against. Set `data_root` and `class_names` to your own folder and class file (one class per line,
# synonyms after commas). The toy profile segments with the toy CLIP, which knows only the toy
# world's shapes; the paper profile with OpenAI's ViT-B/16 (weights fetched once).

# %% tags=["parameters"]
profile = "toy"
dataset = None  # the benchmark of notebooks 01-05; here the folder is the data
device = "auto"
seed = 0
data_root = None  # your folder of images (None: the exported toy folder)
class_names = None  # your class file (None: <data_root>/classes.txt)
size = None  # the short side the model sees (None: the profile's, 64 toy / 224 paper)
window = None  # hypothesis window in pixels (None: the profile's, 32 toy / int(size/6) paper)
epochs = None  # training epochs (None: the profile's, 20 toy / 10 paper)
n_images = None  # images of the exported toy folder (None: 200)
num_threads = None  # CPU threads (None: the profile's)

# %%
import pandas as pd

from reclip_core import plots, your_images

lab = your_images.setup(profile, data_root, class_names, device, seed, size=size, window=window, epochs=epochs,
                        n_images=n_images, num_threads=num_threads)
files = lab.image_files()
print(f"{len(files)} images, {len(lab.class_names)} classes: {', '.join(lab.class_names)}")
print(f"masks beside them (labels/, read only by evaluation): {lab.has_labels}")

# %% [markdown]
# ## 1 · Hypotheses
# Which classes each image holds, from CLIP's votes over windows of the image (no label is read).

# %%
stats = lab.hypotheses()
print(f"{stats['images']} images, {stats['mean_classes']:.2f} classes per image, {stats['empty']} empty")

# %% [markdown]
# ## 2 · Training
# The Reference prompt (class bias), the projection of the positional embedding (space bias) and
# the mask decoder, trained with the Gumbel-Softmax masked contrastive loss against the hypotheses.

# %%
model = lab.train()
loss = lab.loss_history()
lab.save_figure(plots.plot_loss_curve(loss), "06_loss")

# %% [markdown]
# ## 3 · mIoU, when masks exist
# MaskCLIP (the frozen CLIP), its logits after rectification, and ReCLIP++ (the decoder) on the
# labelled images; PD off and on. One run, one seed, on the images it was trained on (the method
# never sees a mask): a comparison of the models over seeds and CPUs is the toy lab's
# (`results/toy/spread.md`), not this table's.

# %%
report = lab.evaluate()
if report is None:
    print("no labels/ folder: nothing to score (the segmentations below are the result)")
else:
    table = lab.save_table(your_images.miou_table(report), "06_miou", title="Your images: mIoU")
    print(table.to_string(index=False))

# %% [markdown]
# ## 4 · Segmentations
# `segment` writes a mask and an overlay per image for MaskCLIP (no training) and for the trained
# run, in the same class colours; a second run skips the images already done.

# %%
done = lab.segment()
for kind, res in done.items():
    print(f"{kind}: {len(res.written)} written, {len(res.existing)} already done, {len(res.unreadable)} unreadable")
lab.save_figure(lab.overlays_figure(list(files)[:4]), "06_overlays")

# %% [markdown]
# ## 5 · The learned bias
# The bias logit map ReCLIP++ subtracts: the Reference features of each class times the projected
# positional embedding, on the token grid.

# %%
lab.save_figure(lab.bias_map_figure(model), "06_bias_map")

# %%
# NBVAL_IGNORE_OUTPUT
print(pd.DataFrame([{"step": k, "seconds": v} for k, v in lab.timings.items()]).to_string(index=False))
