"""`make reproduce`: execute the six notebooks in order with papermill (toy profile: the known-answer
lab in a second process beside them) and write a summary.

    python -m reclip_core.reproduce                       # toy profile, CPU, minutes
    python -m reclip_core.reproduce --profile paper --dataset voc --device cuda

Executed copies go to ``results/<profile>/notebooks/``; ``results/<profile>/summary.md`` links
every table and figure the notebooks wrote. Parameters are checked before any notebook starts,
so a typo fails in a second instead of after the first heavy cell.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .atomic_io import atomic_write_text
from .machine import describe_machine
from .paths import NOTEBOOK_DIR, RESULTS_DIR, notebooks
from .profiles import check_parameters


#: the run-time row of the known-answer lab in ``summary.md``
KNOWN_ANSWER_STEP = "known-answer lab (seeds 0-2), beside the notebooks"
#: the run-time row of the whole run
WALL_STEP = "wall clock, start to end"
#: parameters set by ``run``'s own arguments; ``-p`` must not override them past their checks
RUN_PARAMETERS = ("profile", "dataset", "device", "seed")


def notebook_parameters(nb: Path) -> List[str]:
    """Names assigned in the notebook's cell tagged ``parameters`` (what papermill can inject).

    Read with ``json`` and ``ast`` rather than ``papermill.inspect_notebook``: importing papermill
    takes seconds, and a typo must fail before that."""
    return list(parameter_defaults(nb))


def check_parameter_names(extra: Dict, raw: Sequence[str] = ()) -> None:
    """Every extra parameter must be declared in some notebook's ``parameters`` cell: papermill
    would otherwise inject it silently and the run would use the default."""
    reserved = sorted(set(extra) & set(RUN_PARAMETERS))
    if reserved:
        raise ValueError(f"set {', '.join(reserved)} with --{reserved[0]} (checked), not with -p "
                         "(it would bypass the profile/dataset/device checks).")
    known = {}
    for nb in notebooks():
        known.update(parameter_defaults(nb))
    unknown = sorted(set(extra) - set(known))
    if unknown:
        raise ValueError(f"unknown notebook parameter(s) {unknown}; valid: {', '.join(sorted(known))}.")
    for name, value in extra.items():
        default = known[name]
        if name in raw and not isinstance(default, str):
            raise ValueError(f"notebook parameter {name!r} (default {default!r}) takes a JSON value: a number, "
                             f"null, true/false or a quoted string, got {value!r}.")
        # the kind of value a parameter takes is its default's: `-p n_val abc` must fail here, not
        # in a kernel minutes later (a None default takes anything, an int default also None)
        wanted = (int,) if isinstance(default, int) and not isinstance(default, bool) else \
            (int, float) if isinstance(default, float) else (type(default),)
        if default is not None and value is not None and (not isinstance(value, wanted) or
                                                          isinstance(value, bool) != isinstance(default, bool)):
            raise ValueError(f"notebook parameter {name!r} takes a {type(default).__name__} like its default "
                             f"{default!r}, got {value!r}.")


def parameter_defaults(nb: Path) -> Dict[str, object]:
    """The ``parameters`` cell's names with their literal defaults (a non-literal reads as None)."""
    cells = json.loads(nb.read_text(encoding="utf-8")).get("cells", [])
    for cell in cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = cell.get("source", "")
            out = {}
            for node in ast.parse("".join(src) if isinstance(src, list) else src).body:
                targets = node.targets if isinstance(node, ast.Assign) else (
                    [node.target] if isinstance(node, ast.AnnAssign) else [])
                for t in (t for t in targets if isinstance(t, ast.Name)):
                    try:
                        out[t.id] = ast.literal_eval(node.value) if node.value is not None else None
                    except ValueError:
                        out[t.id] = None
            return out
    return {}


def preflight(profile: str, dataset: str) -> None:
    """Paper profile: fail fast when the CLIP weights or the dataset are missing."""
    if profile != "paper":
        return
    # torch (both import it): import time; `python -m reclip_core.reproduce` checks run without it
    from .clip_loading import load_clip
    from .datasets import get_dataset

    get_dataset(dataset, "val")  # FileNotFoundError naming the data_prep command
    load_clip()  # RuntimeError naming the weights cache and how to fill it


