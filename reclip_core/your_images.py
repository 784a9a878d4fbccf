"""Notebook 06's session: ReCLIP++ learned on a folder of your own images and class names.

``lab = setup(profile, data_root, class_names, ...)`` builds the ``folder`` config
(``configs/folder.yaml``) with the notebook's parameters and gives the chain the CLI runs as four
commands — ``hypothesis → train → evaluate → segment`` — as named steps that call the same library
functions (``hypotheses_from_config``, ``train``, ``evaluate_run``, ``segment_folder``). Without a
``data_root`` it exports a folder of toy-world image files with labels (``toyworld_export``), so the
notebook runs anywhere. Files: ``results/<profile>/your_images/`` (tables, figures) and its
``runs/`` (hypotheses, checkpoints, the masks and overlays of ``segment``).
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from .lab import recompute_if_stale, seed_everything  # first: its warning filter precedes open_clip's import
from . import plots, result_files
from .checkpoint import load_model_weights
from .clip_loading import resolve_device
from .config import Config, load_config
from .datasets.folder import LABELS_DIR, scan_images
from .datasets.toyworld_export import export_toy_folder
from .eval_report import EvalReport
from .eval_scoring import patch_size
from .evaluation import evaluate_run
from .hypothesis import hypotheses_from_config, hypothesis_stats
from .model_factory import build_model
from .paths import RESULTS_DIR, ROOT
from .profiles import check_parameters
from .run_inputs import load_config_clip, resolve_class_names, resolve_templates
from .run_lock import run_folder_lock
from .segment_folder import FolderResult, segment_folder
from .training import train

#: the CLIP each profile segments your images with: the toy CLIP (it knows only the toy world's
#: shapes, so on photos it checks that everything runs) or the paper's OpenAI ViT-B/16
PROFILE_CLIP = {"toy": {"arch": "toy", "pretrained": "biased"},
                "paper": {"arch": "ViT-B-16-quickgelu", "pretrained": "openai"}}
#: the chain's settings per profile. Toy: the toy lab's (configs/toy.yaml: 64 px, 32-px windows,
#: its learning rate and feature cache) on 200 exported images, about a minute on a CPU core;
#: paper: the folder config's (224 px, windows int(224/6)).
PROFILE_SETTINGS: Dict[str, Dict[str, Any]] = {
    "toy": {"size": 64, "window": 32, "epochs": 20, "batch_size": 16, "lr": 0.05, "n_images": 200,
            "feature_cache": True, "feature_cache_views": 2, "num_threads": 1},
    "paper": {"size": 224, "window": None, "epochs": 10, "batch_size": 8, "lr": None, "n_images": 200},
}
#: where the default toy folders are exported, one per image count (generated data, like the toy world)
TOY_FOLDER = ROOT / "data" / "your_images_toy"
#: the heads compared: the frozen CLIP (MaskCLIP), its rectified logits, the decoder (ReCLIP++)
HEAD_NAMES = {"maskclip": "MaskCLIP", "rectified": "rectified (ReCLIP++ before its decoder)", "reclip++": "ReCLIP++"}


@dataclass
class FolderLab:
    """One folder, its classes, its config and the run folder of its chain."""

    profile: str
    root: Path  # the image folder (``data_root``)
    cfg: Config
    device: torch.device
    seed: int
    results: Path  # results/<profile>/your_images
    timings: Dict[str, float] = field(default_factory=dict)

    @cached_property
    def clip(self) -> nn.Module:
        return load_config_clip(self.cfg, self.device)

    @cached_property
    def class_names(self) -> List[str]:
        return resolve_class_names(self.cfg)

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def has_labels(self) -> bool:
        """Masks beside the images (``labels/``): only evaluation reads them."""
        return (self.root / LABELS_DIR).is_dir()

    def image_files(self) -> Dict[str, Path]:
        """The folder's readable images by id, in the readers' order (the decode check is cached)."""
        ids, paths = scan_images(self.root, [self.root / LABELS_DIR])[:2]
        return dict(zip(ids, paths))

    def _timed(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.perf_counter() - t0, 1)

    # -- the chain ------------------------------------------------------------------------------
    def hypotheses(self) -> Dict[str, Any]:
        """``hypothesis``: the image-level classes of every image, label-free (``runs/hypotheses.json``)."""
        t0 = time.perf_counter()
        with run_folder_lock(self.run_dir, "hypothesis"):
            hyps = recompute_if_stale(lambda: hypotheses_from_config(
                self.cfg, self.clip, self.cfg["train_split"], self.run_dir / "hypotheses.json", progress=False))
        self._timed("hypotheses", t0)
        return hypothesis_stats(hyps, len(self.class_names))

    def train(self) -> nn.Module:
        """``train``: ReCLIP++ on the unlabeled images (a finished run is read back, not retrained)."""
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the per-epoch log is runs/loss.csv
            recompute_if_stale(lambda: train(self.cfg, clip=self.clip, run_dir=self.run_dir, progress=False))
        self._timed("train", t0)
        model = build_model(self.cfg, clip=self.clip, device=self.device)
        load_model_weights(model, self.run_dir)
        return model.to(self.device).eval()

    def loss_history(self) -> pd.DataFrame:
        return pd.read_csv(self.run_dir / "loss.csv")

    def evaluate(self) -> Optional[EvalReport]:
        """``evaluate``: the three heads' mIoU on the labelled images, or None without ``labels/``."""
        if not self.has_labels:
            return None
        t0 = time.perf_counter()
        report = evaluate_run(self.cfg, run_dir=self.run_dir, clip=self.clip, progress=False)
        self._timed("evaluate", t0)
        return report

    def segment(self) -> Dict[str, FolderResult]:
        """``segment``: masks and overlays of every image, by MaskCLIP (no training) and by the
        trained run, each into its own folder (resumable: a second call writes nothing new)."""
        t0 = time.perf_counter()
        out = {}
        for kind, checkpoint in (("maskclip", None), ("reclip++", self.run_dir)):
            out[kind] = segment_folder(self.root, self.segment_dir(kind), self.class_names, checkpoint, clip=self.clip,
                                       test_size=self.cfg["test_size"], templates=resolve_templates(self.cfg),
                                       device=self.device, progress=False)
        self._timed("segment", t0)
        return out

    def segment_dir(self, kind: str) -> Path:
        return self.run_dir / f"segment_{kind}"

    # -- what the notebook shows ----------------------------------------------------------------
    def overlays_figure(self, ids: Sequence[str]) -> plt.Figure:
        """Image | MaskCLIP | ReCLIP++ overlays (as ``segment`` wrote them, legends included) per row."""
        kinds, files = ("maskclip", "reclip++"), self.image_files()
        fig, axes = plt.subplots(len(ids), 3, figsize=(9, 2.6 * len(ids)), squeeze=False)
        for row, rid in zip(axes, ids):
            with Image.open(files[rid]) as im:
                row[0].imshow(np.asarray(im.convert("RGB")))
            row[0].set_title(rid, fontsize=8)
            for ax, kind in zip(row[1:], kinds):
                with Image.open(self.segment_dir(kind) / "overlays" / f"{rid}.png") as im:
                    ax.imshow(np.asarray(im.convert("RGB")))
                ax.set_title(HEAD_NAMES[kind], fontsize=8)
            for ax in row:
                ax.axis("off")
        fig.tight_layout()
        return fig

    def bias_map_figure(self, model: nn.Module) -> plt.Figure:
        """The learned bias logit map (Reference features × positional feature) per class, on the
        token grid of a ``test_size`` square input."""
        side = self.cfg["test_size"] // patch_size(model)
        with torch.no_grad():
            bias = model.bias_map((side, side)).cpu()
        return plots.plot_maps(bias, self.class_names, "learned bias logit map")

    def save_table(self, df: pd.DataFrame, name: str, floatfmt: str = ".1f", title: Optional[str] = None) -> pd.DataFrame:
        return result_files.write_table(self.results, df, name, floatfmt, title)

    def save_figure(self, fig: Any, name: str) -> Any:
        return result_files.write_figure(self.results, fig, name)


