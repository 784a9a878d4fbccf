"""Write toy-world images (and their labels) as plain files in the ``folder`` dataset's layout.

    python -m data_prep.export_folder --out DIR --n 40 [--preset biased] [--split val] [--groups 2]

gives ``DIR/<id>.png`` (or ``DIR/group<k>/<id>.png`` with ``--groups``), ``DIR/labels/<id>.png``
(8-bit, value i = class i, 255 = ignore; labelled splits only, unless ``--no-labels``),
``DIR/classes.txt`` (one class per line) and ``DIR/export.json``. The writer is the library's
``reclip_core.datasets.toyworld_export.export_toy_folder``; this is its command line.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from reclip_core.datasets.toyworld_export import FORMATS, export_toy_folder


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep.export_folder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to write (created; an equal export is reused)")
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
        out = export_toy_folder(args.out, args.n, args.preset, args.split, args.root, not args.no_labels,
                                args.groups, args.fmt)
    except (ValueError, FileNotFoundError) as err:  # StaleFileError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    extra = ", labels/" if not args.no_labels and args.split == "val" else ""
    print(f"wrote {args.n} images to {out} (classes.txt{extra})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
