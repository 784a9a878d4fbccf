"""The known-answer lab's pieces around the training runs: its summary.md section, its place in
`make reproduce`, its maps figure, the run names the notebooks share with it, the diagnostics list."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from reclip_core import known_answer, known_answer_diagnostics, reproduce  # noqa: E402
from reclip_core.model import ReCLIPPP  # noqa: E402
from reclip_core.toy_clip import build_toy_clip  # noqa: E402


def _write_lab_files(results: Path) -> Path:
    folder = results / "toy" / "known"
    folder.mkdir(parents=True)
    rows = [{"model": "MaskCLIP (no planted bias)", "seed": None, "mIoU": 71.6, "class TVD": 0.098,
             "space TVD": 0.098},
            {"model": "MaskCLIP (planted bias)", "seed": None, "mIoU": 54.4, "class TVD": 0.128, "space TVD": 0.251}]
    rows += [{"model": "rectification only", "seed": s, "mIoU": m, "class TVD": 0.11, "space TVD": 0.17,
              "recovery": r} for s, (m, r) in enumerate([(64.0, 0.66), (64.2, 0.67), (64.4, 0.68)])]
    summary = known_answer.summarise(pd.DataFrame(rows))
    summary.to_csv(folder / "known_answer.csv", index=False)
    goals = known_answer.goal_lines(summary)
    (folder / "known_answer.json").write_text(json.dumps({"seeds": [0, 1, 2], "goals": goals}))
    return folder


def test_summary_section_shows_the_lab_table_with_its_spread_and_goals(tmp_path):
    _write_lab_files(tmp_path)
    text = "\n".join(known_answer.summary_section(tmp_path))
    assert "## Known-answer world" in text and "seeds 0, 1, 2" in text
    assert "| MaskCLIP (planted bias) | 1 | 54.4 | 0.128 | 0.251 | — |" in text  # one run: no ± column
    assert "| rectification only | 3 | 64.2 ± 0.2 | 0.110 ± 0.000 | 0.170 ± 0.000 | 0.67 ± 0.01 |" in text
    assert "57% of U − B recovered (goal ≥ 40%; met)" in text
    assert "known/known_answer_maps.png" in text


def test_summary_section_is_empty_before_the_lab_ran(tmp_path):
    assert known_answer.summary_section(tmp_path) == []
    folder = _write_lab_files(tmp_path)
    (folder / "known_answer.json").unlink()  # a table without its provenance is not shown
    assert known_answer.summary_section(tmp_path) == []


def _fake_papermill(monkeypatch, executed):
    fake = type(sys)("papermill")

    def execute_notebook(src, dst, **kw):
        executed.append(Path(src).name)
        Path(dst).write_text("{}\n")

    fake.execute_notebook = execute_notebook
    monkeypatch.setitem(sys.modules, "papermill", fake)


@pytest.mark.parametrize("profile_args, expect_lab", [({}, True), ({"known_answer": False}, False),
                                                      ({"only": ["01"]}, False)])
def test_reproduce_runs_the_lab_after_the_notebooks(monkeypatch, tmp_path, profile_args, expect_lab):
    executed, lab_calls = [], []
    _fake_papermill(monkeypatch, executed)
    monkeypatch.setattr(reproduce, "RESULTS_DIR", tmp_path)

    def fake_lab(device="auto"):
        lab_calls.append((device, list(executed)))
        _write_lab_files(tmp_path)

    monkeypatch.setattr(known_answer, "run_known_answer", fake_lab)
    summary = reproduce.run("toy", None, "cpu", **profile_args).read_text()
    assert bool(lab_calls) == expect_lab
    if expect_lab:  # after every notebook, on the run's device, and in summary.md with its time
        assert lab_calls == [("cpu", [nb.name for nb in reproduce.notebooks()])]
        assert "## Known-answer world" in summary and f"| {reproduce.KNOWN_ANSWER_STEP} |" in summary
        assert "- [known/known_answer.csv](known/known_answer.csv)" in summary
    else:
        assert reproduce.KNOWN_ANSWER_STEP not in summary


def test_the_spread_runs_the_notebooks_without_the_lab(monkeypatch, tmp_path):
    from reclip_core import spread

    started = []
    monkeypatch.setattr(spread.subprocess, "Popen", lambda cmd, **kw: started.append(cmd))
    spread.launch(spread.Setting("native", 1, 0), tmp_path)
    assert "--no-known-answer" in started[0]  # the lab has its own seeds; its tables are not compared there


def test_maps_figure_has_the_planted_row_first_and_one_column_per_class():
    names = ["a", "b", "c"]
    planted, learned = torch.randn(3, 4, 4), {"model": torch.randn(3, 4, 4)}
    fig = known_answer.maps_figure(planted, learned, names)
    axes = fig.axes
    assert len(axes) == 2 * 3
    assert [ax.get_title() for ax in axes[:3]] == names and axes[0].get_ylabel() == "planted B*"
    assert axes[3].get_ylabel() == "model"


def test_learned_map_is_the_models_bias_map():
    torch.manual_seed(0)
    clip = build_toy_clip().eval()
    model = ReCLIPPP(clip, ["red circle", "blue square"], use_decoder=False, templates=["a photo of a {}."])
    with torch.no_grad():
        torch.nn.init.normal_(model.positional.proj.weight)
        expected = model.bias_map((4, 4)).clone()
    got = known_answer.learned_map(model, (4, 4))
    assert got.shape == (2, 4, 4) and torch.equal(got, expected.float().cpu())


def test_run_names_are_shared_with_the_notebooks():
    assert known_answer.run_name("rectification only", 1) == "reclip++-rectify-seed1"
    assert known_answer.run_name("ReCLIP++", 0) == "reclip++-seed0"
    assert known_answer.run_name("ReCLIP", 2) == "reclip-seed2"


def test_every_diagnostic_trains_a_model_of_the_lab():
    for label, (folder, model_label, where, scale) in known_answer_diagnostics.DIAGNOSTICS.items():
        assert model_label in known_answer.MODELS, label
        assert where in (None, "features", "logits") and (where is None) == (scale == 0.0)
