"""The notebooks' session object (fastbook style): ``lab = setup(profile, dataset, device, seed)``
seeds everything in one place, loads the profile's config and gives short, named steps that call
the library. No method logic lives here or in the notebooks — only orchestration and file
placement under ``results/<profile>/<dataset>/``.

The names notebook 05 and notebook 01 reach as ``rc.lab.<name>`` (the benchmark report, the
results folder) are imported here from their own modules.
"""
from __future__ import annotations

import contextlib
import io
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn


# tqdm.auto warns on stderr when ipywidgets is absent, at the first import of open_clip or tqdm.auto;
# in a notebook checked by nbval that warning would be compared like an output. So the filter is
# set before the library (and open_clip through it) is imported. Progress bars are off in the
# notebooks anyway.
warnings.filterwarnings("ignore", message="IProgress not found")

from . import diagnostics, evaluation, hypothesis, result_files  # noqa: E402  (after the filter)
from .atomic_io import StaleFileError, move_aside  # noqa: E402
from .benchmark_report import bias_table, compare_to_reference, headline, reference_numbers  # noqa: E402
from .checkpoint import load_model_weights  # noqa: E402
from .clip_loading import resolve_device  # noqa: E402
from .config import Config, _unknown, load_config, valid_keys  # noqa: E402
from .eval_report import EvalReport  # noqa: E402
from .model_factory import build_model  # noqa: E402
from .paths import RESULTS_DIR  # noqa: E402
from .profiles import check_parameters, config_name  # noqa: E402
from .run_lock import RunFolderLocked, run_folder_lock  # noqa: E402
from .run_inputs import build_dataset, load_config_clip, resolve_class_names, resolve_templates  # noqa: E402
from .text import text_embeddings  # noqa: E402
from .training import train  # noqa: E402

T = TypeVar("T")


def run_name(name: str, seed: int) -> str:
    """The folder of run ``name`` at ``seed`` under a lab's ``runs/``: a run is named by what it
    trains and its seed, so the notebooks and the known-answer lab share their seed's runs."""
    return f"{name}-seed{int(seed)}"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) — the only place the notebooks seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def recompute_if_stale(compute: Callable[[], T]) -> T:
    """Run ``compute``; if it stops on a file made from other settings or CLIP weights (e.g. after
    ``make toy-clip`` or a config change), set that file aside and run it once more.

    The notebooks' results folder is derived data, so recomputing is what a re-run should do; the
    old file is renamed, not deleted. The CLI keeps refusing instead (its message says what to do).
    """
    try:
        return compute()
    except StaleFileError as err:
        aside = move_aside(err.path)
        print(f"[reclip] {err.path} was made with other settings or CLIP weights: moved to {aside.name}, "
              "recomputing.", file=sys.stderr)
        return compute()


def wait_while_locked(compute: Callable[[], T], poll_s: float = 2.0) -> T:
    """Run ``compute``; while another process holds the lock it needs (``make reproduce`` runs the
    known-answer lab beside the notebooks, and both use the same runs), wait and try again: the
    other process's finished work is then read, not redone. Silent: which process waits depends on
    timing, and a notebook's outputs must not."""
    while True:
        try:
            return compute()
        except RunFolderLocked:
            time.sleep(poll_s)


