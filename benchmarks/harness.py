"""Measurement helpers: machine description, timing statistics, peak memory, FLOP counts and the
matmul roofline of this machine."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from reclip_core.machine import cpu_model


# ---------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------
def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: torch.device) -> Dict[str, object]:
    import open_clip

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "?"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "load_average": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def make_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def summarize(times: Sequence[float]) -> Dict[str, float]:
    """Median, min, max, quartiles (when there are ≥ 4 values) and n of a list of seconds."""
    times = sorted(float(t) for t in times)
    if not times:
        raise ValueError("no timings to summarize; repeats must be >= 1.")
    out = {"median": statistics.median(times), "min": times[0], "max": times[-1], "n": len(times)}
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4, method="inclusive")
        out["q1"], out["q3"] = q[0], q[2]
    return out


# ---------------------------------------------------------------------------------------------
# Peak memory (process RSS on CPU, the caching allocator on CUDA)
# ---------------------------------------------------------------------------------------------
def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of what runs between :meth:`start` and :meth:`stop`, above what was resident
    at :meth:`start`.

    CPU: the Linux peak-RSS counter (VmHWM) is reset at ``start`` (``/proc/self/clear_refs``);
    where that is not possible, ``resource.getrusage(...).ru_maxrss`` is used (a lower bound when
    setup had a higher peak). CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at
    ``start``. Meant to run in a fresh process per measured path (the benchmark's workers), so no
    other path's allocations are cached in the heap.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ""
        self._base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return
        rss = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            self.method = "VmHWM (reset) - VmRSS at start"
            self._base = rss or 0
        except OSError:
            import resource

            self.method = "ru_maxrss delta (lower bound)"
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def stop(self) -> Dict[str, object]:
        """{"peak_mb": peak above the start, "base_mb": resident at start, "method": how}."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return {"peak_mb": peak / 2**20, "base_mb": self._base / 2**20, "method": self.method}
        if self.method.startswith("VmHWM"):
            hwm = _status_kb("VmHWM") or 0
            return {"peak_mb": max(0, hwm - self._base) / 1024, "base_mb": self._base / 1024, "method": self.method}
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_mb": max(0, peak - self._base) / 1024, "base_mb": self._base / 1024, "method": self.method}


# ---------------------------------------------------------------------------------------------
# FLOPs (analytic; one multiply-add = 2 FLOPs)
# ---------------------------------------------------------------------------------------------
def _vit_dims(clip) -> Dict[str, int]:
    visual = clip.visual
    ps = visual.patch_size
    ps = ps if isinstance(ps, int) else ps[0]
    blocks = visual.transformer.resblocks
    width = visual.transformer.width
    hidden = blocks[0].mlp.c_fc.out_features
    out_dim = visual.proj.shape[1] if visual.proj is not None else width
    return {"patch": ps, "layers": len(blocks), "width": width, "hidden": hidden, "out_dim": out_dim}


