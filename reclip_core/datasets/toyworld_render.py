"""The toy-world generator: seeded, deterministic scenes with injected biases.

Each image is 64x64 RGB (``image_size`` in the preset) on a textured, noisy, low-saturation
background, with 1-3 objects of distinct classes (a class = shape x colour, e.g. "red circle"),
random size, position, rotation and colour jitter; a pixel mask (0 = background, i+1 = class i;
objects drawn later occlude earlier ones, and every object keeps at least ``min_visible`` of its
pixels) and a caption naming the visible objects ("a photo of a red circle and a blue star.").

Per split, the preset sets class frequencies (class-preference bias) and per-class regions for
the object centre (space-preference bias); see ``reclip_core/presets/toyworld_biased.yaml``.

Determinism: image ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed,
splits.s.seed, i])`` only, so it does not depend on the split size, on other images or on the
machine; the first n images of a bigger world equal a world of size n, and two presets that agree
on everything a split uses produce identical images for that split.

Storage: Hugging Face ``datasets`` saved to disk under ``<root>/<name>-<hash>/<split>/`` (see
``reclip_core.datasets.toyworld``), built only when missing; each split is written to a temporary
folder and renamed into place, so an interrupted build leaves nothing half-written.

The command line is ``python -m data_prep.toyworld`` (``make toy-world``).
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..atomic_io import atomic_write_json
from .toyworld_presets import (
    GENERATOR_VERSION,
    SPLITS,
    default_root,
    load_preset,
    preset_hash,
    world_dir,
)

SPLIT_CODES = {"pretrain": 0, "train": 1, "val": 2}


# --------------------------------------------------------------------------------------------
# shapes
def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    """Vertices of ``shape`` with circumradius ``r`` centred at (cx, cy), rotated by ``angle``
    (radians). A circle is returned as a 48-gon."""
    def ring(radii, n, phase=0.0):
        return [(cx + radii[k % len(radii)] * math.cos(angle + phase + 2 * math.pi * k / n),
                 cy + radii[k % len(radii)] * math.sin(angle + phase + 2 * math.pi * k / n))
                for k in range(n)]

    if shape == "circle":
        return ring([r], 48)
    if shape == "square":
        return ring([r], 4, math.pi / 4)
    if shape == "triangle":
        return ring([r], 3, -math.pi / 2)
    if shape == "hexagon":
        return ring([r], 6)
    if shape == "diamond":
        return ring([r, 0.55 * r], 4)
    if shape == "star":
        return ring([r, 0.45 * r], 10, -math.pi / 2)
    if shape == "cross":
        a = 0.36 * r
        pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r),
               (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean (size, size) raster of the shape (no anti-aliasing: mask == drawn pixels)."""
    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).polygon(shape_polygon(shape, cx, cy, r, angle), fill=1)
    return np.asarray(im, dtype=bool)


# --------------------------------------------------------------------------------------------
# one scene
def _background(rng: np.random.Generator, size: int, cfg: Mapping[str, Any]) -> np.ndarray:
    base = rng.uniform(*cfg["grey"]) + rng.normal(0, cfg["tint_std"], 3)
    cells = int(rng.integers(cfg["blob_cells"][0], cfg["blob_cells"][1] + 1))
    coarse = rng.normal(0, cfg["blob_std"], (cells, cells)).astype(np.float32)
    # bilinear upsampling of a coarse grid -> smooth texture (shared by the 3 channels, so it
    # changes brightness, not hue)
    tex = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    img = base[None, None, :] + tex[:, :, None]
    if rng.random() < cfg["stripe_prob"]:
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(4, 12)
        yy, xx = np.mgrid[0:size, 0:size]
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period
        img = img + cfg["stripe_amp"] * np.sin(phase)[:, :, None]
    return img.astype(np.float32)


