"""The committed notebooks: paired twins, parameters, the toy outputs nbval compares."""
from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pandas as pd
import pytest

from reclip_core import reproduce, result_tables

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = reproduce.notebooks()
CHECK = "# NBVAL_CHECK_OUTPUT"
SPREAD_DIR = ROOT / "results" / "toy"


def _cells(nb):
    # Metadata too: jupytext's contents manager compares the pair's full text, so a `tags=[]` that
    # papermill leaves in the .ipynb makes Jupyter refuse to open a notebook newer than its twin.
    return [(c.cell_type, c.source.strip(), dict(c.metadata)) for c in nb.cells]


#: notebooks whose outputs a test of their own checks (after the notebooks ran) instead of nbval
OWN_CHECKS = {"06_your_images.ipynb": ROOT / "tests" / "test_your_images.py"}


def test_six_numbered_notebooks():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_", "06_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_py_percent_twin_has_the_same_cells(path):
    # Jupyter's jupytext contents manager refuses to open a pair whose inputs differ.
    twin = path.with_suffix(".py")
    assert twin.exists(), f"{twin.name} missing: run `jupytext --sync notebooks/*.ipynb`"
    assert _cells(jupytext.read(path)) == _cells(jupytext.read(twin)), \
        f"{path.name} and {twin.name} differ: run `jupytext --sync notebooks/*.ipynb`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_names_the_run(path):
    names = reproduce.notebook_parameters(path)
    assert {"profile", "dataset", "device", "seed"} <= set(names), names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_carries_the_toy_outputs_nbval_checks(path):
    nb = nbformat.read(path, as_version=4)
    checked = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(CHECK)]
    empty = [c.source.splitlines()[1] for c in checked if not any(o.get("text") or o.get("data") for o in c.outputs)]
    assert not empty, f"{path.name}: checked cells without outputs {empty}; run `make notebooks`"
    # nothing nbval compares, then every table the notebook writes is checked within the spread
    tables = set(pd.read_csv(SPREAD_DIR / "spread.csv").table)
    own = OWN_CHECKS.get(path.name)
    assert checked or any(t.startswith(f"{result_tables.WORLD}/{path.name[:3]}") for t in tables) or (own and own.is_file()), \
        f"{path.name}: neither a cell marked {CHECK}, a table in spread.csv nor a test of its own; nothing would be checked"
    # committed as written by `make notebooks`: no papermill injection or run metadata
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert "papermill" not in nb.metadata
    assert not any("papermill" in c.metadata or "execution" in c.metadata for c in nb.cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_nbval_compares_only_outputs_that_are_the_same_on_every_measured_cpu(path):
    # `make spread` ran the notebooks under three kernel levels and two thread counts and recorded,
    # per cell, whether the printed output was identical; a checked cell must be such a cell.
    stable = pd.read_csv(SPREAD_DIR / "spread_outputs.csv")
    stable = stable[stable.notebook == path.name].set_index("source_sha256")["same_on_every_machine"]
    nb = nbformat.read(path, as_version=4)
    for cell in (c for c in nb.cells if c.cell_type == "code" and c.source.startswith(CHECK)):
        digest = result_tables.source_digest(cell.source)
        first = cell.source.splitlines()[1]
        assert digest in stable.index, f"{path.name}: checked cell {first!r} changed since `make spread`; run it again"
        assert bool(stable[digest]), f"{path.name}: checked cell {first!r} prints other output on other CPUs"


def test_strip_run_metadata_keeps_outputs_and_drops_the_run(tmp_path):
    nb = nbformat.v4.new_notebook(metadata={"papermill": {"duration": 1.0}})
    params = nbformat.v4.new_code_cell("profile = 'toy'", metadata={"tags": ["parameters"]}, execution_count=1)
    injected = nbformat.v4.new_code_cell("profile = 'toy'", metadata={"tags": ["injected-parameters"]},
                                         execution_count=2)
    body = nbformat.v4.new_code_cell(f"{CHECK}\nprint(1)", execution_count=3,
                                     metadata={"papermill": {"duration": 0.1}, "execution": {"iopub.status.idle": "x"}},
                                     outputs=[nbformat.v4.new_output("stream", name="stdout", text="1\n")])
    nb.cells = [nbformat.v4.new_markdown_cell("# t", metadata={"tags": []}), params, injected, body]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    reproduce.strip_run_metadata(path)
    out = nbformat.read(path, as_version=4)
    assert [c.source for c in out.cells] == ["# t", "profile = 'toy'", f"{CHECK}\nprint(1)"]
    assert [c.get("execution_count") for c in out.cells[1:]] == [1, 2]
    assert out.cells[2].outputs[0]["text"] == "1\n"
    assert "papermill" not in out.metadata
    assert out.cells[2].metadata == {} and out.cells[0].metadata == {}
    assert out.cells[1].metadata == {"tags": ["parameters"]}


def test_an_executed_copy_keeps_its_parameters_and_drops_the_run(tmp_path):
    run = {"parameters": {"profile": "toy", "seed": 0}, "version": "2.6.0", "input_path": "/home/x/01.ipynb",
           "output_path": "/home/x/out.ipynb", "start_time": "2026-12-04T01:00:00", "duration": 9.5,
           "environment_variables": {}}
    nb = nbformat.v4.new_notebook(metadata={"papermill": run})
    injected = nbformat.v4.new_code_cell("seed = 0", metadata={"tags": ["injected-parameters"],
                                                               "papermill": {"duration": 0.1}}, execution_count=2)
    body = nbformat.v4.new_code_cell("print(1)", execution_count=3, metadata={"execution": {"iopub.status.idle": "x"}},
                                     outputs=[nbformat.v4.new_output("stream", name="stdout", text="1\n")])
    nb.cells = [nbformat.v4.new_markdown_cell("# t", metadata={"tags": []}), injected, body]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    reproduce.strip_run_metadata(path, keep_parameters=True)
    out = nbformat.read(path, as_version=4)
    assert [c.source for c in out.cells] == ["# t", "seed = 0", "print(1)"]
    assert out.metadata["papermill"] == {"parameters": {"profile": "toy", "seed": 0}, "version": "2.6.0"}
    assert out.cells[1].metadata == {"tags": ["injected-parameters"]}
    assert out.cells[0].metadata == {} and out.cells[2].metadata == {}
    assert [c.execution_count for c in out.cells[1:]] == [1, 2]
    text = path.read_text()
    assert "/home/x" not in text and "2026-12-04" not in text


def test_publish_executed_copy_writes_beside_the_results(tmp_path):
    nb = tmp_path / "01_x.ipynb"
    nb.write_text('{"cells": []}')
    dest = reproduce.publish_executed_copy(nb, tmp_path / "results" / "toy" / "notebooks")
    assert dest == tmp_path / "results" / "toy" / "notebooks" / "01_x.ipynb"
    assert dest.read_text() == nb.read_text()
