"""Write toy-world images (and their labels) as plain files in the ``folder`` dataset's layout.

    python -m data_prep.export_folder --out DIR --n 40 [--preset biased] [--split val] [--groups 2]

gives ``DIR/<id>.png`` (or ``DIR/group<k>/<id>.png`` with ``--groups``), ``DIR/labels/<id>.png``
(8-bit, value i = class i, 255 = ignore; labelled splits only, unless ``--no-labels``) and
``DIR/classes.txt`` (one class per line). It is a folder of "your own images" whose truth is known:
the tests and docs/your-images.md run hypothesis → train → evaluate → segment on it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

FORMATS = ("png", "jpg", "webp")


def export_folder(out: os.PathLike, n: int, preset: str = "biased", split: str = "val",
                  root: Optional[os.PathLike] = None, labels: bool = True, groups: int = 1,
                  fmt: str = "png") -> Path:
    """Export the first ``n`` images of a toy-world split into ``out`` (module doc); returns ``out``.

    The world is generated first when it is not built yet (``ToyWorld(build=True)``)."""
    from reclip_core.datasets.toyworld import ToyWorld

    if n < 1 or groups < 1:
        raise ValueError(f"--n and --groups must be >= 1, got {n} and {groups}.")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}.")
    world = ToyWorld(split, preset=preset, root=root)
    if n > len(world):
        raise ValueError(f"the toy-world {split} split has {len(world)} images, fewer than --n {n}; lower --n.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        item = world[i]
        rel = f"group{i % groups}/{item['id']}" if groups > 1 else str(item["id"])
        img_path = out / f"{rel}.{fmt}"
        img_path.parent.mkdir(parents=True, exist_ok=True)
        item["image"].save(img_path, **({"quality": 95} if fmt == "jpg" else {}))
        if labels and "label" in item:
            lab_path = out / "labels" / f"{rel}.png"
            lab_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(item["label"]).astype(np.uint8), mode="L").save(lab_path)
    (out / "classes.txt").write_text("\n".join(world.class_names) + "\n", encoding="utf-8")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep.export_folder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to write (created)")
    ap.add_argument("--n", type=int, default=40, help="number of images (default 40)")
    ap.add_argument("--preset", default="biased", help="toy-world preset name or YAML path (default biased)")
    ap.add_argument("--root", default=None, help="toy-world cache root (default data/toyworld)")
    ap.add_argument("--split", default="val", choices=("train", "val"),
                    help="toy-world split (default val, the labelled one; train has no labels)")
    ap.add_argument("--groups", type=int, default=1, help="spread the images over this many subfolders")
    ap.add_argument("--format", dest="fmt", default="png", choices=FORMATS, help="image file format")
    ap.add_argument("--no-labels", action="store_true", help="write no labels/ folder")
    args = ap.parse_args(argv)
    try:
        out = export_folder(args.out, args.n, args.preset, args.split, args.root, not args.no_labels,
                            args.groups, args.fmt)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    extra = ", labels/" if not args.no_labels and args.split == "val" else ""
    print(f"wrote {args.n} images to {out} (classes.txt{extra})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
