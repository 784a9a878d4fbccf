"""Faults of the run folder, found through the real CLI (docs/reliability.md, cases 21-23).

21 checkpoints: trained on another CLIP / other templates, NaN or otherwise impossible tensors,
   older checkpoints without the CLIP/template record; a refused evaluation keeps ``eval/``.
22 invalid values: non-finite floats in the config, hypotheses that are not class indices, all-empty
   hypotheses, ``reproduce --only`` matching nothing, the non-finite-loss advice against the resume rule.
23 one writer per run folder: a lock, refused with the holder's name, released on every exit path.

Each CLI case runs ``python -m reclip_core ...`` in a subprocess on a toy world of a few 32-px
images with the tiny random CLIP (seconds each) and asserts the exit status and the one-line message.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from reclip_core.checkpoint import LATEST, load_checkpoint, load_model_weights, validate_weights
from reclip_core.hypothesis import FORMAT, check_hypotheses, load_hypotheses
from reclip_core.run_lock import LOCK_NAME, RunFolderLocked, run_folder_lock

from .train_fixtures import NAMES, ImageSet, hypotheses_for, tiny_config, write_tiny_world_config, refused

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "reclip_core", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A config over a toy world of 8 train / 2 val images, its train ids and a trained 1-epoch run."""
    from reclip_core.cli import main
    from reclip_core.datasets.toyworld import ToyWorld

    tmp = tmp_path_factory.mktemp("world")
    cfg = write_tiny_world_config(tmp, train_size=8, val_size=2, epoch=1)
    train_set = ToyWorld("train", preset=str(tmp / "preset.yaml"), root=tmp / "world")
    ids = [train_set[i]["id"] for i in range(len(train_set))]
    _write_hypotheses(tmp / "run", train_set.class_names, {i: [k % 10] for k, i in enumerate(ids)})
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    return {"tmp": tmp, "cfg": cfg, "ids": ids, "names": train_set.class_names, "run": tmp / "run"}


def _write_hypotheses(run: Path, names, hyps) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / "hypotheses.json"
    path.write_text(json.dumps({"format": FORMAT, "version": 1, "settings": {}, "class_names": list(names),
                                "hypotheses": hyps}))
    return path


def _copy_run(world, name: str, eval_sentinel: bool = True) -> Path:
    run = world["tmp"] / name
    shutil.copytree(world["run"], run)
    if eval_sentinel:  # an earlier evaluation whose results must survive a refused one
        (run / "eval").mkdir(exist_ok=True)
        (run / "eval" / "metrics.json").write_text('{"earlier": "evaluation"}\n')
    return run


def _weights_file(run: Path) -> Path:
    return run / "checkpoints" / json.loads((run / "checkpoints" / LATEST).read_text())["weights"]


# ------------------------------------------------------------------------------------------------
# 21. checkpoints: identity of the CLIP and templates, valid tensors, legacy files
# ------------------------------------------------------------------------------------------------
def _mainrefused(capsys, *args) -> str:
    """The same CLI in this process (cheaper than a subprocess for follow-up checks)."""
    from reclip_core.cli import main

    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    return capsys.readouterr().err.strip()


def test_21_cli_refuses_a_checkpoint_of_another_clip_or_templates(world, capsys):
    run = _copy_run(world, "other_clip")
    # seed 1 builds another random tiny CLIP: same architecture, same classes, other weights
    err = refused(_cli("evaluate", "--config", world["cfg"], "--set", f"output_dir={run}", "--set", "seed=1",
                        "--quiet"))
    assert str(run / "checkpoints" / LATEST) in err and "was trained with CLIP weights" in err
    trained = json.loads((run / "checkpoints" / LATEST).read_text())["identity"]["clip_weights"]
    assert trained in err and "but this model has CLIP weights" in err
    assert err.split("but this model has CLIP weights ")[1][:16] != trained  # both named, and they differ
    assert (run / "eval" / "metrics.json").read_text() == '{"earlier": "evaluation"}\n'  # not overwritten
    img = world["tmp"] / "img.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(img)
    err = _mainrefused(capsys, "segment", "--config", world["cfg"], "--set", "seed=1", "--image", img,
                        "--checkpoint", run, "--out", world["tmp"] / "seg.png")
    assert trained in err and "but this model has CLIP weights" in err
    assert not (world["tmp"] / "seg.png").exists()
    # other templates (same CLIP): refused the same way, naming both template digests
    from reclip_core.config import load_config
    from reclip_core.evaluation import evaluate_run

    with pytest.raises(ValueError, match=r"trained with text templates \w+ .*templates 'single'.*this model has text"):
        evaluate_run(load_config(world["cfg"], [f"output_dir={run}", "templates=all"]), progress=False)
    assert (run / "eval" / "metrics.json").read_text() == '{"earlier": "evaluation"}\n'


