"""Dataset preparation: ``python -m data_prep <dataset> --root DIR``.

Fetches the official archives (verified against recorded checksums, resumable),
extracts them safely, converts the evaluation labels and writes a manifest; see
``docs/datasets.md``. Public pieces:

* :mod:`data_prep.download` - registry (``archives.yaml``), :func:`fetch`, checksums
* :mod:`data_prep.extract`  - :func:`safe_extract` (no path traversal, no escaping links)
* :mod:`data_prep.convert`  - label conversions and their data tables
* :mod:`data_prep.prepare`  - the per-dataset pipelines, :func:`prepare`
* :mod:`data_prep.hf`       - ``--source hf`` (faithful Hugging Face copies only)
"""
from __future__ import annotations

from reclip_core.datasets.names import BENCHMARK_NAMES as DATASETS  # the library's list (no torch import)


def prepare(*args, **kwargs):
    """See :func:`data_prep.prepare.prepare` (imported lazily)."""
    from .prepare import prepare as _prepare

    return _prepare(*args, **kwargs)


__all__ = ["DATASETS", "prepare"]