def _class_probs(preset: Mapping[str, Any], split: str) -> np.ndarray:
    names = [c["name"] for c in preset["classes"]]
    weights = preset["splits"][split].get("class_weights") or {}
    w = np.array([float(weights.get(n, 1.0)) for n in names])
    return w / w.sum()


def _region(preset, split, cname) -> dict:
    return (preset["splits"][split].get("positions") or {}).get(cname) or {}


def _centre_range(preset, split, cname, r, size, axis, anywhere=False):
    """Allowed interval of the object centre along ``axis`` ('x' or 'y'); the whole image when
    the class has no region in this split or when ``anywhere``."""
    lo, hi = r, size - r
    region = _region(preset, split, cname).get(axis)
    if region is None or anywhere:
        return lo, hi
    a, b = region
    return lo + a * (hi - lo), lo + b * (hi - lo)


def render_scene(preset: Mapping[str, Any], split: str, index: int) -> dict:
    """Generate image ``index`` of ``split``: a dict with ``image`` (uint8 HxWx3), ``mask``
    (uint8 HxW, 0 = background, i+1 = class i), ``caption`` and ``objects`` (visible objects in
    drawing order: class (0-based), cx, cy, radius, angle)."""
    size = int(preset["image_size"])
    scale = size / 64.0
    ocfg = preset["objects"]
    jit = ocfg["colour_jitter"]
    classes = preset["classes"]
    rng = np.random.default_rng([int(preset["seed"]), int(preset["splits"][split]["seed"]),
                                 SPLIT_CODES[split], int(index)])

    img = _background(rng, size, preset["background"])
    n_obj = int(rng.integers(ocfg["count"][0], ocfg["count"][1] + 1))
    chosen = rng.choice(len(classes), size=n_obj, replace=False, p=_class_probs(preset, split))

    label = np.zeros((size, size), dtype=np.uint8)
    placed: list[dict] = []          # visible objects so far, with their full-area pixel count
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for cls in chosen:
        cdef = classes[int(cls)]
        # a class with a region is placed anywhere with probability `outside` (one draw per
        # object, and only for such classes, so other classes' random streams are unchanged)
        outside = float(_region(preset, split, cdef["name"]).get("outside", 0.0))
        anywhere = bool(outside > 0 and rng.random() < outside)
        ok = None
        for _ in range(int(ocfg["placement_tries"])):
            r = rng.uniform(*ocfg["radius"]) * scale
            cx = rng.uniform(*_centre_range(preset, split, cdef["name"], r, size, "x", anywhere))
            cy = rng.uniform(*_centre_range(preset, split, cdef["name"], r, size, "y", anywhere))
            angle = rng.uniform(0, 2 * math.pi)
            m = shape_mask(cdef["shape"], size, cx, cy, r, angle)
            if m.sum() < 4:
                continue
            # the new object goes on top: every earlier object must stay visible enough
            if all(((label == o["value"]) & ~m).sum() >= ocfg["min_visible"] * o["area"]
                   for o in placed):
                ok = (r, cx, cy, angle, m)
                break
        if ok is None:
            continue                  # no room: the object is left out (and not captioned)
        r, cx, cy, angle, m = ok
        colour = np.asarray(cdef["colour"], np.float32) * rng.uniform(*jit["brightness"])
        colour = colour + rng.normal(0, jit["channel_std"], 3)
        phi = rng.uniform(0, 2 * math.pi)
        shade = 1 + jit["shading"] * ((xx - cx) * math.cos(phi) + (yy - cy) * math.sin(phi)) / r
        obj = colour[None, None, :] * shade[:, :, None]
        obj = obj + rng.normal(0, jit["pixel_std"], (size, size, 3))
        img[m] = obj[m]
        label[m] = int(cls) + 1
        placed.append({"value": int(cls) + 1, "area": int(m.sum()), "class": int(cls),
                       "cx": float(cx), "cy": float(cy), "radius": float(r),
                       "angle": float(angle)})

    img = img + rng.normal(0, preset["background"]["pixel_std"], img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    names = [classes[o["class"]]["name"] for o in placed]
    order = rng.permutation(len(names))
    templates = preset["captions"]["templates"]
    template = templates[int(rng.integers(len(templates)))]
    caption = template.format(" and ".join(names[k] for k in order))
    objects = [{k: o[k] for k in ("class", "cx", "cy", "radius", "angle")} for o in placed]
    return {"image": img, "mask": label, "caption": caption, "objects": objects}


# --------------------------------------------------------------------------------------------
# datasets on disk
def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def features():
    import datasets  # lazy: Hugging Face datasets takes ~0.9 s to import; only world building needs it

    return datasets.Features({
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "mask": datasets.Image(),
        "caption": datasets.Value("string"),
        "objects": [{                      # a list of structs, one per visible object
            "class": datasets.Value("int32"),
            "cx": datasets.Value("float32"),
            "cy": datasets.Value("float32"),
            "radius": datasets.Value("float32"),
            "angle": datasets.Value("float32"),
        }],
    })


def _records(preset: Mapping[str, Any], split: str, indices: Iterable[int],
             progress: bool = False) -> Iterator[dict]:
    it = indices
    if progress:
        it = tqdm(list(indices), desc=f"toyworld {preset['name']}/{split}", unit="img",
                  mininterval=2.0)
    for i in it:
        s = render_scene(preset, split, i)
        yield {"id": f"{split}-{i:06d}",
               "image": {"bytes": _png(s["image"]), "path": None},
               "mask": {"bytes": _png(s["mask"]), "path": None},
               "caption": s["caption"],
               "objects": s["objects"]}


def _gen(preset, split, indices, progress):  # module-level for datasets.from_generator
    yield from _records(preset, split, indices, progress)


def build_world(preset: str | os.PathLike | Mapping[str, Any] = "biased",
                root: str | os.PathLike | None = None,
                splits: Iterable[str] | None = None,
                sizes: Mapping[str, int] | None = None,
                force: bool = False, progress: bool = True) -> Path:
    """Generate the missing splits of ``preset`` under ``root`` and return the world folder.

    ``sizes`` overrides split sizes (e.g. small worlds in tests); the override is part of the
    preset content, hence of the hash and the folder name. Existing splits are reused unless
    ``force``."""
    p = load_preset(preset)
    for split, n in (sizes or {}).items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} in sizes; use {SPLITS}")
        p["splits"][split]["size"] = int(n)
    splits = list(splits) if splits is not None else list(SPLITS)
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"unknown toy-world split {s!r}; use one of {SPLITS}")
    root = Path(root) if root is not None else default_root()
    wdir = world_dir(p, root)
    wdir.mkdir(parents=True, exist_ok=True)
    meta_path = wdir / "world.json"
    meta = {"preset": p, "preset_name": p["name"], "hash": preset_hash(p),
            "generator_version": GENERATOR_VERSION, "splits": {}}
    if meta_path.is_file():
        meta["splits"] = json.loads(meta_path.read_text()).get("splits", {})
    import datasets  # lazy: Hugging Face datasets takes ~0.9 s to import; only world building needs it

    if not progress:
        datasets.disable_progress_bars()
    for split in splits:
        final = wdir / split
        if (final / "dataset_info.json").is_file() and not force:
            continue
        n = int(p["splits"][split]["size"])
        t0 = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=f".{split}-tmp-", dir=wdir))
        try:
            ds = datasets.Dataset.from_generator(
                _gen, features=features(), cache_dir=str(tmp / "cache"),
                gen_kwargs={"preset": p, "split": split, "indices": range(n),
                            "progress": progress})
            ds.save_to_disk(str(tmp / "out"))
            del ds
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp / "out", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        meta["splits"][split] = {"size": n, "seconds": round(time.time() - t0, 1)}
        atomic_write_json(meta_path, meta)
    if not meta_path.is_file():
        atomic_write_json(meta_path, meta)
    return wdir