@dataclass
class Lab:
    """A profile/dataset pair with its config, results folder and cached heavy objects."""

    profile: str
    dataset: str
    device: torch.device
    seed: int
    cfg: Any
    results: Path
    timings: Dict[str, float] = field(default_factory=dict)

    # -- objects --------------------------------------------------------------------------------
    @cached_property
    def clip(self) -> nn.Module:
        if self.cfg["clip"]["pretrained"] is None:
            torch.manual_seed(self.seed)  # a random CLIP must be the same in every notebook
        return load_config_clip(self.cfg, self.device)

    @cached_property
    def class_names(self) -> List[str]:
        return resolve_class_names(self.cfg)

    @cached_property
    def text(self) -> torch.Tensor:
        """Class text features, computed once and shared by every model of this lab."""
        return text_embeddings(self.clip, self.class_names, resolve_templates(self.cfg))

    def split(self, name: str) -> Any:
        return build_dataset(self.cfg, name)

    @cached_property
    def val(self) -> Any:
        return self.split(self.cfg["val_split"])

    def model(self, kind: str = "reclip++", **overrides: Any) -> nn.Module:
        """A fresh segmenter (``"maskclip"``, ``"reclip++"`` or ``"reclip"``) on the shared CLIP."""
        cfg = self.config(**overrides)
        model = build_model(cfg, clip=self.clip, device=self.device, kind=kind)
        model._text = self.text.to(self.device)
        return model.to(self.device)

    def config(self, **overrides: Any) -> Config:
        if not overrides:
            return self.cfg
        return load_config(dict(self.cfg), [f"{k}={v}" for k, v in overrides.items()])

    # -- steps ----------------------------------------------------------------------------------
    def _split_hypotheses(self, split: str, path: Path, progress: bool) -> Dict[str, List[int]]:
        """``split``'s hypotheses, computed into ``path`` once; another process computing them at the
        same time (``make reproduce`` runs the known-answer lab beside the notebooks) is waited for;
        the lock is a file beside ``path`` (``.<name>.lock``), gone once they are written."""
        def compute() -> Dict[str, List[int]]:
            with run_folder_lock(path.parent, "hypotheses", lock_name=f".{path.stem}.lock"):
                return recompute_if_stale(lambda: hypothesis.hypotheses_from_config(
                    self.cfg, self.clip, split, path, text=self.text, progress=progress))

        return wait_while_locked(compute)

    def hypotheses(self, progress: bool = False) -> Dict[str, List[int]]:
        """Image-level hypotheses of the training split (computed once, then read from disk)."""
        t0 = time.perf_counter()
        hyps = self._split_hypotheses(self.cfg["train_split"], self.results / "hypotheses.json", progress)
        self.timings.setdefault("hypotheses", round(time.perf_counter() - t0, 1))
        return hyps

    def val_hypotheses(self) -> Dict[str, List[int]]:
        """Hypotheses of the validation images, computed label-free exactly like the training ones."""
        split = self.cfg["val_split"]
        return self._split_hypotheses(split, self.results / f"hypotheses_{split}.json", False)

    def hypothesis_quality(self) -> Dict[str, Any]:
        """Precision/recall of the hypotheses of the *validation* split against its labels
        (evaluation code: the training split has no labels and training never reads one)."""
        return diagnostics.hypothesis_quality(self.val_hypotheses(), self.val, len(self.class_names),
                                              max_images=self.cfg["max_val_images"])

    def loss_preference(self, model: nn.Module, score_scales: Optional[Sequence[float]] = None) -> pd.DataFrame:
        """``diagnostics.loss_preference`` on the validation split with its label-free hypotheses, at the
        method's score scale 100 and at the model's own (the config's ``score_scale``)."""
        scales = list(score_scales or dict.fromkeys([100.0, float(getattr(model, "score_scale", 100.0))]))
        t0 = time.perf_counter()
        table = diagnostics.loss_preference(model, self.val, self.val_hypotheses(), self.cfg["test_size"], scales,
                                            self.cfg["max_long_side"], max_images=self.cfg["max_val_images"],
                                            resize=self.cfg["test_resize"])
        self.timings["loss preference"] = round(time.perf_counter() - t0, 1)
        return table

    def gumbel_draw(self, model: nn.Module, examples: Mapping[str, Any]) -> List[np.ndarray]:
        """One seeded draw of the loss's hard Gumbel masks for each example, as label maps at label size."""
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        maps = []
        with torch.no_grad():
            for x, label in zip(examples["inputs"], examples["labels"]):
                out = model(images=x.to(self.device))
                every_class = [list(range(len(self.class_names)))]
                _, masks = model.loss(out, every_class, generator=gen, return_masks=True)
                up = torch.nn.functional.interpolate(masks.float(), size=np.asarray(label).shape, mode="nearest")
                maps.append(up.argmax(1)[0].cpu().numpy())
        return maps

    def run_dir(self, name: str, seed: Optional[int] = None) -> Path:
        """``runs/<name>-seed<seed>`` (:func:`run_name`; the lab's seed unless given)."""
        return self.results / "runs" / run_name(name, self.seed if seed is None else seed)

    def train(self, name: str, kind: str = "reclip++", progress: bool = False, **overrides: Any) -> nn.Module:
        """Train ``kind`` with config ``overrides`` into :meth:`run_dir` (resumes a finished run
        without retraining) and return the trained model (last epoch, no selection)."""
        seed = overrides.get("seed", self.seed)
        if self.cfg["feature_cache"] and not self.cfg["feature_cache_path"]:
            # every run of this lab at this seed sees the same views through the same CLIP: build the
            # cache once per seed (the views are drawn from the seed)
            overrides.setdefault("feature_cache_path", str(self.results / "runs" / f"feature_cache-seed{seed}.safetensors"))
        cfg = self.config(model=kind, **overrides)
        hypotheses = self.hypotheses()
        run_dir = self.run_dir(name, seed)
        t0 = time.perf_counter()
        # The per-epoch log goes to runs/<name>-seed<seed>/loss.csv; keep notebook outputs to the results.
        with contextlib.redirect_stdout(io.StringIO()):
            wait_while_locked(lambda: recompute_if_stale(lambda: train(
                cfg, hypotheses=hypotheses, clip=self.clip, run_dir=run_dir, progress=progress)))
        self.timings[f"train {run_dir.name}"] = round(time.perf_counter() - t0, 1)
        model = self.model(kind, **{k: v for k, v in overrides.items() if k != 'feature_cache_path'})
        load_model_weights(model, run_dir)
        return model.eval()

    def evaluate(self, model: nn.Module, bias_grid: int = 4, examples: int = 0, progress: bool = False,
                 name: Optional[str] = None, accumulators: Optional[Mapping[str, Sequence[Any]]] = None,
                 max_images: Optional[int] = None) -> EvalReport:
        """Stream the validation split: mIoU (both definitions, PD on/off) and bias metrics per head;
        ``accumulators``: further measurements per head (``evaluation.evaluate``); ``max_images``: the
        first that many validation images (default: the config's ``max_val_images``)."""
        t0 = time.perf_counter()
        max_images = max_images or self.cfg["max_val_images"]
        report = evaluation.evaluate(model, self.val, self.cfg["test_size"], self.cfg["pd_threshold"],
                                     self.cfg["max_long_side"], max_images=max_images,
                                     progress=progress, bias_grid=bias_grid, examples=examples,
                                     pd_scale=self.cfg["pd_scale"], upsampling=self.cfg["eval_upsampling"],
                                     resize=self.cfg["test_resize"], accumulators=accumulators)
        self.timings[f"evaluate {name or type(model).__name__}"] = round(time.perf_counter() - t0, 1)
        return report

    def loss_history(self, name: str, seed: Optional[int] = None) -> pd.DataFrame:
        return pd.read_csv(self.run_dir(name, seed) / "loss.csv")

    # -- outputs (``result_files``) -------------------------------------------------------------
    def save_table(self, df: pd.DataFrame, name: str, floatfmt: str = ".1f", title: Optional[str] = None) -> pd.DataFrame:
        """``<name>.csv`` and ``<name>.md`` under the results folder; returns ``df`` rounded for display."""
        return result_files.write_table(self.results, df, name, floatfmt, title)

    def save_figure(self, fig: Any, name: str) -> Any:
        return result_files.write_figure(self.results, fig, name)

    def save_json(self, obj: Mapping[str, Any], name: str) -> Path:
        return result_files.write_json(self.results, obj, name)

    def write_headline(self, text: str) -> Path:
        """The few lines ``summary.md`` starts with (``reproduce.write_summary`` reads them)."""
        return result_files.write_headline(self.results, text)


