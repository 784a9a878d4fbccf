"""The benchmark rows: sizes per mode, and for each row a setup that builds the inputs of all its
paths outside the timed region; :func:`run_row` times the paths interleaved (so a change of load
on a shared machine hits both paths alike) and measures each path's peak memory.

Every worker seeds ``torch.manual_seed(0)`` before ``load_clip(arch, pretrained=None)`` and before
building the ReCLIP++ heads, so all paths of all rows share the same random weights.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from reclip_core import class_names
from reclip_core.metrics import SegMetric
from reclip_core.model import ReCLIPPP
from reclip_core.text import text_embeddings

from . import harness
from .ours import (ours_eval_image, ours_feature_cache, ours_hypothesis, ours_scorer, ours_train_epoch,
                   ours_train_first_step, window_geometry)
from .release_style import release_eval_image, release_hypothesis, release_train_epoch, release_train_step

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
        # the timed region 112×252 holds 3 × 8 = 24 of the image's 192 windows (CPU time bound)
        "hyp": {"dataset": "voc", "image": [375, 500], "crop": 336, "chunk": 64, "region": [112, 252]},
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


class RowSetup:
    """One row, ready to time: ``warmup(path)``, ``run(path) -> {name: seconds}``,
    ``extra(path) -> dict``, ``output(path)`` (a result to compare between paths, or None)."""

    paths: tuple = ()

    def warmup(self, path: str) -> None:
        self.run(path)

    def prepare(self, path: str) -> None:
        """Called before each timed run, outside its timing and its memory measurement."""

    def run(self, path: str) -> Dict[str, float]:
        raise NotImplementedError

    def extra(self, path: str) -> Dict[str, object]:
        return {}

    def output(self, path: str):
        return None

    def row_extra(self) -> Dict[str, object]:
        return {}


# ---------------------------------------------------------------------------------------------
# 1. evaluation
# ---------------------------------------------------------------------------------------------
class EvalSetup(RowSetup):
    """``1 + repeats`` labelled images of the original size ``cfg["image"]`` (resized to the test
    size inside). Image 0 is the warm-up (ours computes its bias map there, once per input size;
    it runs every operation of the release-style forward too); images 1.. are the timed rounds,
    every path on the same image in turn. One model: the release-style path never touches our
    cache. Two of ours: ``ours`` scores what the release scores (the ReCLIP++ head with PD),
    ``ours_all`` what ``evaluate_run`` scores (every head, PD off and on)."""

    paths = ("ours", "ours_all", "release")

    def __init__(self, clip, cfg: dict, device: torch.device, text: torch.Tensor, n_timed: int):
        self.clip, self.cfg, self.device = clip, cfg, device
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
        self.scorers = {"ours": ours_scorer(self.model, cfg["pd"], pd_variants=("pd",)),
                        "ours_all": ours_scorer(self.model, cfg["pd"], heads=None)}
        self.metrics = {"release": SegMetric(self.C)}
        self._tmp = tempfile.TemporaryDirectory(prefix="bench_preds_")
        self._next = {"ours": 0, "ours_all": 0, "release": 0}
        self._first: Dict[str, torch.Tensor] = {}
        self._events: List[tuple] = []
        self.roofline: List[dict] = []
        self.first_image: Dict[str, dict] = {}
        self._mm = None

    def _on_forward(self, path: str, event: str, tensor) -> None:
        self.sync()
        self._events.append((event, time.perf_counter()))
        if event == "end" and self._next[path] == 2 and path not in self._first:
            self._first[path] = tensor.detach().float().cpu()  # logits of image 1, the first timed one

    def warmup(self, path: str) -> None:
        if path == "release":
            # Ours' warm-up image has already run every operation of the release-style forward at
            # the same shapes (dense forward, Reference-prompt pass, positional feature, decoder);
            # a second warm-up would only cost time (~1 min at ADE size on 2 busy cores).
            self._next[path] = 1
            return
        self.first_image[path] = self.run(path)
        for by_tag in self.scorers[path].metrics.values():  # compare the paths over the timed images only
            for m in by_tag.values():
                m.reset()

    def prepare(self, path: str) -> None:
        if path == "ours":
            # This machine's matmul rate right before the forward: row 4 pairs the two, so a change
            # of load between them matters less. Outside the timed step and its memory.
            dtype = torch.bfloat16 if self.cfg.get("amp") == "bf16" else torch.float32
            self._mm = harness.matmul_gflops(self.device, repeats=3, dtype=dtype)

    def run(self, path: str) -> Dict[str, float]:
        i = self._next[path]
        self._next[path] += 1
        item = self.dataset[i]
        mm, self._mm = (self._mm, None) if i > 0 else (None, None)
        self._events = []
        t0 = time.perf_counter()
        if path != "release":
            ours_eval_image(self.scorers[path], item, self.cfg["test_size"], lambda e, t: self._on_forward(path, e, t))
        else:
            release_eval_image(self.model, item, self.cfg["test_size"], self.cfg["pd"], Path(self._tmp.name),
                               self.metrics["release"], lambda e, t: self._on_forward(path, e, t))
        self.sync()
        step = time.perf_counter() - t0
        (_, s), (_, e) = self._events
        if mm is not None:
            self.roofline.append({"forward_s": e - s, "matmul_gflops": mm["gflops"]})
        return {"forward": e - s, "step": step}

    def output(self, path: str):
        cm = self.metrics["release"] if path == "release" else self.scorers[path].metrics["reclip++"]["pd"]
        return {"logits": self._first.get(path), "confusion": torch.from_numpy(cm.confusion.copy())}

    def extra(self, path: str) -> Dict[str, object]:
        from reclip_core.transforms import keep_ratio_size

        H, W = self.cfg["image"]
        h, w = keep_ratio_size(H, W, 2048, self.cfg["test_size"])
        out: Dict[str, object] = {"classes": self.C, "image": [H, W], "input": [h, w],
                                  "test_size": self.cfg["test_size"], "warmup_image": self.first_image.get(path)}
        if path == "ours":
            out["flops_forward"] = harness.eval_forward_flops(self.clip, h, w, self.C)
            out["roofline"] = self.roofline
            out["matmul_dtype"] = "bf16" if self.cfg.get("amp") == "bf16" else "fp32"
            out["ideal_ratio"] = harness.ideal_eval_ratio(self.clip, h, w, self.C)
        elif path == "release":
            out["prediction_files"] = len(list(Path(self._tmp.name).iterdir()))
        return out


# ---------------------------------------------------------------------------------------------
# 2. training
# ---------------------------------------------------------------------------------------------
class TrainSetup(RowSetup):
    """N unlabeled images of ``cfg["image"]`` with random hypotheses and the library's label-free
    training views at the dataset's crop. Three copies of the same initial heads: ours in
    mini-batches through the library's training step, ours on the library's feature cache, and
    release-style at batch 1 with the per-class loop."""

    paths = ("ours", "ours_cached", "release")

    def __init__(self, clip, cfg: dict, device: torch.device, text: torch.Tensor, n_timed: int):
        from reclip_core.views import TrainViews
        from reclip_core.transforms import TrainTransform

        self.clip, self.cfg, self.device = clip, cfg, device
        C = len(class_names(cfg["dataset"]))
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
        self.models, self.opts, self.data = {}, {}, {}
        for path in self.paths:
            model = _heads(clip, cfg["dataset"], text, device)  # same seed: identical initial heads
            self.models[path] = model
            self.opts[path] = torch.optim.SGD(model.trainable_parameters(), lr=cfg["lr"], momentum=0.9,
                                              weight_decay=5e-4)
            self.data[path] = self.views
        self.sync = harness.make_sync(device)
        t0 = time.perf_counter()
        self.data["ours_cached"] = ours_feature_cache(self.models["ours_cached"], self.views, cfg["batch"], device)
        self.sync()
        self.cache_seconds = time.perf_counter() - t0
        self.epoch = {p: 0 for p in self.paths}

    def warmup(self, path: str) -> None:  # one optimiser step (not a whole epoch)
        model, opt = self.models[path], self.opts[path]
        if path == "release":
            model.train()
            item = self.views[0]
            release_train_step(model, opt, item["image"].unsqueeze(0).to(self.device),
                               item["hyp"].nonzero().flatten().tolist())
        else:
            ours_train_first_step(model, opt, self.data[path], self.cfg["batch"], self.device)
        self.sync()

    def run(self, path: str) -> Dict[str, float]:
        self.epoch[path] += 1
        model, opt = self.models[path], self.opts[path]
        t0 = time.perf_counter()
        if path == "release":
            release_train_epoch(model, opt, self.views, self.epoch[path], self.device)
        else:
            ours_train_epoch(model, opt, self.data[path], self.cfg["batch"], self.epoch[path], self.device)
        self.sync()
        return {"epoch": time.perf_counter() - t0}

    def extra(self, path: str) -> Dict[str, object]:
        cfg = self.cfg
        out = {"n_images": cfg["n_images"], "crop": cfg["crop"], "batch": 1 if path == "release" else cfg["batch"]}
        if path != "release":
            out["ideal_ratio"] = harness.ideal_train_ratio(self.clip, cfg["crop"], self.models[path].num_classes,
                                                           cfg["n_images"], cfg["batch"], path == "ours_cached")
        if path == "ours_cached":
            out["cache_build_seconds"] = self.cache_seconds
        return out


# ---------------------------------------------------------------------------------------------
# 3. hypotheses
# ---------------------------------------------------------------------------------------------
class HypSetup(RowSetup):
    """One image of ``cfg["image"]``; the timed region is ``cfg["region"]`` (top-left part of the
    image holding a subset of its windows, to bound CPU time) or the whole image."""

    paths = ("ours", "release")

    def __init__(self, clip, cfg: dict, device: torch.device, text: torch.Tensor, n_timed: int):
        from reclip_core.transforms import clip_input_size, window_boxes

        self.clip, self.cfg, self.device = clip, cfg, device
        self.text = text.to(device)
        g = torch.Generator().manual_seed(555)
        H, W = cfg["image"]
        # Blocks of random colour (28 px) so that windows see different content.
        cells = torch.randint(0, 256, (3, -(-H // 28), -(-W // 28)), generator=g, dtype=torch.uint8)
        self.image = cells.repeat_interleave(28, 1).repeat_interleave(28, 2)[:, :H, :W].contiguous()
        self.window, self.stride = window_geometry(cfg["crop"])
        self.input_size = clip_input_size(clip)
        self.n_windows_image = len(window_boxes(H, W, self.window, self.stride))
        region = cfg.get("region")
        self.timed = self.image if region is None else self.image[:, :region[0], :region[1]]
        self.n_windows = len(window_boxes(self.timed.shape[-2], self.timed.shape[-1], self.window, self.stride))
        self.sync = harness.make_sync(device)
        self._first: Dict[str, object] = {}

    def _hypothesis(self, path: str, image: torch.Tensor):
        if path == "ours":
            return ours_hypothesis(self.clip, image, self.text, self.window, self.stride, self.input_size,
                                   batch_size=self.cfg["chunk"])
        return release_hypothesis(self.clip, image, self.text, self.window, self.stride, self.input_size)[0]

    def warmup(self, path: str) -> None:  # a corner of the image holding 2 × 2 windows
        side = self.window + self.stride
        self._hypothesis(path, self.image[:, :side, :side])
        self.sync()

    def run(self, path: str) -> Dict[str, float]:
        t0 = time.perf_counter()
        hyp = self._hypothesis(path, self.timed)
        self.sync()
        dt = time.perf_counter() - t0
        self._first.setdefault(path, {"hypothesis": hyp})
        return {"image": dt}

    def output(self, path: str):
        return self._first.get(path)

    def extra(self, path: str) -> Dict[str, object]:
        return {"windows": self.n_windows, "windows_image": self.n_windows_image, "window": self.window,
                "stride": self.stride, "input_size": self.input_size, "image": list(self.cfg["image"]),
                "region": list(self.timed.shape[-2:]), "batch": self.cfg["chunk"] if path == "ours" else 1,
                "ideal_ratio": 1.0}


SETUPS = {"eval": EvalSetup, "train": TrainSetup, "hyp": HypSetup}


def amp_context(device: torch.device, amp: Optional[str]):
    if not amp:
        return contextlib.nullcontext()
    if amp != "bf16":
        raise ValueError(f"unknown amp mode {amp!r}; use 'bf16'.")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def run_row(row: str, mode: str, device: torch.device, repeats: Optional[int] = None,
            amp: Optional[str] = None, cache_dir: Optional[Path] = None, clip=None) -> Dict[str, object]:
    """Set up one row and time all its paths, interleaved: one warm-up per path, then ``repeats``
    rounds in which every path runs once (the order alternates between rounds). Peak memory of a
    path is measured over its first timed run, from a trimmed heap. Returns per-path timings,
    memory, extras and outputs, and the per-round ratios release-style / ours."""
    if row not in ROW_KIND:
        raise ValueError(f"unknown row {row!r}; valid rows: {', '.join(ROW_KIND)}.")
    cfg_all = dict(MODES[mode])
    over = cfg_all.get(device.type, {}) if device.type != "cpu" else {}
    cfg = dict(cfg_all[row], **over.get(row, {}), amp=amp)
    reps = dict(cfg_all["repeats"], **over.get("repeats", {}))
    n_rep = repeats if repeats is not None else reps[row]
    load_start = harness.load_average()
    t_setup = time.perf_counter()
    if clip is None:
        clip = load_model(cfg_all["arch"], device)
    text = fixed_text(clip, cfg["dataset"], cfg_all["arch"], cache_dir)
    setup = SETUPS[ROW_KIND[row]](clip, cfg, device, text, n_rep)
    setup_seconds = time.perf_counter() - t_setup
    paths = setup.paths
    timings: Dict[str, Dict[str, List[float]]] = {p: {} for p in paths}
    memory: Dict[str, dict] = {}
    loads: Dict[str, List] = {p: [] for p in paths}
    with amp_context(device, amp):
        for p in paths:
            setup.warmup(p)
        for r in range(n_rep):
            for p in (paths if r % 2 == 0 else tuple(reversed(paths))):
                loads[p].append(harness.load_average())
                setup.prepare(p)
                if r == 0:
                    harness.trim_heap()
                    mem = harness.PeakMemory(device)
                    mem.start()
                for k, v in setup.run(p).items():
                    timings[p].setdefault(k, []).append(v)
                if r == 0:
                    memory[p] = mem.stop()
    out_paths = {}
    for p in paths:
        out_paths[p] = {"timings": timings[p], "stats": {k: harness.summarize(v) for k, v in timings[p].items()},
                        "memory": memory.get(p), "extra": setup.extra(p), "output": setup.output(p),
                        "load": [x[0] if x else None for x in loads[p]]}
    rounds = {}
    for p in paths:
        if p == "release":
            continue
        rounds[p] = {k: [rv / ov for rv, ov in zip(timings["release"][k], timings[p][k])] for k in timings[p]}
    return {"row": row, "mode": mode, "amp": amp, "device": str(device), "threads": torch.get_num_threads(),
            "repeats": n_rep, "setup_seconds": setup_seconds, "paths": out_paths, "round_ratios": rounds,
            "load_start": load_start, "load_end": harness.load_average()}
