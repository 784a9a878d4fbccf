"""`make spread`: how much the toy reproduction's numbers move across CPU kernels, threads and seeds.

    python -m reclip_core.spread                 # every setting below, then the tables
    python -m reclip_core.spread --aggregate     # only re-read the finished runs
    python -m reclip_core.spread --tolerances    # only re-derive spread.csv's tolerances from its ranges

Training through a hard Gumbel argmax amplifies float differences: two CPUs that pick other
kernels (AVX-512, AVX2, plain C) or another thread count (another reduction order) end at other
numbers. Each setting runs the notebooks (``reproduce``) into its own results tree under
``work/spread/<setting>/`` and the tables they wrote are compared number by number:

- ``results/toy/spread.csv``: for every number of every table, the committed value, the range over
  the *machine* settings (seed 0) and mean/sd/range over the *seeds* (this machine's kernels);
  ``tolerance`` lets a number lie anywhere in the range of all measured runs or within that
  range's width beyond it (``tolerances``).
  ``tests/test_toy_results.py`` checks a test run's tables against it.
- ``results/toy/spread_outputs.csv``: per notebook cell, whether every machine setting printed the
  same output (the cells nbval compares must be such cells).
- ``results/toy/spread.md``: the settings with their run times, and every model comparison of the
  benchmark table over seeds and machines, with whether it exceeds the spread.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .atomic_io import atomic_write_files
from .machine import cpu_model
from .paths import RESULTS_DIR, ROOT, notebooks
from .result_files import table_markdown
from .result_tables import (KEY, SPREAD_CSV, WORLD, cell_outputs, decimals, long_form, result_tables, source_digest,
                            stale, within_spread)

WORK_DIR = ROOT / "work" / "spread"

# Kernel levels as another CPU would pick them: PyTorch's own kernels (ATen), oneDNN's (convolutions,
# some activations) and MKL's (BLAS) each dispatch on the CPU's instruction set, so a whole CPU is
# imitated by setting all three; `aten-*` set PyTorch's alone, as `ATEN_CPU_CAPABILITY=... make test` does.
KERNELS: Dict[str, Dict[str, str]] = {
    "native": {},  # what this machine picks by itself
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
}


@dataclass(frozen=True)
class Setting:
    """One run of the toy reproduction."""

    kernel: str  # a key of KERNELS
    threads: int  # torch CPU threads (the notebooks' num_threads parameter)
    seed: int  # the notebooks' seed

    @property
    def name(self) -> str:
        return f"{self.kernel}-t{self.threads}-s{self.seed}"

    @property
    def is_machine(self) -> bool:  # a machine setting: seed 0, any kernel/threads
        return self.seed == 0

    @property
    def is_seed(self) -> bool:  # a seed setting: this machine's kernels, the config's one thread
        return self.kernel == "native" and self.threads == 1


def default_settings() -> List[Setting]:
    """Three CPUs (this one, AVX2, plain C) × one and two threads, PyTorch's kernel level alone at
    AVX2 and plain C, all at seed 0; and seeds 1 and 2 as `make reproduce` runs (one thread)."""
    machine = [Setting(k, t, 0) for k in ("native", "avx2", "default") for t in (1, 2)]
    machine += [Setting("aten-avx2", 1, 0), Setting("aten-default", 1, 0)]
    return machine + [Setting("native", 1, s) for s in (1, 2)]


@dataclass
class Scheduler:
    """Runs settings as subprocesses, never more threads at once than ``cores``."""

    cores: int
    running: List = field(default_factory=list)

    def run_all(self, settings: Sequence[Setting], work: Path) -> Dict[str, float]:
        pending, times = sorted(settings, key=lambda s: -s.threads), {}
        while pending or self.running:
            for proc, s, t0, log in list(self.running):
                if proc.poll() is not None:
                    self.running.remove((proc, s, t0, log))
                    log.close()
                    if proc.returncode != 0:
                        raise RuntimeError(f"setting {s.name} failed (exit {proc.returncode}); see {work / s.name / 'log.txt'}")
                    times[s.name] = round(time.perf_counter() - t0, 1)
                    print(f"[spread] {s.name} done in {times[s.name]} s", flush=True)
            busy = sum(s.threads for _, s, _, _ in self.running)
            start = next((s for s in pending if busy + s.threads <= self.cores or not self.running), None)
            if start is None:
                time.sleep(2)
                continue
            pending.remove(start)
            self.running.append(launch(start, work))
        return times


def launch(s: Setting, work: Path) -> Tuple[subprocess.Popen, Setting, float, IO[str]]:
    """Start ``reproduce`` for one setting into ``work/<setting>/`` (its own results tree)."""
    out = work / s.name
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **KERNELS[s.kernel], "RECLIP_RESULTS": str(out / "results"),
           "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads)}
    # the known-answer lab runs its own seeds and is not among the tables compared here
    cmd = [sys.executable, "-m", "reclip_core.reproduce", "--profile", "toy", "--seed", str(s.seed),
           "--no-known-answer", "-p", "num_threads", str(s.threads)]
    print(f"[spread] {s.name}: {' '.join(f'{k}={v}' for k, v in KERNELS[s.kernel].items())} {' '.join(cmd[2:])}",
          flush=True)
    log = open(out / "log.txt", "w")
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), s, time.perf_counter(), log


def aggregate(runs: Mapping[Setting, pd.DataFrame], committed: pd.DataFrame) -> pd.DataFrame:
    """Per number: the committed value, machine min/max, seed mean/sd/min/max and the tolerance."""
    base = committed.set_index(KEY)["value"].rename("committed")
    machine = pd.concat([r.set_index(KEY)["value"] for s, r in runs.items() if s.is_machine], axis=1)
    seeds = pd.concat([r.set_index(KEY)["value"] for s, r in runs.items() if s.is_seed], axis=1)
    out = pd.concat([base], axis=1)
    numeric = pd.to_numeric(base, errors="coerce").notna()
    m = machine.apply(pd.to_numeric, errors="coerce")
    sd = seeds.apply(pd.to_numeric, errors="coerce")
    out["machine_min"], out["machine_max"] = m.min(axis=1), m.max(axis=1)
    out["seed_mean"], out["seed_sd"] = sd.mean(axis=1), sd.std(axis=1, ddof=1)
    out["seed_min"], out["seed_max"] = sd.min(axis=1), sd.max(axis=1)
    # a text cell (met/MISSED, yes/no) is checked when every machine setting printed the same text
    out["same_text"] = machine.astype(str).nunique(axis=1).eq(1) & ~numeric
    out = out.reset_index()
    out["tolerance"] = tolerances(out)
    return out


def tolerances(table: pd.DataFrame) -> pd.Series:
    """Per number of a spread table: how far another CPU may move it from the committed value.

    Every measured run counts, the machine settings' and the seeds' alike: through a hard Gumbel
    argmax a last-bit difference makes another run, so a CPU whose kernels the emulated settings
    do not cover (another vendor's MKL paths, say) lands where another seed would, and a chaotic
    number's next run can land beyond all the runs measured so far. The allowed interval, the
    committed value ± the tolerance, therefore holds the whole measured range and that range's
    width again on either side (the width at least half a unit of the table's printed precision);
    NaN for a text cell.
    """
    committed = pd.to_numeric(table["committed"], errors="coerce")
    lo = np.fmin(np.fmin(table["machine_min"], table["seed_min"]), committed)
    hi = np.fmax(np.fmax(table["machine_max"], table["seed_max"]), committed)
    floor = table["table"].map(lambda name: 0.5 * 10.0 ** -decimals(name))
    # committed ± tol ⊇ [lo − width, hi + width]
    tol = np.maximum(hi - lo, floor) + np.maximum(committed - lo, hi - committed)
    return pd.Series(np.where(committed.notna(), tol, np.nan), index=table.index, name="tolerance")


def rederive_tolerances(spread_csv: Path) -> List[str]:
    """Rewrite only the ``tolerance`` column of a written spread table from the ranges it holds
    (after the rule of ``tolerances`` changed), without the runs. Returns the numbers whose
    tolerance changed. A missing or foreign table is refused (ValueError) and left as it was."""
    if not Path(spread_csv).is_file():
        raise ValueError(f"no {spread_csv} to re-derive; run `make spread` first")
    table = pd.read_csv(spread_csv, keep_default_na=False, na_values=[""])
    lacking = [c for c in ("table", "committed", "machine_min", "machine_max", "seed_min", "seed_max", "tolerance")
               if c not in table.columns]
    if lacking:
        raise ValueError(f"{spread_csv} has no column {', '.join(lacking)}: it was not written by `make spread`; "
                         "run `make spread` to measure it again")
    new = tolerances(table)
    old = table["tolerance"]
    moved = [f"{r.table} row {r.row} ({r.label}), {r.column}: {o:.3g} -> {n:.3g}"
             for r, o, n in zip(table.itertuples(), old, new) if not np.isclose(n, o, rtol=0, atol=1e-15, equal_nan=True)]
    table["tolerance"] = new
    atomic_write_files({Path(spread_csv): table.to_csv(index=False)})
    return moved


def output_stability(settings: Sequence[Setting], work: Path) -> pd.DataFrame:
    """Per code cell of each notebook: did every machine setting print the same (sanitised) output?
    The cells nbval compares must be among the stable ones (``tests/test_notebooks.py``)."""
    rows = []
    for nb in notebooks():
        printed = [cell_outputs(work / s.name / "results" / "toy" / "notebooks" / nb.name) for s in settings if s.is_machine]
        for source in printed[0]:
            texts = {p.get(source) for p in printed}
            rows.append({"notebook": nb.name, "source_sha256": source_digest(source),
                         "first_line": source.splitlines()[0] if source else "", "same_on_every_machine": len(texts) == 1})
    return pd.DataFrame(rows)


#: notebook 05's benchmark table, whose model comparisons spread.md states
BENCHMARK = f"{WORLD}/05_benchmark.csv"
#: the benchmark table's comparisons: (model, baseline)
COMPARISONS = (("ReCLIP++", "MaskCLIP"), ("ReCLIP++ (rectify only)", "MaskCLIP"), ("ReCLIP", "MaskCLIP"),
               ("ReCLIP++", "ReCLIP++ (rectify only)"))


def comparisons(runs: Mapping[Setting, pd.DataFrame], metric: str = "mIoU") -> pd.DataFrame:
    """Each model's mIoU minus its baseline's, per run, over the seeds and over the machine settings.
    A difference counts as beyond the spread when every run of that group agrees on its sign."""
    rows = []
    for model, baseline in COMPARISONS:
        row = {"comparison": f"{model} − {baseline}"}
        for group, pick in (("seeds", lambda s: s.is_seed), ("machines", lambda s: s.is_machine)):
            d = []
            for s, r in runs.items():
                if pick(s):
                    b = r[(r.table == BENCHMARK) & (r.column == metric)].set_index("label")["value"]
                    d.append(float(b[model]) - float(b[baseline]))
            d = np.asarray(d)
            row[f"{group}: mean ± sd"] = f"{d.mean():+.1f} ± {d.std(ddof=1):.1f}"
            row[f"{group}: min … max"] = f"{d.min():+.1f} … {d.max():+.1f}"
            row[f"{group}: beyond the spread"] = "yes" if (d > 0).all() or (d < 0).all() else "no"
        rows.append(row)
    return pd.DataFrame(rows)


def provenance() -> Dict[str, str]:
    """What the spread was measured on: the committed tables (digest) and the machine."""
    import torch  # import time: reproduce reads summary_section from here without torch

    digest = hashlib.sha256()
    for path in sorted((RESULTS_DIR / "toy").glob(f"{WORLD}/0*.csv")):
        digest.update(path.read_bytes())
    return {"committed tables sha256": digest.hexdigest()[:12], "torch": torch.__version__,
            "cpu capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu_model(), "cores": str(os.cpu_count())}


def write_tables(settings: Sequence[Setting], work: Path, out: Path, times: Optional[Mapping[str, float]] = None) -> Path:
    """Read the finished runs, write ``spread.csv`` / ``spread.md`` under ``out``; returns the Markdown path."""
    runs = {s: long_form(result_tables(work / s.name / "results")) for s in settings}
    table = aggregate(runs, long_form(result_tables(RESULTS_DIR)))
    times = dict(times or {})
    saved = work / "times.json"
    if saved.is_file():
        times = {**json.loads(saved.read_text()), **times}
    setting_rows = pd.DataFrame([{"setting": s.name, "kernels": " ".join(f"{k}={v}" for k, v in KERNELS[s.kernel].items()) or "(machine's own)",
                                  "threads": s.threads, "seed": s.seed, "minutes": round(times.get(s.name, float("nan")) / 60, 1)}
                                 for s in settings])
    bench = table[(table.table == BENCHMARK) & (table.column == "mIoU")]
    models = bench[["label", "committed", "seed_mean", "seed_sd", "seed_min", "seed_max", "machine_min", "machine_max"]]
    prov = provenance()
    lines = ["# Spread of the toy reproduction over CPU kernels, threads and seeds", "",
             "Written by `python -m reclip_core.spread` (`make spread`); do not edit by hand. "
             "Machine settings: seed 0 under each kernel level and thread count; seeds: 0, 1, 2 with this "
             "machine's kernels and the config's thread count. " + ", ".join(f"{k}: {v}" for k, v in prov.items()) + ".", "",
             "## Settings", "", table_markdown(setting_rows),
             "## Benchmark mIoU (%) per model", "", table_markdown(models.rename(columns={"label": "model"}), ".2f"),
             "## Comparisons (mIoU points; beyond the spread = every run of the group has the same sign)", "",
             table_markdown(comparisons(runs))]
    files = {out / "spread.csv": table.to_csv(index=False), out / "spread.md": "\n".join(lines),
             out / "spread_outputs.csv": output_stability(settings, work).to_csv(index=False)}
    atomic_write_files(files)
    return out / "spread.md"


def summary_section(base: Path = RESULTS_DIR / "toy") -> List[str]:
    """Lines for ``summary.md``: the comparisons of ``spread.md``, and whether this run's tables are
    the committed ones, differ within the measured spread (another CPU or thread count), or beyond."""
    md, csv = Path(base) / "spread.md", Path(base) / "spread.csv"
    head = ["## Over seeds and CPUs ([spread.md](spread.md))", ""]
    if not md.is_file() or not csv.is_file():
        return head + ["Not measured yet: `make spread` writes `spread.md`.", ""]
    text = md.read_text(encoding="utf-8")
    table = text[text.index("## Comparisons"):].split("\n", 1)[1].strip()
    if not stale(Path(base).parent, csv):
        note = "This run's tables are the ones the spread was measured against."
    else:
        beyond = within_spread(Path(base).parent, csv)
        note = ("This run's tables differ from the committed ones within the measured spread (another CPU "
                "kernel level or thread count)." if not beyond else
                f"{len(beyond)} numbers of this run lie beyond the measured spread (first: {beyond[0]}): the code "
                "or its inputs changed since `make spread`; run it again before comparing models.")
    return head + [note, "", table, ""]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=WORK_DIR, help="where the runs' results trees go")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads to run at once")
    parser.add_argument("--aggregate", action="store_true", help="only read finished runs and write the tables")
    parser.add_argument("--only", nargs="*", help="setting names to (re)run, e.g. avx2-t1-s0")
    parser.add_argument("--tolerances", action="store_true",
                        help="only re-derive the tolerance column of results/toy/spread.csv from the ranges it holds")
    args = parser.parse_args(argv)
    if args.tolerances:
        try:
            moved = rederive_tolerances(SPREAD_CSV)
        except ValueError as err:
            print(f"spread: {err}", file=sys.stderr)
            return 2
        print(f"[spread] {SPREAD_CSV}: {len(moved)} tolerances changed", *moved[:20], sep="\n  ")
        return 0
    settings = default_settings()
    times = {}
    if not args.aggregate:
        todo = [s for s in settings if not args.only or s.name in args.only]
        unknown = sorted(set(args.only or []) - {s.name for s in settings})
        if unknown:
            print(f"spread: unknown setting(s) {unknown}; valid: {', '.join(s.name for s in settings)}", file=sys.stderr)
            return 2
        times = Scheduler(args.cores).run_all(todo, args.work)
        saved = args.work / "times.json"
        old = json.loads(saved.read_text()) if saved.is_file() else {}
        saved.write_text(json.dumps({**old, **times}, indent=1))
    missing = [s.name for s in settings if not (args.work / s.name / "results" / "toy" / BENCHMARK).is_file()]
    if missing:
        print(f"spread: no finished run for {', '.join(missing)} under {args.work}; run without --aggregate.", file=sys.stderr)
        return 2
    path = write_tables(settings, args.work, RESULTS_DIR / "toy", times)
    print(f"[spread] {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
