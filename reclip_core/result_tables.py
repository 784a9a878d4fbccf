"""The toy tables as numbers, and the check `make test` runs on them.

A results tree (``results/`` or a test run's ``$RECLIP_RESULTS``) holds the CSV tables the
notebooks wrote (the default toy world's, ``toy/<WORLD>/``); ``long_form`` turns them into one row
per number (table, row, label, column, value). ``check`` compares a run's numbers with the
committed ones within the tolerances that ``make spread`` measured (``results/toy/spread.csv``);
``stale`` says whether that file was measured against the tables now committed. ``cell_outputs``
reads a notebook's printed outputs the way nbval compares them.
"""
from __future__ import annotations

import configparser
import hashlib
import json
import re
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Union

import numpy as np
import pandas as pd

from .paths import NOTEBOOK_DIR, RESULTS_DIR
from .profiles import DEFAULT_DATASET

SPREAD_CSV = RESULTS_DIR / "toy" / "spread.csv"
#: the toy world whose tables are checked: the one `make reproduce` and `make test` run
WORLD = DEFAULT_DATASET["toy"]

#: the printed precision of tables written with another than save_table's default (.1f), by file name
DECIMALS: Dict[str, int] = {"01_class_bias.csv": 3, "01_biased_vs_uniform.csv": 2, "01_planted_vs_clean.csv": 2,
                            "03_rectification.csv": 3, "03_bias_recovery.csv": 3, "04_bias_recovery.csv": 3,
                            "04_loss_preference.csv": 3, "05_bias.csv": 3}
#: written by the notebooks but not results: the timings depend on the machine's load
SKIP = ("05_timings.csv",)
#: machine-facts columns (hashes, seeds) are not numbers to compare
KEY_COLUMNS = ("weights_sha256", "val_preset_hash")


def decimals(table: str) -> int:
    """The printed precision of a table (``known/03_rectification.csv`` → 3)."""
    return DECIMALS.get(Path(table).name, 1)


def result_tables(results: Path) -> Dict[str, pd.DataFrame]:
    """The tables the notebooks wrote into a results tree (``toy/<WORLD>/0*.csv``), by name
    relative to ``toy/``. The known-answer lab's own tables (``known_answer*``) are not among them:
    `make test` does not run the lab."""
    base = Path(results) / "toy"
    tables = {}
    for path in sorted(base.glob(f"{WORLD}/0*.csv")):
        rel = path.relative_to(base).as_posix()
        if path.name not in SKIP:
            tables[rel] = pd.read_csv(path)
    return tables


def long_form(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per number: table, row position, the row's label (first column), column, value."""
    rows = []
    for name, df in tables.items():
        label = df.columns[0]
        for i, rec in enumerate(df.to_dict("records")):
            for col, value in rec.items():
                if col == label or col in KEY_COLUMNS:
                    continue
                rows.append({"table": name, "row": i, "label": str(rec[label]), "column": col, "value": value})
    return pd.DataFrame(rows)


KEY = ["table", "row", "label", "column"]


def _keyed(numbers: pd.DataFrame, column: str = "value") -> pd.Series:
    return numbers.assign(label=numbers["label"].astype(str)).set_index(KEY)[column]


def _compare(spread: pd.DataFrame, found: pd.Series, expected: pd.Series, strict: bool) -> List[str]:
    """Where ``found`` differs from ``expected`` (both keyed like ``spread``): by more than the
    number's tolerance (``strict=False``) or at all, up to float rounding in CSV (``strict=True``)."""
    problems = []
    for rec in spread.assign(label=spread["label"].astype(str)).to_dict("records"):
        k = tuple(rec[c] for c in KEY)
        where = f"{rec['table']} row {rec['row']} ({rec['label']}), column {rec['column']!r}"
        if k not in found.index or k not in expected.index:
            problems.append(f"{where}: missing")
            continue
        got, want = found[k], expected[k]
        if not np.isnan(rec["tolerance"]):  # a number
            got, want = float(got), float(want)
            limit = 1e-9 * max(1.0, abs(want)) if strict else float(rec["tolerance"]) + 1e-9
            if not (abs(got - want) <= limit or (np.isnan(got) and np.isnan(want))):
                problems.append(f"{where}: {got:.6g} vs {want:.6g} (allowed ±{limit:.3g})")
        elif (strict or bool(rec["same_text"])) and str(got) != str(want):
            problems.append(f"{where}: {got!r} vs {want!r}")
    return problems


def _spread(spread_csv: Path) -> pd.DataFrame:
    return pd.read_csv(spread_csv, keep_default_na=False, na_values=[""])


def check(results: Path, spread_csv: Path = SPREAD_CSV, reference: Path = RESULTS_DIR) -> List[str]:
    """Every number of the toy tables under ``results`` against the same number under ``reference``
    (the committed ``results/``), within its measured tolerance; text cells that every machine
    setting printed alike must match. Returns the differences, one line each (empty: they agree)."""
    spread = _spread(spread_csv)
    return _compare(spread, _keyed(long_form(result_tables(results))),
                    _keyed(long_form(result_tables(reference))), strict=False)


def within_spread(results: Path = RESULTS_DIR, spread_csv: Path = SPREAD_CSV) -> List[str]:
    """The tables under ``results`` against the values the spread was measured around, within the
    tolerances: what a run on another CPU (or `make notebooks` after a change) must satisfy."""
    spread = _spread(spread_csv)
    return _compare(spread, _keyed(long_form(result_tables(results))), _keyed(spread, "committed"), strict=False)


def stale(results: Path = RESULTS_DIR, spread_csv: Path = SPREAD_CSV) -> List[str]:
    """Where the tables under ``results`` are not exactly the ones the spread was measured against."""
    spread = _spread(spread_csv)
    return _compare(spread, _keyed(long_form(result_tables(results))), _keyed(spread, "committed"), strict=True)


def _sanitizers() -> List[tuple]:
    """The regex replacements nbval applies (``notebooks/nbval_sanitize.cfg``), to compare outputs as nbval does."""
    cfg = configparser.ConfigParser()
    cfg.read(NOTEBOOK_DIR / "nbval_sanitize.cfg")
    return [(re.compile(cfg[sec]["regex"]), cfg[sec]["replace"]) for sec in cfg.sections()]


def cell_outputs(notebook: Path) -> Dict[str, str]:
    """Each code cell's printed text (stream and text/plain outputs, sanitised like nbval), keyed by ``code_of``."""
    subs = _sanitizers()
    out = {}
    for cell in json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] != "code" or "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            continue
        text = ""
        for o in cell.get("outputs", []):
            part = o.get("text", o.get("data", {}).get("text/plain", ""))
            text += "".join(part) if isinstance(part, list) else part
        for pattern, replace in subs:
            text = pattern.sub(replace, text)
        out[code_of(cell["source"])] = text
    return out


def code_of(source: Union[str, Sequence[str]]) -> str:
    """A cell's source without its nbval marker lines: the key of a cell whatever nbval does with it."""
    text = "".join(source) if isinstance(source, list) else source
    return "\n".join(line for line in text.splitlines() if not line.startswith("# NBVAL_")).strip()


def source_digest(source: Union[str, Sequence[str]]) -> str:
    return hashlib.sha256(code_of(source).encode()).hexdigest()[:16]
