"""The notebooks' result files in a results folder: tables (CSV with its Markdown twin), figures,
JSON and the headline that ``summary.md`` starts with."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from .atomic_io import atomic_save_figure, atomic_write_files, atomic_write_json, atomic_write_text
from .markdown import markdown_table


def table_markdown(df: pd.DataFrame, floatfmt: str = ".1f") -> str:
    """``df`` as a GitHub-flavoured Markdown table: floats in ``floatfmt``, NaN as "–"."""
    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "–" if np.isnan(v) else format(float(v), floatfmt)
        return str(v)

    rows = [[cell(v) for v in row] for row in df.itertuples(index=False)]
    return "\n".join(markdown_table([str(c) for c in df.columns], rows)) + "\n"


def write_table(folder: Path, df: pd.DataFrame, name: str, floatfmt: str = ".1f",
                title: Optional[str] = None) -> pd.DataFrame:
    """``<name>.csv`` and ``<name>.md`` under ``folder``; returns ``df`` rounded for display."""
    head = f"# {title}\n\n" if title else ""
    # both files or neither: a full disk never leaves a new CSV beside an old Markdown table
    atomic_write_files({Path(folder) / f"{name}.csv": df.to_csv(index=False),
                        Path(folder) / f"{name}.md": head + table_markdown(df, floatfmt)})
    return df.round(int(floatfmt.strip(".f") or 1)) if floatfmt.endswith("f") else df


def write_figure(folder: Path, fig: Any, name: str) -> Any:
    """``<name>.png`` under ``folder``; returns the figure."""
    atomic_save_figure(fig, Path(folder) / f"{name}.png", dpi=110, bbox_inches="tight")
    return fig


def write_json(folder: Path, obj: Mapping[str, Any], name: str) -> Path:
    """``<name>.json`` under ``folder``."""
    return atomic_write_json(Path(folder) / f"{name}.json", obj)


def write_headline(folder: Path, text: str) -> Path:
    """``headline.md``: the few lines ``summary.md`` starts with (``reproduce.write_summary`` reads them)."""
    return atomic_write_text(Path(folder) / "headline.md", text.strip() + "\n")


__all__ = ("table_markdown", "write_table", "write_figure", "write_json", "write_headline")