def dense_forward_flops(clip, height: int, width: int) -> int:
    """FLOPs of ``dense_features`` on one [3, H, W] image (zero-padded to the patch size): patch
    embedding, the full blocks (Q/K/V/out projections, attention scores and weighted sum, MLP) on
    1 + h·w tokens, the value-only last block on the h·w patches, and the visual projection.
    Element-wise ops (LayerNorm, GELU, softmax) are not counted."""
    d = _vit_dims(clip)
    p, L, c, m, D = d["patch"], d["layers"], d["width"], d["hidden"], d["out_dim"]
    h, w = -(-height // p), -(-width // p)
    hw = h * w
    n = hw + 1
    flops = 2 * hw * c * 3 * p * p                           # patch embedding
    per_block = 2 * n * (4 * c * c + 2 * c * m) + 4 * n * n * c  # projections + MLP + attention
    flops += (L - 1) * per_block
    flops += 2 * hw * (2 * c * c + 2 * c * m)                 # last block: value, out-proj, MLP
    flops += 2 * hw * c * D                                   # visual projection
    return int(flops)


def eval_forward_flops(clip, height: int, width: int, num_classes: int, kernel: int = 5) -> int:
    """FLOPs of our cached-bias evaluation forward: dense features, CLIP logits (h·w·D·C) and the
    decoder's k×k convolution ((D + C) → C); the bias map is cached."""
    d = _vit_dims(clip)
    p, D = d["patch"], d["out_dim"]
    hw = (-(-height // p)) * (-(-width // p))
    return dense_forward_flops(clip, height, width) + 2 * hw * D * num_classes \
        + 2 * hw * (D + num_classes) * num_classes * kernel * kernel


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5, dtype=torch.float32) -> Dict[str, float]:
    """This machine's measured dense matmul rate (n×n @ n×n) in GFLOP/s: median of ``repeats``
    after one warm-up, with the same thread settings as the benchmarks."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = make_sync(device)
    a @ b
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    s = summarize(times)
    flops = 2.0 * n ** 3
    return {"gflops": flops / s["median"] / 1e9, "gflops_min": flops / s["max"] / 1e9,
            "gflops_max": flops / s["min"] / 1e9, "n": n}


def text_encoder_flops(clip, n_prompts: int) -> int:
    """FLOPs of ``n_prompts`` full-context passes of the CLIP text encoder (the Reference prompt
    runs C of them): projections, attention products and MLP on all context tokens, plus the
    final projection of the read-out token."""
    blocks = clip.transformer.resblocks
    c = clip.transformer.width
    m = blocks[0].mlp.c_fc.out_features
    n = clip.context_length
    proj = clip.text_projection
    D = proj.shape[1] if isinstance(proj, torch.Tensor) else getattr(proj, "out_features", c)
    per = len(blocks) * (2 * n * (4 * c * c + 2 * c * m) + 4 * n * n * c) + 2 * c * D
    return int(n_prompts * per)


def bias_flops(clip, hw: int, num_classes: int) -> int:
    """Positional feature (1×1 conv width → D on h·w positions) and the bias map (h·w·D·C)."""
    d = _vit_dims(clip)
    return 2 * hw * d["width"] * d["out_dim"] + 2 * hw * d["out_dim"] * num_classes


def grid(clip, height: int, width: int) -> int:
    p = _vit_dims(clip)["patch"]
    return (-(-height // p)) * (-(-width // p))


def ideal_eval_ratio(clip, height: int, width: int, num_classes: int) -> float:
    """FLOPs of a release-style evaluation forward over ours (bias cached)."""
    ours = eval_forward_flops(clip, height, width, num_classes)
    extra = text_encoder_flops(clip, num_classes) + bias_flops(clip, grid(clip, height, width), num_classes)
    return (ours + extra) / ours


def train_step_flops(clip, crop: int, num_classes: int, batch: int, cached: bool) -> int:
    """≈ FLOPs of one training step on ``batch`` views: dense features (none when cached), CLIP
    logits and decoder per view, one Reference-prompt pass + positional feature + bias map per step,
    and a backward ≈ the forward of the trainable path (input gradients through the frozen text
    encoder, weight and input gradients of the decoder)."""
    hw = grid(clip, crop, crop)
    D = _vit_dims(clip)["out_dim"]
    C = num_classes
    dense = 0 if cached else dense_forward_flops(clip, crop, crop)
    per_view = 2 * hw * D * C + 2 * hw * (D + C) * C * 25
    shared = text_encoder_flops(clip, C) + bias_flops(clip, hw, C)
    return batch * (dense + per_view) + shared + (shared + batch * 2 * per_view)


def ideal_train_ratio(clip, crop: int, num_classes: int, n_images: int, batch: int, cached: bool) -> float:
    release = n_images * train_step_flops(clip, crop, num_classes, 1, False)
    ours = -(-n_images // batch) * train_step_flops(clip, crop, num_classes, batch, cached)
    return release / ours


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``) so that the resident set
    before the next measured path is its true baseline. No-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
