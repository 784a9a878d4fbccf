"""Class lists: the shipped list of each dataset, and a class-name file of your own.

The method only needs names (``text.validate_class_names`` checks them); where they come from is
the pipeline's business: ``reclip_core/class_names/<dataset>.txt``, the toy world's preset,
or a text file with one class per line and optional comma-separated synonyms.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Union

from ..cli_errors import not_a_file
from ..config_schema import CLASS_NAME_SETS
from ..text import SYNONYM_SEPARATOR, validate_class_names
from .names import BENCHMARK_NAMES
from .toyworld_presets import toyworld_class_names

# one file per dataset, line i = class i (data, not code); release/ holds the release's exact strings
CLASS_NAME_DIR = Path(__file__).resolve().parent.parent / "class_names"
#: the datasets with a shipped class list
DATASETS = BENCHMARK_NAMES + ("toyworld",)


def class_names(dataset: str, source: str = "project") -> List[str]:
    """The class list of a dataset in the release's evaluation order.

    ``source="project"``: the project's names (``class_names/<dataset>.txt``). ``source="release"``:
    the exact strings of the authors' release (``class_names/release/<dataset>.txt``), which differ
    in a few names ("airplane" for "aeroplane", COCO-Stuff's "food things"...). The Reference prompt
    tokenizes the names and the text features encode them, so a released checkpoint only means
    what it was trained for with these strings.
    """
    if source not in CLASS_NAME_SETS:
        raise ValueError(f"unknown class-name source {source!r}; valid: {', '.join(CLASS_NAME_SETS)}.")
    if dataset == "toyworld" and source == "project":
        return toyworld_class_names()
    folder = CLASS_NAME_DIR if source == "project" else CLASS_NAME_DIR / "release"
    path = folder / f"{dataset}.txt"
    if dataset not in DATASETS or not path.is_file():
        if source == "project":
            raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}.")
        valid = ", ".join(sorted(p.stem for p in folder.glob("*.txt")))
        raise ValueError(f"the release has no class list for {dataset!r}; release lists: {valid}.")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return validate_class_names([ln for ln in lines if ln and not ln.startswith("#")])


def read_class_file(path: Union[str, os.PathLike]) -> List[str]:
    """Class names from a text file: one class per line, optional comma-separated synonyms
    (``person, people, human``), blank lines and ``#`` comments skipped. Line ``i`` is class ``i``,
    the value ``i`` in label maps. Each class comes back as its synonyms joined by ``", "``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"class-name file {p} {not_a_file(p)}; write one class per line "
                                "(synonyms comma-separated), see docs/your-images.md.")
    names: List[str] = []
    owner: dict = {}
    for no, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = [s.strip() for s in text.split(SYNONYM_SEPARATOR)]
        if not all(parts):
            raise ValueError(f"{p}, line {no}: {text!r} has an empty synonym; separate synonyms by single "
                             "commas ('person, people').")
        for s in parts:
            if s in owner:
                raise ValueError(f"{p}, line {no}: {s!r} is already a name of class {owner[s]!r}; each "
                                 "name may belong to one class only.")
            owner[s] = parts[0]
        names.append(", ".join(parts))
    if not names:
        raise ValueError(f"class-name file {p} lists no class; write one class name per line.")
    return validate_class_names(names)


__all__ = ("CLASS_NAME_DIR", "DATASETS", "class_names", "read_class_file")