def setup(profile: str = "toy", dataset: Optional[str] = None, device: str = "auto", seed: int = 0,
          **overrides: Any) -> Lab:
    """Validate the notebook parameters, seed everything, load the config → :class:`Lab`.

    Fails fast (before any heavy work) on an unknown profile, dataset, device or config key.
    """
    dataset = check_parameters(profile, dataset, device)
    bad = [k for k in overrides if k not in valid_keys()]
    if bad:  # checked even when the value is None (None overrides are skipped below)
        raise _unknown(bad[0])
    seed_everything(seed)
    sets = [f"seed={seed}", f"device={device}"] + [f"{k}={v}" for k, v in overrides.items() if v is not None]
    cfg = load_config(config_name(profile, dataset), sets)
    results = RESULTS_DIR / profile / dataset
    results.mkdir(parents=True, exist_ok=True)
    if cfg["dataset"] == "toyworld":
        # Generate the toy world now (first use only), quietly: its progress bars are not results.
        with contextlib.redirect_stderr(io.StringIO()):
            for split in (cfg["train_split"], cfg["val_split"]):
                build_dataset(cfg, split)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg["num_threads"]))
    return Lab(profile, dataset, resolve_device(device), seed, cfg, results)


__all__: Sequence[str] = ("setup", "Lab", "run_name", "seed_everything", "recompute_if_stale", "wait_while_locked",
                          # reached by the notebooks as rc.lab.<name>, defined in their own modules
                          "RESULTS_DIR", "reference_numbers", "compare_to_reference", "bias_table", "headline")
