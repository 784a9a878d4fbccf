"""``python -m data_prep <voc|context|ade|cityscapes|coco_stuff27|toyworld> ...``"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import DATASETS

CITYSCAPES_HELP = """\
Cityscapes needs an account (https://www.cityscapes-dataset.com/register/). Either
download in the browser after logging in:
  gtFine_trainvaltest.zip       (241 MB)  https://www.cityscapes-dataset.com/file-handling/?packageID=1
  leftImg8bit_trainvaltest.zip  (11 GB)   https://www.cityscapes-dataset.com/file-handling/?packageID=3
or with wget and a session cookie:
  wget --keep-session-cookies --save-cookies=cookies.txt \\
       --post-data 'username=USER&password=PASS&submit=Login' https://www.cityscapes-dataset.com/login/
  wget --load-cookies cookies.txt --content-disposition -c \\
       'https://www.cityscapes-dataset.com/file-handling/?packageID=1'
  wget --load-cookies cookies.txt --content-disposition -c \\
       'https://www.cityscapes-dataset.com/file-handling/?packageID=3'
then put both zips in one folder and run:
  python -m data_prep cityscapes --root data/cityscapes --archives /path/to/that/folder
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Fetch, verify, extract and convert a benchmark into the layout the "
                    "reclip_core readers use (see docs/datasets.md). "
                    "`python -m data_prep toyworld ...` runs the toy-world generator instead.",
        epilog=CITYSCAPES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=list(DATASETS) + ["toyworld"])
    p.add_argument("--root", default=None, help="dataset root to create (default: data/<dataset>)")
    p.add_argument("--source", choices=["official", "hf"], default="official",
                   help="official archives (default) or a faithful Hugging Face copy (ADE20K only)")
    p.add_argument("--archives", default=None, metavar="DIR",
                   help="folder holding archives you downloaded yourself (required for Cityscapes); "
                        "they are verified in place, not copied")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where downloads go (default: <root>/downloads)")
    p.add_argument("--remove-raw", action="store_true",
                   help="delete <root>/raw after conversion (images are hard-linked, so they stay)")
    p.add_argument("--require-checksum", action="store_true",
                   help="refuse archives with no recorded checksum instead of pinning the first download")
    p.add_argument("--force", action="store_true", help="redo the conversion even if the manifest is current")
    p.add_argument("--limit", type=int, default=None,
                   help="convert only the first N images per split (a quick check; the manifest says so)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--max-expansion", type=float, default=None, metavar="R",
                   help="refuse archives expanding to more than R times their size (default 50: a zip bomb)")
    p.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="give up a download that has not finished after S seconds (default: by its size, "
                        "at least 16 KiB/s on average)")
    p.add_argument("--registry", default=None, metavar="FILE",
                   help="archive registry to use instead of data_prep/archives.yaml (mirrors, tests)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "toyworld":
        from . import toyworld  # written separately; imported only when asked for

        return toyworld.main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    from .download import ChecksumError, DownloadError
    from .extract import UnsafeArchiveError
    from .prepare import prepare

    root = args.root or f"data/{args.dataset}"
    import os

    from .extract import EXPANSION_ENV
    from .pace import DEADLINE_ENV

    for env, value in ((EXPANSION_ENV, args.max_expansion), (DEADLINE_ENV, args.max_seconds)):
        if value is not None:  # read where the archives are fetched and extracted
            if not value > 0:
                print(f"error: {'--max-expansion' if env == EXPANSION_ENV else '--max-seconds'} must be positive.",
                      file=sys.stderr)
                return 2
            os.environ[env] = str(value)
    try:
        prepare(args.dataset, root, source=args.source, archives_dir=args.archives, cache_dir=args.cache_dir,
                progress=not args.no_progress, keep_raw=not args.remove_raw,
                allow_unpinned=not args.require_checksum, force=args.force, limit=args.limit,
                registry=args.registry)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        if args.dataset == "cityscapes":
            print("\n" + CITYSCAPES_HELP, file=sys.stderr)
        return 2
    except (ChecksumError, DownloadError, UnsafeArchiveError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
