"""The benchmark rows: sizes per mode, and for each (row, path) a setup that builds the inputs
outside the timed region and exposes ``warmup()``, ``run() -> {name: seconds}`` and
``extra() -> dict``.

Every worker seeds ``torch.manual_seed(0)`` before ``load_clip(arch, pretrained=None)`` and before
building the ReCLIP++ heads, so all paths of all rows share the same random weights.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from reclip_core import class_names
from reclip_core.model import ReCLIPPP
from reclip_core.text import text_embeddings

from . import harness
from .ours import (ours_evaluate, ours_feature_cache, ours_hypothesis, ours_train_epoch, ours_train_first_step,
                   window_geometry)
from .release_style import release_evaluate, release_hypothesis, release_train_epoch, release_train_step

HERE = Path(__file__).resolve().parent

#: Text templates used to build the *fixed* class text features of the benchmark (outside every
#: timed region; both paths use the same features). One template instead of 85: 150 ADE classes
#: × 85 templates through the text encoder take tens of minutes on 2 CPU cores, and the values of
#: the text features do not change any timed computation.
BENCH_TEMPLATES = ("a photo of a {}.",)

MODES: Dict[str, dict] = {
    "full": {
        "arch": "ViT-B-16-quickgelu",
        # original image sizes; test size 336 → 336×448 (VOC), 512 → 512×683 (ADE)
        "eval_voc": {"dataset": "voc", "image": [375, 500], "test_size": 336, "pd": 1.0},
        "eval_ade": {"dataset": "ade", "image": [384, 512], "test_size": 512, "pd": 0.5},
        "train": {"dataset": "voc", "image": [375, 500], "crop": 336, "n_images": 4, "batch": 4, "lr": 0.01},
        # the timed region 140×252 holds 4 × 8 = 32 of the image's 192 windows (CPU time bound)
        "hyp": {"dataset": "voc", "image": [375, 500], "crop": 336, "chunk": 64, "region": [140, 252]},
        "repeats": {"eval_voc": 3, "eval_ade": 2, "train": 2, "hyp": 2},
        # a GPU has time for the whole image, a longer epoch and bigger batches
        "cuda": {"hyp": {"region": None}, "train": {"n_images": 16, "batch": 8},
                 "repeats": {"eval_voc": 10, "eval_ade": 10, "train": 5, "hyp": 5}},
    },
    "quick": {
        "arch": str(HERE / "tiny_clip.json"),
        "eval_voc": {"dataset": "voc", "image": [45, 60], "test_size": 48, "pd": 1.0},
        "eval_ade": {"dataset": "ade", "image": [48, 64], "test_size": 64, "pd": 0.5},
        "train": {"dataset": "voc", "image": [45, 60], "crop": 48, "n_images": 4, "batch": 2, "lr": 0.01},
        "hyp": {"dataset": "voc", "image": [40, 56], "crop": 96, "chunk": 64, "region": None},
        "repeats": {"eval_voc": 2, "eval_ade": 2, "train": 2, "hyp": 2},
    },
}

ROW_KIND = {"eval_voc": "eval", "eval_ade": "eval", "train": "train", "hyp": "hyp"}
PATHS = {"eval_voc": ("ours", "release"), "eval_ade": ("ours", "release"),
         "train": ("ours", "ours_cached", "release"), "hyp": ("ours", "release")}


def load_model(arch: str, device: torch.device):
    import reclip_core

    torch.manual_seed(0)
    return reclip_core.load_clip(arch, pretrained=None, device=device)


def fixed_text(clip, dataset: str, arch: str, cache_dir: Optional[Path]) -> torch.Tensor:
    """Class text features for the benchmark (BENCH_TEMPLATES), computed once per dataset and
    shared by the workers through ``cache_dir``."""
    names = class_names(dataset)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"text_{Path(arch).stem}_{dataset}.pt"
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
    text = text_embeddings(clip, names, BENCH_TEMPLATES).cpu()
    if path is not None:
        from reclip_core.atomic_io import atomic_torch_save

        atomic_torch_save(text, path)
    return text


def _heads(clip, dataset: str, text: torch.Tensor, device: torch.device) -> ReCLIPPP:
    torch.manual_seed(1)  # the same head weights in every worker
    return ReCLIPPP(clip, class_names(dataset), templates=BENCH_TEMPLATES, text=text).to(device)


class Setup:
    """One (row, path), ready to time."""

    def warmup(self) -> None:
        self.run()

    def run(self) -> Dict[str, float]:
        raise NotImplementedError

    def extra(self) -> Dict[str, object]:
        return {}

    def output(self):
        """A result to compare between paths (first run), or None."""
        return None


# ---------------------------------------------------------------------------------------------
# 1. evaluation
# ---------------------------------------------------------------------------------------------
class EvalSetup(Setup):
    """One pass over ``1 + repeats`` labelled images of the original size ``cfg["image"]``
    (resized to the test size inside): ours through ``reclip_core.evaluation.evaluate``, the
    release-style loop through :func:`release_evaluate`. The first image is the warm-up (it also
    carries our once-per-size bias computation); forward and per-image step times of the others
    are the timed repeats."""

    passes = 1

    def __init__(self, clip, cfg: dict, path: str, device: torch.device, text: torch.Tensor,
                 arch: str, amp: Optional[str], n_timed: int):
        self.clip, self.cfg, self.path, self.device = clip, cfg, path, device
        self.model = _heads(clip, cfg["dataset"], text, device).eval()
        self.C = self.model.num_classes
        g = torch.Generator().manual_seed(123)
        H, W = cfg["image"]
        self.dataset = []
        for i in range(1 + n_timed):
            image = torch.randint(0, 256, (H, W, 3), generator=g, dtype=torch.uint8).numpy()
            label = torch.randint(0, self.C, (H, W), generator=g)
            label[torch.rand(label.shape, generator=g) < 0.05] = 255
            self.dataset.append({"id": f"img{i:05d}", "image": image, "label": label.numpy()})
        self.sync = harness.make_sync(device)
        self._events: List[tuple] = []
        self._first = None
        self._input = None

    def warmup(self) -> None:  # the first image of the pass is the warm-up
        pass

    def _on_forward(self, event: str, tensor) -> None:
        self.sync()
        if event == "start" and self.path == "ours":
            # This machine's matmul rate right before each forward (row 4 pairs them, so a change
            # of load between the two measurements matters less); its time is taken out of the
            # step time of the previous image below.
            t0 = time.perf_counter()
            self._matmul.append(harness.matmul_gflops(self.device, repeats=3))
            self._bursts.append(time.perf_counter() - t0)
        self._events.append((event, time.perf_counter()))
        if event == "end" and self._first is None:
            self._first = tensor.detach().float().cpu()
            self._input = [int(tensor.shape[-2]), int(tensor.shape[-1])]

    def run(self) -> Dict[str, List[float]]:
        self._events, self._matmul, self._bursts = [], [], []
        if self.path == "ours":
            report = ours_evaluate(self.model, self.dataset, self.cfg["test_size"], self.cfg["pd"], self._on_forward)
            self.confusion = report.metrics["reclip++"]["pd"].confusion.copy()
        else:
            with tempfile.TemporaryDirectory(prefix="bench_preds_") as tmp:
                metric = release_evaluate(self.model, self.dataset, self.cfg["test_size"], self.cfg["pd"], Path(tmp),
                                          self._on_forward)
                self.prediction_files = len(list(Path(tmp).iterdir()))
            self.confusion = metric.confusion.copy()
        self.sync()
        t_end = time.perf_counter()
        starts = [t for e, t in self._events if e == "start"]
        ends = [t for e, t in self._events if e == "end"]
        forward = [e - s for s, e in zip(starts, ends)]
        step = [b - a for a, b in zip(starts, starts[1:] + [t_end])]
        if self._bursts:  # the burst before forward i+1 ran inside step i
            step = [st - (self._bursts[i + 1] if i + 1 < len(self._bursts) else 0.0) for i, st in enumerate(step)]
            self.roofline = [{"forward_s": f, "matmul_gflops": m["gflops"]}
                             for f, m in zip(forward[1:], self._matmul[1:])]
        self.first_image = {"forward": forward[0], "step": step[0]}
        return {"forward": forward[1:], "step": step[1:]}

    def output(self):
        return {"logits": self._first, "confusion": torch.from_numpy(self.confusion)}

    def extra(self) -> Dict[str, object]:
        H, W = self._input[0] * self._patch(), self._input[1] * self._patch()
        out: Dict[str, object] = {"classes": self.C, "image": list(self.cfg["image"]),
                                  "grid": list(self._input), "test_size": self.cfg["test_size"],
                                  "first_image": self.first_image}
        if self.path == "ours":
            h, w = self._test_hw()
            out["input"] = [h, w]
            out["flops_forward"] = harness.eval_forward_flops(self.clip, h, w, self.C)
            out["flops_dense"] = harness.dense_forward_flops(self.clip, h, w)
            out["roofline"] = self.roofline
        else:
            out["input"] = list(self._test_hw())
            out["prediction_files"] = self.prediction_files
        return out

    def _patch(self) -> int:
        ps = self.clip.visual.patch_size
        return int(ps[0] if isinstance(ps, (tuple, list)) else ps)

    def _test_hw(self):
        from reclip_core.transforms import keep_ratio_size

        H, W = self.cfg["image"]
        return keep_ratio_size(H, W, 2048, self.cfg["test_size"])


# ---------------------------------------------------------------------------------------------
# 2. training
# ---------------------------------------------------------------------------------------------
class TrainSetup(Setup):
    """N unlabeled images of ``cfg["image"]`` with random hypotheses, the library's label-free
    training views at the dataset's crop; ours in mini-batches through the library's training
    step (optionally on its feature cache), release-style at batch 1 with the per-class loop."""

    def __init__(self, clip, cfg: dict, path: str, device: torch.device, text: torch.Tensor,
                 arch: str, amp: Optional[str], n_timed: int):
        from reclip_core.training import TrainViews
        from reclip_core.transforms import TrainTransform

        self.cfg, self.path, self.device = cfg, path, device
        self.model = _heads(clip, cfg["dataset"], text, device)
        C = self.model.num_classes
        g = torch.Generator().manual_seed(321)
        n, crop = cfg["n_images"], cfg["crop"]
        H, W = cfg["image"]
        items, hyps = [], {}
        for i in range(n):
            items.append({"id": f"img{i:05d}",
                          "image": torch.randint(0, 256, (H, W, 3), generator=g, dtype=torch.uint8).numpy()})
            k = int(torch.randint(1, 4, (1,), generator=g))
            hyps[f"img{i:05d}"] = sorted(torch.randperm(C, generator=g)[:k].tolist())
        self.views = TrainViews(items, hyps, C, TrainTransform(crop, (2048, crop), (0.5, 2.0)), seed=0)
        self.opt = torch.optim.SGD(self.model.trainable_parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=5e-4)
        self.sync = harness.make_sync(device)
        self.data = self.views
        self.cache_seconds = None
        if path == "ours_cached":
            t0 = time.perf_counter()
            self.data = ours_feature_cache(self.model, self.views, cfg["batch"], device)
            self.sync()
            self.cache_seconds = time.perf_counter() - t0
        self.model.train()
        self.epoch = 0

    def warmup(self) -> None:  # one optimiser step (not a whole epoch)
        if self.path == "release":
            item = self.views[0]
            release_train_step(self.model, self.opt, item["image"].unsqueeze(0).to(self.device),
                               item["hyp"].nonzero().flatten().tolist())
        else:
            ours_train_first_step(self.model, self.opt, self.data, self.cfg["batch"], self.device)
        self.sync()

    def run(self) -> Dict[str, float]:
        self.epoch += 1
        t0 = time.perf_counter()
        if self.path == "release":
            release_train_epoch(self.model, self.opt, self.views, self.epoch, self.device)
        else:
            ours_train_epoch(self.model, self.opt, self.data, self.cfg["batch"], self.epoch, self.device)
        self.sync()
        return {"epoch": time.perf_counter() - t0}

    def extra(self) -> Dict[str, object]:
        out = {"n_images": self.cfg["n_images"], "crop": self.cfg["crop"],
               "batch": 1 if self.path == "release" else self.cfg["batch"]}
        if self.cache_seconds is not None:
            out["cache_build_seconds"] = self.cache_seconds
        return out


# ---------------------------------------------------------------------------------------------
# 3. hypotheses
# ---------------------------------------------------------------------------------------------
class HypSetup(Setup):
    """One image of ``cfg["image"]``; the timed region is ``cfg["region"]`` (top-left part of the
    image holding a subset of its windows, to bound CPU time) or the whole image."""

    def __init__(self, clip, cfg: dict, path: str, device: torch.device, text: torch.Tensor,
                 arch: str, amp: Optional[str], n_timed: int):
        from reclip_core.transforms import clip_input_size, window_boxes

        self.clip, self.cfg, self.path, self.device = clip, cfg, path, device
        self.text = text.to(device)
        g = torch.Generator().manual_seed(555)
        H, W = cfg["image"]
        self.image = torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8)
        self.window, self.stride = window_geometry(cfg["crop"])
        self.input_size = clip_input_size(clip)
        self.n_windows_image = len(window_boxes(H, W, self.window, self.stride))
        region = cfg.get("region")
        self.timed = self.image if region is None else self.image[:, :region[0], :region[1]]
        self.n_windows = len(window_boxes(self.timed.shape[-2], self.timed.shape[-1], self.window, self.stride))
        self.sync = harness.make_sync(device)
        self._first = None

    def _hypothesis(self, image: torch.Tensor):
        if self.path == "ours":
            return ours_hypothesis(self.clip, image, self.text, self.window, self.stride, self.input_size,
                                   batch_size=self.cfg["chunk"])
        return release_hypothesis(self.clip, image, self.text, self.window, self.stride, self.input_size)[0]

    def warmup(self) -> None:  # a corner of the image holding 2 × 2 windows
        side = self.window + self.stride
        self._hypothesis(self.image[:, :side, :side])
        self.sync()

    def run(self) -> Dict[str, float]:
        t0 = time.perf_counter()
        hyp = self._hypothesis(self.timed)
        self.sync()
        dt = time.perf_counter() - t0
        if self._first is None:
            self._first = {"hypothesis": hyp}
        return {"image": dt}

    def output(self):
        return self._first

    def extra(self) -> Dict[str, object]:
        return {"windows": self.n_windows, "windows_image": self.n_windows_image, "window": self.window,
                "stride": self.stride, "input_size": self.input_size, "image": list(self.cfg["image"]),
                "region": list(self.timed.shape[-2:]), "batch": self.cfg["chunk"]}


SETUPS = {"eval": EvalSetup, "train": TrainSetup, "hyp": HypSetup}


def amp_context(device: torch.device, amp: Optional[str]):
    if not amp:
        return contextlib.nullcontext()
    if amp != "bf16":
        raise ValueError(f"unknown amp mode {amp!r}; use 'bf16'.")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def run_one(row: str, path: str, mode: str, device: torch.device, repeats: Optional[int] = None,
            warmup: int = 1, amp: Optional[str] = None, cache_dir: Optional[Path] = None,
            clip=None) -> Dict[str, object]:
    """Set up and time one (row, path); returns timings, peak memory and extras."""
    cfg_all = dict(MODES[mode])
    over = cfg_all.get(device.type, {}) if device.type != "cpu" else {}
    cfg = dict(cfg_all[row], **over.get(row, {}))
    cfg_all["repeats"] = dict(cfg_all["repeats"], **over.get("repeats", {}))
    kind = ROW_KIND[row]
    if path not in PATHS[row]:
        raise ValueError(f"row {row!r} has paths {PATHS[row]}, not {path!r}.")
    load_start = harness.load_average()
    t_setup = time.perf_counter()
    if clip is None:
        clip = load_model(cfg_all["arch"], device)
    text = fixed_text(clip, cfg["dataset"], cfg_all["arch"], cache_dir)
    n_rep = repeats if repeats is not None else cfg_all["repeats"][row]
    setup = SETUPS[kind](clip, cfg, path, device, text, cfg_all["arch"], amp, n_rep)
    setup_seconds = time.perf_counter() - t_setup
    mem = harness.PeakMemory(device)
    timings: Dict[str, List[float]] = {}
    mem.start()
    with amp_context(device, amp):
        for _ in range(warmup):
            setup.warmup()
        for _ in range(getattr(setup, "passes", n_rep)):
            for k, v in setup.run().items():
                timings.setdefault(k, []).extend(v if isinstance(v, list) else [v])
    memory = mem.stop()
    extra = setup.extra()
    return {
        "row": row, "path": path, "mode": mode, "amp": amp, "device": str(device),
        "threads": torch.get_num_threads(), "repeats": n_rep, "warmup": warmup,
        "timings": timings, "stats": {k: harness.summarize(v) for k, v in timings.items()},
        "memory": memory, "extra": extra, "setup_seconds": setup_seconds,
        "load_start": load_start, "load_end": harness.load_average(),
        "output": setup.output(),
    }
