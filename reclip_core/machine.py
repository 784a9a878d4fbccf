"""What a timing was measured on: the CPU's model name and its core count.

Run times only compare on the same machine, so every file that reports a time (``summary.md``,
``spread.md``, ``results/benchmarks.md``) says which CPU it came from.
"""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_machine() -> str:
    """One line for a report: ``<cpu model>, <n> cores``."""
    return f"{cpu_model()}, {os.cpu_count() or 1} cores"
