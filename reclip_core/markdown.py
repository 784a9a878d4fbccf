"""GitHub-flavoured Markdown tables for the reports the suite writes (no extra dependency such as
tabulate)."""
from __future__ import annotations

from typing import Iterable, Sequence


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table: the header row, the ``|---|`` rule, one line per row.

    Cells are written as given (already formatted strings; ``|`` inside a cell is not escaped).
    """
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


__all__ = ("markdown_table",)