@pytest.mark.parametrize("damage", ["nan", "negative_var", "int_dtype"])
def test_21_cli_refuses_impossible_weights_naming_tensor_and_file(world, damage):
    from safetensors.torch import load_file, save_file

    run = _copy_run(world, f"damaged_{damage}")
    path = _weights_file(run)
    w = load_file(str(path))
    name = {"nan": "decoder.conv.weight", "negative_var": "decoder.norm.running_var",
            "int_dtype": "positional.proj.weight"}[damage]
    if damage == "nan":
        w[name] = torch.full_like(w[name], float("nan"))
    elif damage == "negative_var":
        w[name] = -w[name] - 1.0
    else:
        w[name] = w[name].round().to(torch.int32)
    save_file(w, str(path), metadata={"format": "reclip"})
    latest = json.loads((run / "checkpoints" / LATEST).read_text())
    if damage != "nan":  # one case through the CLI; the rest through the same loader in-process
        with pytest.raises(ValueError) as e:
            load_model_weights(_tiny_model(world, latest), run)
        assert str(path) in str(e.value) and name in str(e.value)
        assert {"negative_var": "negative variances", "int_dtype": "stored as torch.int32"}[damage] in str(e.value)
        return
    err = refused(_cli("evaluate", "--config", world["cfg"], "--set", f"output_dir={run}", "--quiet"))
    assert str(path) in err and f"tensor {name} holds" in err and "non-finite" in err
    assert (run / "eval" / "metrics.json").read_text() == '{"earlier": "evaluation"}\n'


def _tiny_model(world, latest):
    from reclip_core.config import validate
    from reclip_core.model_factory import build_model

    return build_model(validate(latest["config"]), device="cpu")


def test_21_cli_legacy_checkpoint_needs_the_explicit_flag(world):
    run = _copy_run(world, "legacy")
    latest = run / "checkpoints" / LATEST
    state = json.loads(latest.read_text())
    del state["identity"]  # what a checkpoint written before the record looks like
    latest.write_text(json.dumps(state))
    err = refused(_cli("evaluate", "--config", world["cfg"], "--set", f"output_dir={run}", "--quiet"))
    assert "does not record which CLIP weights" in err and "--allow-legacy-checkpoint" in err and "--no-resume" in err
    assert (run / "eval" / "metrics.json").read_text() == '{"earlier": "evaluation"}\n'
    from reclip_core.cli import main

    with pytest.warns(UserWarning, match="does not record its CLIP weights"):  # loaded, with a warning
        assert main(["evaluate", "--config", str(world["cfg"]), "--set", f"output_dir={run}", "--quiet",
                     "--allow-legacy-checkpoint"]) == 0
    assert "results" in json.loads((run / "eval" / "metrics.json").read_text())
    # resuming it is refused as stale (the notebooks set it aside and retrain); the same run with its
    # record resumes
    from reclip_core.atomic_io import StaleFileError
    from reclip_core.config import load_config
    from reclip_core.training import train

    with pytest.raises(StaleFileError, match="recorded their CLIP weights"):
        train(load_config(world["cfg"], [f"output_dir={run}", "epoch=2"]), progress=False)
    control = _copy_run(world, "legacy_control")
    assert train(load_config(world["cfg"], [f"output_dir={control}", "epoch=2"]), progress=False).steps == 4


def test_21_weight_validation_unit_cases(tmp_path, tiny_clip):
    from reclip_core.model import ReCLIPPP

    model = ReCLIPPP(tiny_clip, NAMES, templates=["a photo of a {}."])
    good = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    validate_weights(good, model, tmp_path / "w.safetensors")  # a model's own state passes
    cases = {"inf": ("reference.tokens", lambda t: t.fill_(float("inf")), "non-finite"),
             "bool": ("decoder.norm.weight", lambda t: t.bool(), "stored as torch.bool"),
             "shape": ("decoder.conv.bias", lambda t: torch.zeros(t.numel() + 1), "has shape"),
             "missing": ("decoder.conv.bias", None, r"missing \['decoder.conv.bias'\]")}
    for case, (name, change, words) in cases.items():
        bad = {k: v.clone() for k, v in good.items()}
        if change is None:
            del bad[name]
        else:
            bad[name] = change(bad[name])
        with pytest.raises(ValueError, match=words) as e:
            validate_weights(bad, model, tmp_path / "w.safetensors")
        assert "w.safetensors" in str(e.value), case
    # a bare weights file: checked by its own metadata (class names, identity); none = legacy
    from safetensors.torch import save_file

    from reclip_core.checkpoint import checkpoint_identity

    bare = tmp_path / "bare.safetensors"
    save_file(good, str(bare), metadata={"identity": json.dumps(checkpoint_identity(model)),
                                         "class_names": json.dumps(NAMES)})
    assert load_model_weights(ReCLIPPP(tiny_clip, NAMES, templates=["a photo of a {}."]), bare) == {}
    with pytest.raises(ValueError, match="trained with text templates"):
        load_model_weights(ReCLIPPP(tiny_clip, NAMES, templates=["an image of a {}."]), bare)
    save_file(good, str(bare))
    with pytest.raises(ValueError, match="--allow-legacy-checkpoint"):
        load_model_weights(ReCLIPPP(tiny_clip, NAMES, templates=["a photo of a {}."]), bare)
    with pytest.warns(UserWarning, match="allow_legacy"):
        load_model_weights(ReCLIPPP(tiny_clip, NAMES, templates=["a photo of a {}."]), bare, allow_legacy=True)


