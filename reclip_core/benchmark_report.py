"""The benchmark report of notebook 05: the benchmark table against the reference numbers (the
paper's, or the toy lab's goals), the bias table of the evaluated heads, and the headline that
``summary.md`` starts with."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Protocol, Tuple

import numpy as np
import pandas as pd
import yaml

from .result_files import table_markdown

REFERENCE_FILE = Path(__file__).parent / "data" / "reference_numbers.yaml"


class Run(Protocol):
    """What the headline names: a profile/dataset pair (a :class:`lab.Lab`)."""

    profile: str
    dataset: str


def reference_numbers(profile: str, dataset: str) -> Dict[str, Dict[str, Any]]:
    """The paper's numbers (paper profile) or the toy lab's goals, from ``data/reference_numbers.yaml``."""
    data = yaml.safe_load(REFERENCE_FILE.read_text())
    block = data.get(profile, {})
    refs = dict(block.get(dataset, {}))
    for v in refs.values():
        v.setdefault("tolerance", block.get("tolerance", 0.0))
    return refs


def compare_to_reference(table: pd.DataFrame, reference: Mapping[str, Mapping[str, Any]],
                         metric: str = "mIoU") -> pd.DataFrame:
    """One row per reference entry: ours, the target (absolute, or a gain over another row), met/missed.
    An entry names its row of ``table`` by its key, or by ``model`` when one row has several goals."""
    ours = dict(zip(table["model"], table[metric]))
    rows = []
    for key, ref in reference.items():
        model = ref.get("model", key)
        value = ours.get(model, float("nan"))
        if "min_gain_over" in ref:
            base = ours.get(ref["min_gain_over"], float("nan"))
            target, measured = float(ref["gain"]), value - base
            goal = f"≥ {ref['min_gain_over']} + {ref['gain']:g}"
        else:
            target, measured = float(ref["target"]), value
            goal = f"≥ {ref['target']:g} − {ref['tolerance']:g}"
        tol = float(ref.get("tolerance", 0.0)) if "target" in ref else 0.0
        status = "—" if np.isnan(measured) else ("met" if measured >= target - tol else "MISSED")
        rows.append({"model": model, metric: value, "measured": measured, "goal": goal, "status": status,
                     "source": ref.get("source", "")})
    return pd.DataFrame(rows)


def bias_table(heads: Mapping[str, Tuple[Any, str]], baseline: str = "MaskCLIP") -> pd.DataFrame:
    """Class and space bias (``evaluate(..., bias_grid=...)``) of named heads, ``{name: (report, head)}``,
    beside their change from ``baseline``'s; the column ``both lower than <baseline>`` says whether
    both metrics dropped."""
    rows = []
    for name, (report, head) in heads.items():
        if head not in report.bias:
            raise ValueError(f"{name!r}: its report has no bias metrics for head {head!r}; evaluate with bias_grid.")
        b = report.bias[head]
        rows.append({"model": name, "class TVD": b.class_bias().tvd, "space TVD": b.space_bias().score})
    df = pd.DataFrame(rows)
    base = df.set_index("model").loc[baseline]
    df["Δ class TVD"] = df["class TVD"] - base["class TVD"]
    df["Δ space TVD"] = df["space TVD"] - base["space TVD"]
    lower = (df["Δ class TVD"] < 0) & (df["Δ space TVD"] < 0)
    df["both lower than " + baseline] = np.where(df["model"] == baseline, "—", np.where(lower, "yes", "no"))
    return df


def headline(lab: Run, table: pd.DataFrame, compare: pd.DataFrame, bias: Optional[pd.DataFrame] = None) -> str:
    """The summary's first lines: the benchmark table, the goals and (if given) the bias table, as
    measured in this run."""
    parts = [f"## {lab.profile} / {lab.dataset}: mIoU (%)", "", table_markdown(table), "## Goals", "",
             table_markdown(compare)]
    if bias is not None:
        parts += ["## Bias (0 = unbiased; TVD of predicted vs true class shares, overall and per grid cell)", "",
                  table_markdown(bias, ".3f")]
    return "\n".join(parts)


__all__ = ("reference_numbers", "compare_to_reference", "bias_table", "headline", "REFERENCE_FILE")
