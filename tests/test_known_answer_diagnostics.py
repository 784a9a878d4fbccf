"""The known-answer diagnostics' pieces around their training runs: the patch-noise world's U and B
read from the sweep, the first-steps table (which runs it trains, which checkpoints it scores), and
the diagnostic models' names."""
from __future__ import annotations

from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from reclip_core import known_answer, known_answer_diagnostics as kad  # noqa: E402
from reclip_core.metrics import SegMetric  # noqa: E402


def _sweep() -> pd.DataFrame:
    rows = []
    for sigma, scale, miou in ((0.0, 0.0, 71.6), (0.0, 1.0, 54.4), (0.2, 0.0, 64.3), (0.2, 0.85, 49.1),
                               (0.2, 1.0, 44.2)):
        rows.append({"patch noise σ": sigma, "amplitude scale": scale, "mIoU": miou, "class TVD": 0.1 + scale,
                     "space TVD": 0.2 + scale, "regions read %": 80 - 5 * scale, "patches read %": 70 - 10 * scale})
    return pd.DataFrame(rows)


def test_the_noisy_worlds_u_and_b_are_its_sweep_rows():
    u, b = kad.noisy_world_rows(_sweep(), 0.2, 0.85)
    assert u == {"model": kad.NOISY_U, "mIoU": 64.3, "class TVD": 0.1, "space TVD": 0.2, "regions read %": 80.0,
                 "patches read %": 70.0}
    assert b["model"] == kad.NOISY_B and b["mIoU"] == 49.1 and b["patches read %"] == pytest.approx(61.5)
    # the rows feed the share of the noisy gap: its U row scores 100%, its B row 0%
    shares = kad.share_of_noisy_gap(known_answer.summarise(pd.DataFrame([u, b])))
    assert shares.set_index("model")["% of U − B"].tolist() == [100.0, 0.0]


def test_a_noisy_world_the_sweep_did_not_measure_is_an_error():
    with pytest.raises(ValueError, match="NOISY_SWEEP_SCALES"):
        kad.noisy_world_rows(_sweep(), 0.2, 0.9)
    with pytest.raises(ValueError, match="σ 0.3"):
        kad.noisy_world_rows(_sweep(), 0.3, 0.85)


def test_the_trained_noisy_scale_is_one_the_sweep_measures():
    assert kad.NOISY_SCALE in kad.NOISY_SWEEP_SCALES and 0.0 in kad.NOISY_SWEEP_SCALES


def test_every_diagnostic_names_a_model_and_its_run_folder_once():
    entries = {**known_answer.MODELS, **known_answer.VARIANTS}
    assert not set(known_answer.MODELS) & set(known_answer.VARIANTS)
    run_names = [entry[0] for entry in entries.values()]
    assert len(set(run_names)) == len(run_names)  # a variant never reuses a lab run's folder
    for label, (folder, model_label, where, scale, noise) in kad.DIAGNOSTICS.items():
        assert model_label in entries, label
        if folder == "lab":  # the lab itself: its own CLIP, so its own planted bias at full amplitude
            assert (where, scale, noise) == ("features", 1.0, None), label
    variant = known_answer.model_entry("ReCLIP++ (rectified start)")
    assert variant[2] == {"decoder_init": "rectified"} and known_answer.model_entry("ReCLIP++")[2] == {}
    with pytest.raises(KeyError):
        known_answer.model_entry("ReCLIP++ (some other start)")


class _FirstStepsLab:
    """A lab whose training writes empty checkpoint files and whose evaluation scores each
    checkpoint by a made-up confusion matrix (class 0's IoU = the step / 100)."""

    class_names = ["a", "b"]

    def __init__(self, root):
        self.root, self.trained, self.evaluated = root, [], []

    def run_dir(self, name, seed):
        return self.root / f"{name}-seed{seed}"

    def train(self, name, kind, **overrides):
        self.trained.append((name, kind, overrides))
        folder = self.run_dir(name, overrides["seed"]) / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        for step in (8, 4, 10):  # the end of the epoch, not a multiple of `every`
            (folder / f"step{step:08d}.safetensors").write_bytes(b"")
            (folder / f"step{step:08d}.optim.pt").write_bytes(b"")

    def model(self, kind):
        return torch.nn.Identity()

    def evaluate(self, model, max_images=None, name=None):
        step = int(name.rsplit("step", 1)[1])
        self.evaluated.append((max_images, step))
        metric = SegMetric(2)
        metric.confusion[:] = np.array([[step, 100 - step], [0, 100]])
        return SimpleNamespace(metrics={"reclip++": {"no_pd": metric}})


def test_first_steps_scores_every_checkpoint_of_a_one_epoch_run(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(kad, "load_model_weights", lambda model, path: loaded.append(path.name))
    labs = {"clean": _FirstStepsLab(tmp_path / "clean"), "biased": _FirstStepsLab(tmp_path / "biased")}
    table = kad.first_steps(labs, seeds=(0, 2), every=4, val_images=30)
    for lab in labs.values():  # the lab's ReCLIP++ at each seed, stopped after its first epoch
        assert lab.trained == [("reclip++_first_steps", "reclip++",
                                {"seed": s, "epoch": 1, "checkpoint_every": 4, "keep_checkpoints": 10_000})
                               for s in (0, 2)]
        assert lab.evaluated == [(30, 4), (30, 8), (30, 10)] * 2
    assert loaded == ["step00000004.safetensors", "step00000008.safetensors", "step00000010.safetensors"] * 4
    assert list(table.columns) == ["CLIP", "seed", "step", "mIoU", "a", "b"]
    assert table["CLIP"].tolist() == ["clean"] * 6 + ["biased"] * 6 and table["step"].tolist() == [4, 8, 10] * 4
    first = table.iloc[0]  # class a: 4 of 100 pixels right, no false positives; b: 100 / 196
    assert first["a"] == pytest.approx(4.0) and first["b"] == pytest.approx(100 * 100 / 196)
    assert first["mIoU"] == pytest.approx((4.0 + 100 * 100 / 196) / 2)


def test_first_steps_figure_has_a_panel_per_clip_and_a_line_per_class():
    table = pd.DataFrame([{"CLIP": clip, "seed": seed, "step": step, "mIoU": 1.0, "a": step, "b": -step}
                          for clip in ("clean", "biased") for seed in (0, 1) for step in (4, 8)])
    fig = kad.first_steps_figure(table, seed=1)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["clean (seed 1)", "biased (seed 1)"]
    assert [len(ax.lines) for ax in axes] == [2, 2]
    assert axes[0].lines[1].get_ydata().tolist() == [-4, -8]