# ------------------------------------------------------------------------------------------------
# 22. invalid values: config floats, hypotheses, empty hypotheses, reproduce --only, NaN advice
# ------------------------------------------------------------------------------------------------
def test_22_cli_refuses_non_finite_config_floats(world, tmp_path):
    from reclip_core.config import load_config

    err = refused(_cli("train", "--config", world["cfg"], "--set", f"output_dir={tmp_path / 'r'}",
                        "--set", "lr=.nan", "--quiet"))
    assert err == "error: config key 'lr' must be a finite number, got nan."
    assert not (tmp_path / "r").exists()
    for item in ("lr=.inf", "lr=-.inf", "momentum=.nan", "weight_decay=.inf", "pd_threshold=.nan",
                 "gumbel_scale=.inf", "score_scale=.nan", "hypothesis_threshold=.inf", "clip.ln_eps=.nan"):
        with pytest.raises(ValueError, match="must be a finite number"):
            load_config("toy", [item])
    for item, words in (("scale_range=[0.5, .inf]", "scale_range"), ("momentum=1.5", "momentum"),
                        ("weight_decay=-1", "weight_decay")):
        with pytest.raises(ValueError, match=words):
            load_config("toy", [item])


@pytest.mark.parametrize("value", [-1, "12", 1.9, True, 10, "dup"])
def test_22_hypotheses_must_be_class_indices(world, tmp_path, value):
    ids = world["ids"]
    hyps = {i: [k % 10] for k, i in enumerate(ids)}
    bad_id = ids[3]
    hyps[bad_id] = [2, 2] if value == "dup" else [0, value]
    path = _write_hypotheses(tmp_path / "run", world["names"], hyps)
    words = "lists a class twice" if value == "dup" else f"has the class index {value!r}"
    if value != -1:  # one case through the CLI, the others through the same reader
        with pytest.raises(ValueError, match=words) as e:
            load_hypotheses(path, world["names"])
        assert str(path) in str(e.value) and repr(bad_id) in str(e.value)
        return
    err = refused(_cli("train", "--config", world["cfg"], "--set", f"output_dir={tmp_path / 'run'}", "--quiet"))
    assert str(path) in err and f"image {bad_id!r} has the class index -1" in err and "0..9" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_22_check_hypotheses_accepts_what_compute_hypotheses_writes():
    assert check_hypotheses({"a": [0, 2], "b": []}, 3, "h.json") == {"a": [0, 2], "b": []}
    with pytest.raises(ValueError, match="not a list"):
        check_hypotheses({"a": 1}, 3, "h.json")


def test_22_cli_refuses_all_empty_hypotheses_before_training(world, tmp_path):
    path = _write_hypotheses(tmp_path / "run", world["names"], {i: [] for i in world["ids"]})
    err = refused(_cli("train", "--config", world["cfg"], "--set", f"output_dir={tmp_path / 'run'}", "--quiet"))
    assert f"none of the 8 training images has a hypothesis class in {path}" in err and "no step" in err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "train_summary.json").exists()


