"""Where the suite's own files are: the repository root, the walk-through notebooks and the results tree.

``$RECLIP_RESULTS`` redirects every output (tests run the notebooks without touching the committed
``results/``). Read once, at import, as every module that writes results always has.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
RESULTS_DIR = Path(os.environ.get("RECLIP_RESULTS", ROOT / "results"))


def notebooks(directory: Path = NOTEBOOK_DIR) -> List[Path]:
    """The numbered walk-through notebooks (01_… to 06_…), in order."""
    found = sorted(Path(directory).glob("0[1-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no numbered notebooks in {directory}; is this a full checkout?")
    return found


__all__ = ("ROOT", "NOTEBOOK_DIR", "RESULTS_DIR", "notebooks")
