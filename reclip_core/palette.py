"""The class colours: one fixed RGB colour per class index, the same in the notebooks' figures
(``plots``), the single-image overlay (``segment``) and a segmented folder's masks, overlays and
legend (``segment_folder``)."""
from __future__ import annotations

import matplotlib
import numpy as np

#: classes that get tab20's distinct colours; more would repeat them, so gist_ncar is sampled instead
TAB20_CLASSES = 20


def class_colours(num_classes: int) -> np.ndarray:
    """uint8 [C, 3], row k = the colour of class k.

    Up to 20 classes: matplotlib's tab20 in order (the colours seaborn's ``"tab20"`` palette gives).
    Beyond: gist_ncar sampled evenly from end to end, so that no two classes share a colour."""
    if num_classes <= TAB20_CLASSES:
        rgb = np.asarray(matplotlib.colormaps["tab20"].colors[:num_classes], dtype=np.float64).reshape(-1, 3)
    else:
        cmap = matplotlib.colormaps["gist_ncar"]
        rgb = np.array([cmap(i / (num_classes - 1))[:3] for i in range(num_classes)])
    return np.round(rgb * 255).astype(np.uint8)


__all__ = ("class_colours", "TAB20_CLASSES")
