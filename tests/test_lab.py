"""The notebooks' helpers: evaluation extras (bias metrics, examples), goals, parameter checks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from reclip_core import MaskCLIP
from reclip_core.bias_analysis import class_bias
from reclip_core.evaluation import evaluate, upsample_logits
from reclip_core.lab import bias_table, compare_to_reference, headline, reference_numbers
from reclip_core.reproduce import check_parameter_names, check_parameters
from reclip_core.result_files import table_markdown
from reclip_core.transforms import eval_preprocess


class _Val:
    def __init__(self, n=3, size=(30, 44), C=2):
        rng = np.random.default_rng(0)
        self.items = []
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
            lab = rng.integers(0, C, size).astype(np.int64)
            lab[:3] = 255
            self.items.append({"id": f"im{i}", "image": img, "label": lab})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_evaluate_collects_bias_metrics_and_examples(tiny_clip):
    torch.manual_seed(0)
    model = MaskCLIP(tiny_clip, ["cat", "dog"], templates=["a photo of a {}."])
    val = _Val()
    report = evaluate(model, val, test_size=32, pd_threshold=0.5, progress=False, bias_grid=2, examples=2)
    ex = report.examples
    assert ex["ids"] == ["im0", "im1"] and len(ex["maskclip"]) == 2 and ex["images"][0].shape == (30, 44, 3)
    # the kept prediction is the evaluation's own prediction for that image
    x = eval_preprocess(val[1]["image"], 32, 2048)
    with torch.no_grad():
        logits = model(images=x)["clip_logits"]
    direct = upsample_logits(logits, 8, tuple(x.shape[-2:]), (30, 44)).argmax(1)[0].numpy()
    assert np.array_equal(direct, ex["maskclip"][1])
    # the bias accumulator saw exactly the scored pixels
    acc = report.bias["maskclip"]
    conf = report.metrics["maskclip"]["no_pd"].confusion
    assert acc.true_counts.sum() == conf.sum()
    assert np.allclose(acc.true_counts.sum((0, 1)), conf.sum(1))
    assert np.allclose(acc.pred_counts.sum((0, 1)), conf.sum(0))
    # and equals a one-shot computation over the first two images when only those are evaluated
    two = evaluate(model, _Val(2), test_size=32, pd_threshold=0.5, progress=False, bias_grid=2, examples=2)
    expected = class_bias(np.stack(two.examples["maskclip"]), np.stack(two.examples["labels"]), 2)
    assert abs(two.bias["maskclip"].class_bias().tvd - expected.tvd) < 1e-12


def test_evaluate_without_extras_keeps_report_lean(tiny_clip):
    model = MaskCLIP(tiny_clip, ["cat", "dog"], templates=["a photo of a {}."])
    report = evaluate(model, _Val(1), test_size=32, pd_threshold=0.5, progress=False)
    assert report.bias == {} and report.examples == {}


def test_compare_to_reference_reports_misses():
    table = pd.DataFrame({"model": ["MaskCLIP", "ReCLIP++", "ReCLIP++ (rectify only)"], "mIoU": [40.0, 47.0, 41.0]})
    ref = {"ReCLIP++": {"min_gain_over": "MaskCLIP", "gain": 10.0},
           "ReCLIP++ (rectify only)": {"min_gain_over": "MaskCLIP", "gain": 0.0}}
    out = compare_to_reference(table, ref).set_index("model")
    assert out.loc["ReCLIP++", "status"] == "MISSED" and out.loc["ReCLIP++", "measured"] == 7.0
    assert out.loc["ReCLIP++ (rectify only)", "status"] == "met"
    # two goals for one row: an entry names its row with `model`
    two = compare_to_reference(table, {"higher": {"model": "ReCLIP++", "min_gain_over": "MaskCLIP", "gain": 0.1},
                                       "clear gain": {"model": "ReCLIP++", "min_gain_over": "MaskCLIP", "gain": 10.0}})
    assert list(two["model"]) == ["ReCLIP++", "ReCLIP++"] and list(two["status"]) == ["met", "MISSED"]
    toy = reference_numbers("toy", "toyworld")
    assert {v.get("model", k) for k, v in toy.items()} == {"ReCLIP++", "ReCLIP++ (rectify only)"}
    paper = compare_to_reference(pd.DataFrame({"model": ["ReCLIP++ (rectify only)"], "mIoU": [84.6]}),
                                 reference_numbers("paper", "voc")).set_index("model")
    assert paper.loc["ReCLIP++ (rectify only)", "status"] == "met"  # 85.4 − 1.0 tolerance
    assert reference_numbers("paper", "voc")["ReCLIP++ (rectify only)"]["target"] == 85.4


def test_markdown_table():
    md = table_markdown(pd.DataFrame({"a": ["x"], "b": [1.234], "c": [float("nan")]}), ".2f")
    assert md.splitlines() == ["| a | b | c |", "|---|---|---|", "| x | 1.23 | – |"]


def test_parameter_checks_fail_fast():
    assert check_parameters("toy", None, "cpu") == "known"
    with pytest.raises(ValueError, match="valid profiles: toy, paper"):
        check_parameters("papr", None, "cpu")
    with pytest.raises(ValueError, match="valid: voc, context"):
        check_parameters("paper", "toyworld", "cpu")
    with pytest.raises(ValueError, match="unknown notebook parameter"):
        check_parameter_names({"n_vall": 3})
    check_parameter_names({"n_val": 3, "grid": 2})
    with pytest.raises(ValueError, match="'grid' takes a int like its default 4"):
        check_parameter_names({"grid": "abc"})  # `-p grid abc`: refused before any kernel starts
    with pytest.raises(ValueError, match="takes a int"):
        check_parameter_names({"grid": 2.5})
    with pytest.raises(ValueError, match="'n_val' \\(default None\\) takes a JSON value"):
        check_parameter_names({"n_val": "abc"}, raw=["n_val"])  # `-p n_val abc`: not JSON
    check_parameter_names({"n_val": None, "epochs": 3})


def test_bias_table_against_the_baseline_and_in_the_headline(tiny_clip):
    from types import SimpleNamespace

    from reclip_core import ReCLIPPP

    torch.manual_seed(0)
    val = _Val()
    base = evaluate(MaskCLIP(tiny_clip, ["cat", "dog"], templates=["a photo of a {}."]), val, test_size=32,
                    pd_threshold=0.5, progress=False, bias_grid=2)
    other = evaluate(ReCLIPPP(tiny_clip, ["cat", "dog"], templates=["a photo of a {}."]), val, test_size=32,
                     pd_threshold=0.5, progress=False, bias_grid=2)
    df = bias_table({"MaskCLIP": (base, "maskclip"), "X": (other, "reclip++"), "X rect": (other, "rectified")})
    row = df.set_index("model")
    for name, (rep, head) in {"X": (other, "reclip++"), "X rect": (other, "rectified")}.items():
        assert row.loc[name, "class TVD"] == rep.bias[head].class_bias().tvd
        assert row.loc[name, "Δ space TVD"] == pytest.approx(rep.bias[head].space_bias().score -
                                                             base.bias["maskclip"].space_bias().score)
        lower = row.loc[name, "Δ class TVD"] < 0 and row.loc[name, "Δ space TVD"] < 0
        assert row.loc[name, "both lower than MaskCLIP"] == ("yes" if lower else "no")
    assert row.loc["MaskCLIP", "both lower than MaskCLIP"] == "—" and row.loc["MaskCLIP", "Δ class TVD"] == 0
    # a head equal to the baseline is not lower
    assert "yes" not in set(bias_table({"MaskCLIP": (base, "maskclip"), "same": (base, "maskclip")})["both lower than MaskCLIP"])
    with pytest.raises(ValueError, match="evaluate with bias_grid"):
        bias_table({"MaskCLIP": (evaluate(MaskCLIP(tiny_clip, ["cat", "dog"], templates=["a photo of a {}."]), val,
                                          test_size=32, pd_threshold=0.5, progress=False), "maskclip")})
    text = headline(SimpleNamespace(profile="toy", dataset="toyworld"),
                    pd.DataFrame({"model": ["MaskCLIP"], "mIoU": [1.0]}), pd.DataFrame({"model": ["MaskCLIP"]}), df)
    assert "## Bias" in text and "both lower than MaskCLIP" in text and f"{row.loc['X', 'class TVD']:.3f}" in text


def test_reproduce_refuses_a_parameter_value_of_the_wrong_kind_before_any_kernel():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "reclip_core.reproduce", "-p", "n_val", "abc"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "takes a JSON value" in r.stderr and "Traceback" not in r.stderr, r.stderr
