"""Build the toy world: ``python -m data_prep.toyworld --preset biased`` (``make toy-world``).

The generator is the library's (``reclip_core.datasets.toyworld_render.build_world``); this
script only parses the command line::

    python -m data_prep.toyworld --preset biased            # all splits of the default preset
    python -m data_prep.toyworld --preset uniform --splits val train
"""
from __future__ import annotations

import argparse
import sys

from reclip_core.datasets.toyworld import SPLITS
from reclip_core.datasets.toyworld_render import build_world


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the toy world (seeded, deterministic scenes with injected biases).")
    ap.add_argument("--preset", default="biased", help="preset name or YAML path (biased)")
    ap.add_argument("--root", default=None, help="cache root (default data/toyworld or "
                    "$RECLIP_TOYWORLD_ROOT)")
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    ap.add_argument("--force", action="store_true", help="regenerate existing splits")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        wdir = build_world(args.preset, root=args.root, splits=args.splits, force=args.force,
                           progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(wdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