def run(profile: str = "toy", dataset: Optional[str] = None, device: str = "auto", seed: int = 0,
        only: Optional[Sequence[str]] = None, inplace: bool = False, extra: Optional[Dict] = None,
        known_answer: bool = True) -> Path:
    """Execute the notebooks and (toy profile, all notebooks, ``known_answer``) the known-answer lab
    over its seeds, in a second process beside them; returns the path of ``summary.md``."""
    dataset = check_parameters(profile, dataset, device)
    check_parameter_names(extra or {})
    names = [nb.name for nb in notebooks()]
    unmatched = [o for o in only or () if not any(n.startswith(o) for n in names)]
    if unmatched:  # else nothing would run and summary.md would be rewritten without its tables
        raise ValueError(f"--only {' '.join(unmatched)} matches no notebook; valid prefixes: "
                         f"{', '.join(n.split('_')[0] for n in names)} ({', '.join(names)}).")
    preflight(profile, dataset)
    import papermill as pm  # after the checks: the import alone takes seconds
    out_dir = RESULTS_DIR / profile / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"profile": profile, "dataset": dataset, "device": device, "seed": seed, **(extra or {})}
    timings: Dict[str, float] = {}
    t_run = time.perf_counter()
    lab = start_known_answer(device) if profile == "toy" and known_answer and not only else None
    try:
        run_notebooks(pm, profile, dataset, params, only, inplace, out_dir, timings)
        if lab is not None:
            timings[KNOWN_ANSWER_STEP] = finish_known_answer(lab)
    finally:
        if lab is not None:
            lab.stop()
    timings[WALL_STEP] = round(time.perf_counter() - t_run, 1)
    return write_summary(profile, dataset, timings)


def run_notebooks(pm, profile: str, dataset: str, params: Dict, only: Optional[Sequence[str]], inplace: bool,
                  out_dir: Path, timings: Dict[str, float]) -> None:
    """Execute the notebooks in order (``only``: those whose name starts with one of the prefixes)."""
    for nb in notebooks():
        if only and not any(nb.name.startswith(o) for o in only):
            continue
        target = nb if inplace else out_dir / nb.name
        print(f"[reproduce] {nb.name} ({profile}/{dataset}) …", flush=True)
        t0 = time.perf_counter()
        # papermill rewrites its output after every cell: execute into a hidden ".partial.ipynb" file and
        # rename it only when the whole notebook ran, so a failed or killed run never leaves a
        # half-executed notebook under the real name (nor overwrites the committed one with --inplace).
        partial = target.with_name(f".{target.stem}.partial.ipynb")  # papermill warns on other suffixes
        pm.execute_notebook(str(nb), str(partial), parameters=params, kernel_name="python3",
                            cwd=str(NOTEBOOK_DIR), progress_bar=False)
        strip_run_metadata(partial, keep_parameters=not inplace)
        os.replace(partial, target)
        if inplace:
            publish_executed_copy(target, out_dir)
        timings[nb.name] = round(time.perf_counter() - t0, 1)
        print(f"[reproduce] {nb.name} done in {timings[nb.name]} s", flush=True)