def test_22_reproduce_only_matching_no_notebook_exits_2_before_anything(tmp_path):
    env = dict(os.environ, RECLIP_RESULTS=str(tmp_path / "results"), PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "reclip_core.reproduce", "--only", "01", "XX"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--only XX matches no notebook; valid prefixes: 01, 02, 03, 04, 05" in proc.stderr
    assert not (tmp_path / "results").exists()  # nothing ran, summary.md not rewritten
    assert time.monotonic() - t0 < 3.0


def test_22_non_finite_advice_is_what_the_resume_rule_accepts(world, tmp_path, capsys):
    run = tmp_path / "run"
    _write_hypotheses(run, world["names"], {i: [k % 10] for k, i in enumerate(world["ids"])})
    # a huge but finite lr: the loss stays finite for some steps while the weights blow up
    err = refused(_cli("train", "--config", world["cfg"], "--set", f"output_dir={run}", "--set", "lr=1e5",
                        "--set", "epoch=3", "--quiet"), status=1)
    assert "non-finite" in err and "--no-resume --set lr=" in err
    for f in (run / "checkpoints").glob("step*.safetensors"):  # whatever was saved as good is finite
        from safetensors.torch import load_file

        assert all(torch.isfinite(t.float()).all() for t in load_file(str(f)).values()), f
    assert str(run / "checkpoints" / LATEST) in err  # a good checkpoint was kept and is named
    # resuming from it with another lr (the old advice) is refused; what the advice says works
    from reclip_core.cli import main

    argv = ["train", "--config", str(world["cfg"]), "--set", f"output_dir={run}", "--set", "lr=0.001", "--set",
            "epoch=3", "--quiet"]
    stale = _mainrefused(capsys, *argv)
    assert "different config" in stale and "--no-resume" in stale
    assert main(argv + ["--no-resume"]) == 0
    assert load_checkpoint(run).state["finished"] is True


# ------------------------------------------------------------------------------------------------
# 23. one writer per run folder
# ------------------------------------------------------------------------------------------------
def test_23_second_writer_is_refused_while_the_first_holds_the_lock(world, tmp_path, capsys):
    run = _copy_run(world, "locked")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with run_folder_lock(run, "train") as lock_file:  # this test process is the first writer
        holder = json.loads(lock_file.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        err = refused(_cli("train", "--config", world["cfg"], "--set", f"output_dir={run}", "--set", "epoch=2",
                            "--quiet"))
        assert f"run folder {run} is in use" in err and f"pid {os.getpid()} on host {socket.gethostname()}" in err
        assert "`train`" in err and "--set output_dir=" in err
        err = _mainrefused(capsys, "evaluate", "--config", world["cfg"], "--set", f"output_dir={run}", "--quiet")
        assert f"pid {os.getpid()}" in err
        hyps = (run / "hypotheses.json").read_bytes()
        err = _mainrefused(capsys, "hypothesis", "--config", world["cfg"], "--set", f"output_dir={run}",
                           "--no-resume", "--quiet")  # train reads that file: rewriting it mid-run is refused
        assert f"run folder {run} is in use" in err and f"pid {os.getpid()}" in err
        assert (run / "hypotheses.json").read_bytes() == hyps
        with pytest.raises(RunFolderLocked):  # in-process too (a notebook beside a CLI run)
            with run_folder_lock(run, "evaluate"):
                pass
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing written by the second
    assert (run / "eval" / "metrics.json").read_text() == '{"earlier": "evaluation"}\n'
    assert not (run / LOCK_NAME).exists()  # released and removed


def test_23_lock_released_on_exception_and_ctrl_c_in_train(tmp_path, tiny_clip):
    from reclip_core.training import train

    run = tmp_path / "run"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        def stop(event, exc=exc):
            assert (run / LOCK_NAME).is_file()  # held while training
            raise exc

        with pytest.raises(type(exc)):
            train(tiny_config(run, epoch=1), dataset=ImageSet(8), hypotheses=hypotheses_for(8), clip=tiny_clip,
                  progress=False, resume=False, callback=stop)
        assert not (run / LOCK_NAME).exists()
        with run_folder_lock(run, "train"):  # free again
            pass


HOLDER = textwrap.dedent("""
    import os, signal, sys, time
    from reclip_core.run_lock import run_folder_lock, _acquire
    # Ctrl-C as a terminal delivers it, even where this test runs in the background (a shell that
    # starts a job with `&` hands it SIGINT ignored, and Python then installs no handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.argv[2] == "kill":  # take the lock, then die without any cleanup
        _acquire(__import__("pathlib").Path(sys.argv[1]), "holder")
        print("locked", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    with run_folder_lock(sys.argv[1], "holder"):
        print("locked", flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("end", ["kill", "ctrl_c"])
def test_23_lock_of_a_dead_or_interrupted_process_is_not_left_behind(tmp_path, end):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), end], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    if end == "ctrl_c":
        with pytest.raises(RunFolderLocked, match=f"pid {proc.pid}"):
            with run_folder_lock(run, "second"):
                pass
        proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    if end == "kill":
        assert proc.returncode == -signal.SIGKILL
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid  # a stale lock file stays...
    else:
        assert not (run / LOCK_NAME).exists()  # the with-block released it on KeyboardInterrupt
    with run_folder_lock(run, "second") as lock_file:  # ...and is taken over: a dead pid holds no flock
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
