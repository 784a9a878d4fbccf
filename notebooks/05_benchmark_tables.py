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
# # 05 · Benchmark tables
#
# One table for the profile: MaskCLIP (no training), ReCLIP (CVPR 2024), ReCLIP++ with
# rectification only, and full ReCLIP++; PD off and on; both mIoU definitions (mmseg: mean over
# classes present; release: absent classes count 0). The runs of notebooks 03 and 04 are reused
# (a finished run is not trained again). Beside them: the paper's numbers (paper profile) or the
# toy lab's targets (toy profile), for this one run; a missed target is reported as missed. On the
# toy profile a single run's numbers move with the CPU and the seed: the comparisons over seeds and
# CPUs are in `results/toy/spread.md` (`make spread`).

# %% tags=["parameters"]
profile = "toy"
dataset = None
device = "auto"
seed = 0
num_threads = None  # CPU threads (None: the config's); results depend on it, docs/reproducibility.md
epochs = None

# %%
import pandas as pd

import reclip_core as rc

lab = rc.lab.setup(profile, dataset, device, seed, epoch=epochs, num_threads=num_threads)
lab.hypotheses()
runs = {
    "MaskCLIP": (lambda: lab.model("maskclip"), "maskclip"),
    "ReCLIP": (lambda: lab.train("reclip", kind="reclip"), "rectified"),
    "ReCLIP++ (rectify only)": (lambda: lab.train("rectify_both", use_decoder=False, bias_mode="both"), "rectified"),
    "ReCLIP++": (lambda: lab.train("reclip++"), "reclip++"),
}
reports = {name: (lab.evaluate(make(), name=name, bias_grid=4), head) for name, (make, head) in runs.items()}

# %%
rows = []
for name, (report, head) in reports.items():
    m = report.metrics[head]
    rows.append({"model": name, "mIoU": m["no_pd"].miou(), "mIoU+PD": m["pd"].miou(),
                 "mIoU (release def.)": m["no_pd"].miou_release(), "mIoU+PD (release def.)": m["pd"].miou_release()})
table = pd.DataFrame(rows)
print(lab.save_table(table, "05_benchmark", title=f"{lab.profile} / {lab.dataset}").to_string(index=False))

# %% [markdown]
# ## Against the reference numbers

# %%
reference = rc.lab.reference_numbers(lab.profile, lab.dataset)
compare = rc.lab.compare_to_reference(table, reference)
print(lab.save_table(compare, "05_vs_reference", title="Against the paper / the toy targets").to_string(index=False))

# %% [markdown]
# ## Bias after rectification
# The two bias metrics of notebook 01 (class: predicted vs true pixel share per class; space: the
# same per cell of a 4×4 grid; total variation, 0 = unbiased) for each model, and for the rectified
# logits inside the full ReCLIP++ model (before its decoder), against MaskCLIP's.

# %%
heads = dict(reports)
heads["ReCLIP++ (its rectified logits)"] = (reports["ReCLIP++"][0], "rectified")
bias = rc.lab.bias_table(heads)
print(lab.save_table(bias, "05_bias", floatfmt=".3f", title="Bias metrics (TVD, lower = less biased)").to_string(index=False))
headline_file = lab.write_headline(rc.lab.headline(lab, table, compare, bias))  # results/<profile>/<dataset>/headline.md

# %% [markdown]
# ## The known answer
# On the default toy world MaskCLIP above is `B` (with the planted bias); `U` is MaskCLIP on the same
# CLIP without it. Each model's share of `U − B` recovered (100%: as if the bias were gone), for
# this one run; over three seeds, with bias recovery, in `results/toy/known/known_answer.md`.

# %%
if lab.dataset == "known":
    clean = lab.evaluate(rc.known_answer.unbiased_lab(lab).model("maskclip"), name="MaskCLIP (no planted bias)")
    known = rc.known_answer.share_of_gap(table, float(clean.metrics["maskclip"]["no_pd"].miou()))
    print(lab.save_table(known, "05_known_answer", title="Share of U − B recovered (this run)").to_string(index=False))

# %%
# NBVAL_IGNORE_OUTPUT
timings = pd.DataFrame([{"step": k, "seconds": v} for k, v in lab.timings.items()])
print(lab.save_table(timings, "05_timings").to_string(index=False))
