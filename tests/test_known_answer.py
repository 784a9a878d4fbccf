"""The known-answer lab's pieces around the training runs: its summary.md section, its place in
`make reproduce`, its maps figure, the notebooks' recovery and share-of-gap tables, the runs the
notebooks share with it, the diagnostics list."""
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
from reclip_core.machine import cpu_model, describe_machine  # noqa: E402
from reclip_core.model import ReCLIPPP  # noqa: E402
from reclip_core.planted_bias import PlantedBias  # noqa: E402
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
        Path(dst).write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}\n')

    fake.execute_notebook = execute_notebook
    monkeypatch.setitem(sys.modules, "papermill", fake)


def _fake_lab(monkeypatch, tmp_path, script: str) -> None:
    """The lab as a real second process running ``script`` (RECLIP_RESULTS is the run's results tree)."""
    monkeypatch.setattr(reproduce, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(reproduce, "prepare_known_world", lambda device: None)
    monkeypatch.setattr(reproduce, "lab_command", lambda device: [sys.executable, "-c", script, device])


#: a lab that writes its table (copied from the argument's folder) and provenance with its device
WRITING_LAB = r"""
import json, os, shutil, sys
from pathlib import Path
folder = Path(os.environ["RECLIP_RESULTS"]) / "toy" / "known"
folder.mkdir(parents=True, exist_ok=True)
shutil.copy(Path(sys.argv[2]) / "known_answer.csv", folder / "known_answer.csv")
(folder / "known_answer.json").write_text(json.dumps({"seeds": [0, 1, 2], "goals": ["- goal"], "wall_s": 12.5,
                                                      "device": sys.argv[1]}))
"""


@pytest.mark.parametrize("profile_args, expect_lab", [({}, True), ({"known_answer": False}, False),
                                                      ({"only": ["01"]}, False)])
def test_reproduce_runs_the_lab_beside_the_notebooks(monkeypatch, tmp_path, profile_args, expect_lab):
    executed, events = [], []
    _fake_papermill(monkeypatch, executed)
    _fake_lab(monkeypatch, tmp_path, WRITING_LAB)
    table = _write_lab_files(tmp_path / "prepared").parent.parent  # the lab files, read by the fake lab
    monkeypatch.setattr(reproduce, "lab_command",
                        lambda device: [sys.executable, "-c", WRITING_LAB, device, str(table / "toy" / "known")])
    start, finish = reproduce.start_known_answer, reproduce.finish_known_answer
    monkeypatch.setattr(reproduce, "start_known_answer", lambda d: events.append(("start", list(executed))) or start(d))
    monkeypatch.setattr(reproduce, "finish_known_answer",
                        lambda lab: events.append(("wait", list(executed))) or finish(lab))
    summary = reproduce.run("toy", None, "cpu", **profile_args).read_text()
    assert bool(events) == expect_lab
    if expect_lab:  # started before the first notebook, waited for after the last, on the run's device
        assert events == [("start", []), ("wait", [nb.name for nb in reproduce.notebooks()])]
        assert json.loads((tmp_path / "toy" / "known" / "known_answer.json").read_text())["device"] == "cpu"
        assert "## Known-answer world" in summary and f"| {reproduce.KNOWN_ANSWER_STEP} | 12.5 |" in summary
        assert "- [known/known_answer.csv](known/known_answer.csv)" in summary
    else:
        assert reproduce.KNOWN_ANSWER_STEP not in summary
    assert f"| {reproduce.WALL_STEP} |" in summary
    assert f"On {describe_machine()}." in summary  # a time says which CPU it was measured on


def test_a_failed_lab_fails_the_run_with_the_end_of_its_log(monkeypatch, tmp_path):
    _fake_papermill(monkeypatch, [])
    _fake_lab(monkeypatch, tmp_path, "import sys; print('the lab stopped: no toy CLIP'); sys.exit(3)")
    with pytest.raises(RuntimeError, match=r"(?s)exit status 3.*the lab stopped: no toy CLIP"):
        reproduce.run("toy", None, "cpu")
    assert not (tmp_path / "toy" / "summary.md").exists()  # no summary of a run whose lab failed


def test_a_failed_notebook_stops_the_lab(monkeypatch, tmp_path):
    fake = type(sys)("papermill")

    def execute_notebook(src, dst, **kw):
        raise RuntimeError("a cell failed")

    fake.execute_notebook = execute_notebook
    monkeypatch.setitem(sys.modules, "papermill", fake)
    _fake_lab(monkeypatch, tmp_path, "import time; time.sleep(120)")
    labs = []
    start = reproduce.start_known_answer
    monkeypatch.setattr(reproduce, "start_known_answer", lambda d: labs.append(start(d)) or labs[-1])
    with pytest.raises(RuntimeError, match="a cell failed"):
        reproduce.run("toy", None, "cpu")
    assert labs[0].proc.poll() is not None  # ended, not left running for two minutes


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


def test_recovery_table_has_the_overall_row_first_then_each_class():
    planted = torch.zeros(3, 2, 2)
    planted[0] += 0.3  # class 0 favoured everywhere
    planted[1, 0] += 0.5  # class 1 favoured in the top row
    table = known_answer.recovery_table(2 * planted, planted, ["a", "b", "c"])
    assert list(table["class"]) == ["all classes", "a", "b", "c"]
    assert table["recovery"].round(9).eq(1.0).all() and table["scale"].round(9).eq(2.0).all()
    flipped = known_answer.recovery_table(-planted, planted, ["a", "b", "c"])
    assert flipped["recovery"].iloc[0] == pytest.approx(-1.0) and flipped["scale"].iloc[0] == pytest.approx(-1.0)


def test_share_of_gap_is_zero_at_b_and_one_hundred_at_u():
    bench = pd.DataFrame({"model": ["MaskCLIP", "ReCLIP", "ReCLIP++"], "mIoU": [50.0, 60.0, 45.0]})
    table = known_answer.share_of_gap(bench, u=70.0).set_index("model")["% of U − B"]
    assert table["MaskCLIP (no planted bias) = U"] == 100.0 and table["MaskCLIP = B"] == 0.0
    assert table["ReCLIP"] == pytest.approx(50.0) and table["ReCLIP++"] == pytest.approx(-25.0)


def _recording_lab(tmp_path, monkeypatch, seed=0):
    """A known-world Lab whose training only records what it would train (config, run folder)."""
    from reclip_core import lab as lab_module
    from reclip_core.config import load_config

    calls = []
    monkeypatch.setattr(lab_module, "train", lambda cfg, run_dir, **kw: calls.append((dict(cfg), run_dir)))
    monkeypatch.setattr(lab_module, "load_model_weights", lambda model, run_dir: None)
    monkeypatch.setattr(lab_module.Lab, "model", lambda self, kind="reclip++", **kw: torch.nn.Identity())
    lab = lab_module.Lab("toy", "known", torch.device("cpu"), seed, load_config("toy_known", [f"seed={seed}"]), tmp_path)
    lab.__dict__["clip"] = None  # the recorded calls never touch it
    monkeypatch.setattr(lab, "hypotheses", lambda: {})
    return lab, calls


def test_the_lab_trains_the_notebooks_runs(tmp_path, monkeypatch):
    # notebooks 03-05 and the lab train the same config into the same folder: one training per seed
    lab, calls = _recording_lab(tmp_path, monkeypatch)
    lab.train("rectify_both", use_decoder=False, bias_mode="both")  # notebook 03 / 05
    lab.train("reclip++")  # notebook 04 / 05
    lab.train("reclip", kind="reclip")  # notebook 05
    for label in ("rectification only", "ReCLIP++", "ReCLIP"):
        known_answer.train_model(lab, label, 0)
    assert [c[1] for c in calls[:3]] == [c[1] for c in calls[3:]]
    assert [c[0] for c in calls[:3]] == [c[0] for c in calls[3:]]
    assert [c[1].name for c in calls[:3]] == [known_answer.run_name(m, 0) for m in ("rectification only", "ReCLIP++", "ReCLIP")]
    # another seed: its own folder, its config's seed and its own feature cache (the views follow the seed)
    known_answer.train_model(lab, "ReCLIP++", 2)
    cfg, run_dir = calls[-1]
    assert run_dir == tmp_path / "runs" / "reclip++-seed2" and cfg["seed"] == 2
    assert cfg["feature_cache_path"] != calls[1][0]["feature_cache_path"]
    assert {k for k in cfg if cfg[k] != calls[1][0][k]} == {"seed", "feature_cache_path"}


def test_every_diagnostic_trains_a_model_of_the_lab():
    folders = {}
    for label, (folder, model_label, where, scale, noise) in known_answer_diagnostics.DIAGNOSTICS.items():
        assert model_label in {**known_answer.MODELS, **known_answer.VARIANTS}, label
        assert (where is None or where in PlantedBias.WHERE) and (where is None) == (scale == 0.0)
        assert (noise is not None) == ("patch noise" in label), label  # the rows' share of U − B reads it
        assert folders.setdefault(folder, (where, scale, noise)) == (where, scale, noise), folder  # one CLIP a folder


def test_a_locked_run_is_waited_for_then_read(tmp_path, capsys):
    import threading
    import time

    from reclip_core.lab import wait_while_locked
    from reclip_core.run_lock import run_folder_lock

    held, release = threading.Event(), threading.Event()

    def other_process():  # another writer holding the run folder (flock: per open file, also in-process)
        with run_folder_lock(tmp_path, "train"):
            (tmp_path / "result").write_text("trained")
            held.set()
            release.wait(5)

    t = threading.Thread(target=other_process)
    t.start()
    held.wait(5)
    calls = []

    def compute():
        calls.append(time.monotonic())
        if len(calls) == 3:
            release.set()
        with run_folder_lock(tmp_path, "train"):
            return (tmp_path / "result").read_text()

    assert wait_while_locked(compute, poll_s=0.01) == "trained"
    t.join()
    assert len(calls) >= 3  # refused twice while held (released only at the third try), then read
    assert capsys.readouterr().err == ""  # silent: a notebook's outputs must not depend on who waited


def test_reproduce_starts_the_lab_with_arguments_it_accepts(monkeypatch):
    calls = []
    monkeypatch.setattr(known_answer, "run_known_answer", lambda *a: calls.append(a) or
                        {"summary": pd.DataFrame(), "goals": []})
    command = reproduce.lab_command("cpu")
    assert command[1:3] == ["-m", "reclip_core.known_answer"]
    assert known_answer.main(command[3:]) == 0
    assert calls == [(list(known_answer.SEEDS), list(known_answer.MODELS), "cpu", True)]  # val hypotheses first


def test_goal_lines_say_above_when_a_model_raises_a_tvd():
    rows = [{"model": "MaskCLIP (no planted bias)", "seed": None, "mIoU": 71.6, "class TVD": 0.1, "space TVD": 0.1},
            {"model": "MaskCLIP (planted bias)", "seed": None, "mIoU": 54.4, "class TVD": 0.1, "space TVD": 0.2}]
    rows += [{"model": "ReCLIP++", "seed": s, "mIoU": 40.0, "class TVD": 0.2, "space TVD": 0.05, "recovery": 0.0}
             for s in range(3)]
    text = "\n".join(known_answer.goal_lines(known_answer.summarise(pd.DataFrame(rows))))
    assert "class TVD 0.200 ± 0.000, 100% above MaskCLIP's (goal ≥ 50% below: MISSED)" in text
    assert "space TVD 0.050 ± 0.000, 75% below MaskCLIP's (goal ≥ 50% below: met)" in text


def test_the_cpu_model_is_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Example CPU @ 2.0GHz\nflags\t: fpu\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path, *a, **k))
    assert cpu_model() == "Example CPU @ 2.0GHz"
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert describe_machine() == "Example CPU @ 2.0GHz, 3 cores"


def test_hypotheses_are_locked_by_a_file_beside_them_that_goes_away(tmp_path, monkeypatch):
    from reclip_core import hypothesis
    from reclip_core.lab import Lab
    from reclip_core.run_lock import RunFolderLocked, run_folder_lock

    seen = []

    def compute(cfg, clip, split, path, **kw):  # what another process sees while they are computed
        with pytest.raises(RunFolderLocked):
            with run_folder_lock(tmp_path, "hypotheses", lock_name=".hypotheses_val.lock"):
                pass
        seen.append(sorted(p.name for p in tmp_path.rglob("*")))
        return {"im0": [1]}

    monkeypatch.setattr(hypothesis, "hypotheses_from_config", compute)
    lab = Lab("toy", "known", torch.device("cpu"), 0, {"val_split": "val"}, tmp_path)
    lab.__dict__.update(clip=None, text=None)  # the cached properties: not needed by the fake
    assert lab.val_hypotheses() == {"im0": [1]}
    assert seen == [[".hypotheses_val.lock"]]  # held beside the file, not in a folder of its own
    assert list(tmp_path.iterdir()) == []  # nothing left behind