class LabProcess:
    """The known-answer lab (``python -m reclip_core.known_answer``) running in its own process; its
    output goes to ``<results>/toy/known/runs/known_answer.log``."""

    def __init__(self, command: Sequence[str]):
        self.log = RESULTS_DIR / "toy" / "known" / "runs" / "known_answer.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w", encoding="utf-8") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "RECLIP_RESULTS": str(RESULTS_DIR)})

    def stop(self) -> None:
        """End the lab if it still runs (the notebooks failed or the run was interrupted)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def lab_command(device: str) -> List[str]:
    # the validation hypotheses first: notebook 04 needs them, and the notebooks meanwhile compute
    # the training split's, which this lab waits for
    return [sys.executable, "-m", "reclip_core.known_answer", "--device", device, "--val-hypotheses"]


def prepare_known_world(device: str) -> None:
    """Build the known-answer toy world if it is missing (the lab and the notebooks both read it)."""
    from .lab import setup  # torch: import time, after the checks

    setup("toy", "known", device=device)


def start_known_answer(device: str) -> LabProcess:
    """Start the known-answer lab beside the notebooks, once the toy world it shares with them
    exists (built first, so that the two processes do not both build it). The lab takes its other
    seeds first; the runs both need, the first seed's, are trained once: the second process to
    reach one waits for it (``lab.wait_while_locked``) and reads it."""
    prepare_known_world(device)
    print("[reproduce] known-answer lab (python -m reclip_core.known_answer) started beside the notebooks",
          flush=True)
    return LabProcess(lab_command(device))


def finish_known_answer(lab: LabProcess) -> float:
    """Wait for the lab → its own run time (seconds, from its JSON); a failed lab fails the run,
    with the end of its log."""
    print("[reproduce] waiting for the known-answer lab …", flush=True)
    if lab.proc.wait() != 0:
        tail = "\n".join(lab.log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        raise RuntimeError(f"the known-answer lab failed (exit status {lab.proc.returncode}); the end of its log "
                           f"{lab.log}:\n{tail}")
    meta = RESULTS_DIR / "toy" / "known" / "known_answer.json"
    seconds = float(json.loads(meta.read_text(encoding="utf-8"))["wall_s"])
    print(f"[reproduce] known-answer lab done in {seconds} s", flush=True)
    return seconds


def publish_executed_copy(notebook: Path, out_dir: Path) -> Path:
    """Copy an executed notebook to ``results/<profile>/notebooks/`` (atomically), so that the
    executed copies ``summary.md`` links always belong to the same run as the tables beside them."""
    dest = Path(out_dir) / notebook.name
    atomic_write_text(dest, notebook.read_text(encoding="utf-8"))
    return dest


def strip_run_metadata(path: Path, keep_parameters: bool = False) -> None:
    """Make an executed notebook fit to commit: drop the per-run metadata (papermill timings and
    paths, execution timestamps) that would make every re-run a diff. Outputs and execution counts
    stay: nbval compares the outputs.

    Also drop the empty tag lists papermill adds to every cell, and, for the notebook itself
    (``--inplace``, beside its py:percent twin), papermill's injected-parameters cell: the twin has
    no such cell, and jupytext refuses a pair whose cells or metadata differ. An executed copy
    (``keep_parameters``) keeps that cell and papermill's record of the parameters: what ran."""
    import nbformat  # import time: only executed notebooks need it

    nb = nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)
    if not keep_parameters:
        nb["cells"] = [c for c in nb["cells"] if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    count = 0
    for cell in nb["cells"]:
        meta = cell.get("metadata", {})
        for key in ("papermill", "execution"):
            meta.pop(key, None)
        if meta.get("tags") == []:  # papermill adds `tags: []` to every cell
            meta.pop("tags")
        if cell.get("cell_type") == "code":
            # papermill numbers cells including a dropped one; renumber so the counts read 1, 2, ...
            count += 1
            cell["execution_count"] = count
            for out in cell.get("outputs", []):
                if "execution_count" in out:
                    out["execution_count"] = cell["execution_count"]
    run = nb.get("metadata", {}).pop("papermill", None)
    if keep_parameters and run is not None:  # not its paths, times or environment
        nb["metadata"]["papermill"] = {k: run[k] for k in ("parameters", "version") if k in run}
    atomic_write_text(path, nbformat.writes(nb) + "\n")


def write_summary(profile: str, dataset: str, timings: Dict[str, float]) -> Path:
    """``results/<profile>/summary.md``: headline numbers, then links to every table and figure."""
    base = RESULTS_DIR / profile
    lines = [f"# reclip results — profile `{profile}`, dataset `{dataset}`", "",
             "Written by `python -m reclip_core.reproduce`; do not edit by hand.", ""]
    if profile == "toy":
        from .known_answer import summary_section as known_answer_section  # torch, pandas: import time

        lines += known_answer_section(RESULTS_DIR)  # the known-answer lab first
    headline = base / dataset / "headline.md"
    if headline.is_file():
        lines += [headline.read_text().strip(), ""]
    if profile == "toy":
        from .spread import summary_section  # pandas: import time; only once the notebooks have run

        lines += summary_section(base)
    if timings:
        lines += ["## Run times", "", f"On {describe_machine()}.", "", "| step | seconds |", "|---|---:|"]
        lines += [f"| [{name}](notebooks/{name}) | {secs} |" if name.endswith(".ipynb") else f"| {name} | {secs} |"
                  for name, secs in timings.items()]
        if WALL_STEP not in timings:
            lines += [f"| total | {round(sum(timings.values()), 1)} |"]
        lines += [""]
    # notebooks 01-05, 06, and the known-answer lab (toy)
    folders = [f for f in dict.fromkeys((base / dataset, base / "your_images", base / "known")) if f.is_dir()]
    for kind, patterns in (("Tables", ("*.md", "*.csv")), ("Figures", ("*.png",))):
        files = sorted(p for f in folders for pat in patterns for p in f.rglob(pat)
                       if p.name != "headline.md" and "runs" not in p.relative_to(f).parts)
        if files:
            lines += [f"## {kind}", ""] + [f"- [{p.relative_to(base)}]({p.relative_to(base)})" for p in files] + [""]
    path = base / "summary.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="toy")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 02")
    parser.add_argument("--inplace", action="store_true",
                        help="execute the notebooks in notebooks/ themselves (refreshes the committed outputs)")
    parser.add_argument("--no-known-answer", action="store_true",
                        help="toy profile: skip the known-answer lab after the notebooks")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="extra notebook parameter (JSON value), e.g. -p n_val 100")
    args = parser.parse_args(argv)
    extra, raw = {}, []
    for name, value in args.param:
        try:
            extra[name] = json.loads(value)
        except json.JSONDecodeError:
            extra[name] = value
            raw.append(name)
    try:
        check_parameter_names(extra, raw)
        summary = run(args.profile, args.dataset, args.device, args.seed, args.only, args.inplace, extra,
                      known_answer=not args.no_known_answer)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"reproduce: {err}", file=sys.stderr)
        return 2
    print(f"[reproduce] summary: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
