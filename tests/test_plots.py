"""Figures: they render from the library's outputs and encode what they claim."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import torch

from reclip_core import plots
from reclip_core.bias_analysis import class_bias, space_bias


def test_colorize_uses_palette_and_black_for_ignore():
    lab = np.array([[0, 1], [255, 1]])
    rgb = plots.colorize(lab, 2)
    pal = plots.palette(2)
    assert (rgb[0, 0] == pal[0]).all() and (rgb[0, 1] == pal[1]).all()
    assert (rgb[1, 0] == 0).all()
    assert not (pal[0] == pal[1]).all()


def test_pca_image_recovers_a_linear_ramp():
    h, w = 6, 9
    ramp = torch.linspace(0, 1, w).repeat(h, 1)
    pe = torch.stack([ramp * k for k in range(1, 9)])  # rank-1 embedding varying along x only
    img = plots.pca_image(pe)
    assert img.shape == (h, w, 3) and img.min() >= 0 and img.max() <= 1
    first = img[..., 0]
    assert np.allclose(first, first[0:1])  # constant down each column
    assert abs(abs(np.corrcoef(first[0], ramp[0].numpy())[0, 1]) - 1) < 1e-6


def test_bias_figures_render():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, (2, 16, 16))
    pred = target.copy()
    pred[:, :8][pred[:, :8] == 0] = 1
    cb = class_bias(pred, target, 3, class_names=["a", "b", "c"])
    sb = space_bias(pred, target, 3, grid=4)
    figs = [
        plots.plot_class_shares(cb.table),
        plots.plot_space_bias(sb.diff, ["a", "b", "c"]),
        plots.plot_confusion(np.eye(3) * 5 + 1, ["a", "b", "c"]),
        plots.plot_segmentations([np.zeros((16, 16, 3))] * 2, {"truth": target, "pred": pred}, 3, ["a", "b", "c"]),
        plots.plot_maps(torch.randn(3, 4, 4), ["a", "b", "c"], "bias"),
        plots.plot_similarity(np.eye(3), ["a", "b", "c"], ["a", "b", "c"], "sim"),
        plots.plot_loss_curve(pd.DataFrame({"step": [0, 1, 2], "loss": [3.0, 2.0, 1.5]})),
    ]
    for fig in figs:
        assert fig.axes
        matplotlib.pyplot.close(fig)


def test_figures_overlays_and_folder_outputs_give_class_k_the_same_colour():
    import seaborn as sns
    from PIL import Image

    from reclip_core.segment import overlay_figure
    from reclip_core.segment_folder import class_colours, mask_image, overlay_image

    for n in (3, 20, 27):  # part of tab20, all of it, and gist_ncar beyond
        names, mask = [f"c{k}" for k in range(n)], np.arange(n).reshape(1, n)
        figure = plots.colorize(mask, n)[0]  # the notebooks' figures
        fig = overlay_figure(Image.new("RGB", (n, 1)), mask, names, alpha=1.0)  # segment --image
        single = np.round(np.asarray(fig.axes[1].images[0].get_array()) * 255).astype(np.uint8)[0]
        folder = np.asarray(overlay_image(Image.new("RGB", (n, 1)), mask, names, class_colours(n), alpha=1.0))[0, :n]
        png = np.array(mask_image(mask, class_colours(n)).getpalette()[:3 * n]).reshape(n, 3)
        for colours in (single, folder, png, class_colours(n)):
            assert np.array_equal(colours, figure), n
        assert len({tuple(c) for c in figure}) == n  # no two classes share a colour
        if n <= 20:  # the figures keep the colours seaborn's "tab20" gave them
            assert np.array_equal(figure, (np.array(sns.color_palette("tab20", n)) * 255).astype(np.uint8))