def miou_table(report: EvalReport) -> pd.DataFrame:
    """One row per head: mIoU (mmseg definition) without and with PD, on the labelled images."""
    rows = [{"head": HEAD_NAMES.get(head, head), "mIoU": m["no_pd"].miou(), "mIoU+PD": m["pd"].miou()}
            for head, m in report.metrics.items()]
    return pd.DataFrame(rows)


def setup(profile: str = "toy", data_root: Optional[str] = None, class_names: Optional[str] = None,
          device: str = "auto", seed: int = 0, **settings: Any) -> FolderLab:
    """Check the parameters, seed, export the toy folder when no ``data_root`` is given, build the config.

    ``class_names``: a class file (one class per line, synonyms comma-separated) or None for
    ``<data_root>/classes.txt``. ``settings`` (None: the profile's, :data:`PROFILE_SETTINGS`):
    ``size`` (the short side the model sees: ``test_size`` and ``crop``), ``window`` (the hypothesis
    window; None: int(size/6)), ``epochs``, ``batch_size``, ``lr``, ``n_images`` (of the toy folder),
    ``num_threads``, and any config key (``feature_cache=True``, ...)."""
    check_parameters(profile, None, device)
    s = {**PROFILE_SETTINGS[profile], **{k: v for k, v in settings.items() if v is not None}}
    seed_everything(seed)
    n_images = s.pop("n_images")
    if data_root is None:
        with contextlib.redirect_stderr(io.StringIO()):  # the world's progress bars are not results
            root = recompute_if_stale(lambda: export_toy_folder(TOY_FOLDER / f"{n_images}-images", n_images))
    else:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise ValueError(f"data_root {root} is not a folder: pass the folder of your images.")
    names = Path(class_names) if class_names is not None else root / "classes.txt"
    if not names.is_file():
        raise ValueError(f"no class file at {names}: pass class_names, a text file with one class per line.")
    results = RESULTS_DIR / profile / "your_images"
    size, epochs = s.pop("size"), s.pop("epochs")
    window = s.pop("window") or size // 6
    clip = PROFILE_CLIP[profile]
    sets = [f"data_root={root}", f"class_names={names}", f"test_size={size}", f"crop={size}",
            f"hypothesis_window={window}", f"hypothesis_stride={max(1, window // 2)}", f"epoch={epochs}",
            f"max_epoch={epochs}", f"seed={seed}", f"device={device}", f"output_dir={results / 'runs'}",
            f"clip.arch={clip['arch']}", f"clip.pretrained={clip['pretrained']}"]
    sets += [f"{k}={v}" for k, v in s.items() if v is not None]
    cfg = load_config("folder", sets)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg["num_threads"]))
    results.mkdir(parents=True, exist_ok=True)
    return FolderLab(profile, root, cfg, resolve_device(device), seed, results)


__all__ = ("setup", "FolderLab", "miou_table", "PROFILE_CLIP", "PROFILE_SETTINGS", "TOY_FOLDER", "HEAD_NAMES")
