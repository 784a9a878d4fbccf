"""benchmarks/: the quick run writes a well-formed table, and each release-style path computes the
same numbers as ours (so the speed comparison is apples to apples)."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reclip_core
from benchmarks import harness
from benchmarks.ours import (ours_eval_image, ours_evaluate, ours_feature_cache, ours_hypothesis, ours_scorer,
                             ours_train_epoch, window_geometry)
from benchmarks.release_style import (release_evaluate, release_forward, release_hypothesis, release_loss,
                                      release_loss_from_masks, release_train_epoch)
from benchmarks.rows import BENCH_TEMPLATES
from benchmarks.run import build_rows, main, same_output, time_reproduce
from reclip_core import ReCLIPPP, class_names
from reclip_core.evaluation import evaluate
from reclip_core.loss import gumbel_masked_contrastive_loss
from reclip_core.views import TrainViews
from reclip_core.transforms import TrainTransform, window_boxes

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "benchmarks" / "tiny_clip.json")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return reclip_core.load_clip(TINY, pretrained=None, device="cpu")


@pytest.fixture(scope="module")
def voc_model(tiny):
    torch.manual_seed(1)
    names = class_names("voc")
    model = ReCLIPPP(tiny, names, templates=BENCH_TEMPLATES)
    with torch.no_grad():  # make the bias non-trivial (the Reference tokens start identical)
        model.reference.tokens.normal_(0, 0.5)
    return model


# ---------------------------------------------------------------------------------------------
# Same numbers
# ---------------------------------------------------------------------------------------------
def test_release_forward_equals_cached_eval_forward(voc_model):
    model = voc_model.eval()
    g = torch.Generator().manual_seed(0)
    for H, W in [(48, 64), (40, 40), (48, 64)]:  # the third call hits our cache
        x = torch.randn(2, 3, H, W, generator=g)
        with torch.no_grad():
            ours = model(x)
            rel = release_forward(model, x)
        assert torch.equal(ours["rectified"], rel["rectified"])
        assert torch.allclose(ours["logits"], rel["logits"], atol=1e-6)
        assert ours["bias_logits"].abs().max() > 1e-4  # the bias is not trivially zero
    assert len(model._bias_cache) == 2


def _labelled(n, C, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = torch.randint(0, C, (H, W), generator=g)
        label[:2] = 255
        out.append({"id": f"im{i}", "image": torch.randint(0, 256, (H, W, 3), generator=g, dtype=torch.uint8).numpy(),
                    "label": label.numpy()})
    return out


def test_evaluation_same_metric_and_release_writes_one_file_per_image(voc_model, tmp_path):
    model = voc_model.eval()
    data = _labelled(3, model.num_classes, 45, 60)
    events_o, events_r = [], []
    report = ours_evaluate(model, data, 48, 0.3, lambda e, t: events_o.append((e, t)))
    metric = release_evaluate(model, data, 48, 0.3, tmp_path, lambda e, t: events_r.append((e, t)))
    ours_cm = report.metrics["reclip++"]["pd"].confusion
    assert ours_cm.sum() > 0 and (ours_cm == metric.confusion).all()
    assert [e for e, _ in events_o] == ["start", "end"] * 3 == [e for e, _ in events_r]
    for (_, a), (_, b) in zip(events_o[1::2], events_r[1::2]):
        assert torch.allclose(a, b, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im0.png", "im1.png", "im2.png"]
    # the benchmark's per-image body of `evaluate` (timed one image at a time) equals `evaluate`,
    # for the release's scoring (ReCLIP++ with PD) and for evaluate_run's (every head, PD off and on)
    every = evaluate(model, data, 48, 0.3, progress=False)
    for heads, variants, want in ((("reclip++",), ("pd",), report), (None, ("no_pd", "pd"), every)):
        scorer = ours_scorer(model, 0.3, heads=heads, pd_variants=variants)
        for item in data:
            ours_eval_image(scorer, item, 48)
        assert {h: set(t) for h, t in scorer.metrics.items()} == {h: set(variants) for h in (heads or want.metrics)}
        for head, by_tag in scorer.metrics.items():
            for tag, m in by_tag.items():
                assert (m.confusion == want.metrics[head][tag].confusion).all()
    # a different model gives a different metric: the comparison can fail
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.decoder.conv.weight.mul_(-1)
    assert not (release_evaluate(other, data, 48, 0.3, tmp_path).confusion == ours_cm).all()


def test_release_loss_loop_equals_vectorised_loss_batch1(voc_model, tiny):
    torch.manual_seed(3)
    C = voc_model.num_classes
    logits = torch.randn(1, C, 6, 8)
    feat = torch.nn.functional.normalize(torch.randn(1, 48, 6, 8), dim=1)
    text = voc_model.text
    hyp = [2, 5, 11]
    ours = gumbel_masked_contrastive_loss(logits, feat, text, [hyp], generator=torch.Generator().manual_seed(9))
    rel = release_loss(logits, feat, text, hyp, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(ours, rel, rtol=1e-5, atol=1e-6)
    # a different hypothesis gives a different loss: the comparison can fail
    other = release_loss(logits, feat, text, [2, 5], generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(ours, other, rtol=1e-5, atol=1e-6)


def test_release_loss_loop_equals_vectorised_loss_batched(voc_model):
    torch.manual_seed(4)
    C = voc_model.num_classes
    logits = torch.randn(3, C, 5, 7)
    feat = torch.nn.functional.normalize(torch.randn(3, 48, 5, 7), dim=1)
    hyps = [[0, 3], [7], [1, 2, 19]]
    ours, masks = gumbel_masked_contrastive_loss(logits, feat, voc_model.text, hyps,
                                                 generator=torch.Generator().manual_seed(1), return_masks=True)
    per_image = [release_loss_from_masks(masks[i:i + 1], feat[i:i + 1], voc_model.text, hyps[i]) for i in range(3)]
    assert torch.allclose(ours, torch.stack(per_image).mean(), rtol=1e-5, atol=1e-6)


def _views(model, n=3, crop=32):
    g = torch.Generator().manual_seed(8)
    items = [{"id": f"u{i}", "image": torch.randint(0, 256, (40, 52, 3), generator=g, dtype=torch.uint8).numpy()}
             for i in range(n)]
    hyps = {"u0": [1, 4, 6], "u1": [0], "u2": [2, 19]}
    return TrainViews(items, hyps, model.num_classes, TrainTransform(crop, (2048, crop), (0.5, 2.0)), seed=0)


def test_training_epoch_same_parameters_at_batch_1(voc_model):
    """At batch 1, an epoch of release-style steps (per-class loop) and of the library's training
    step (vectorised loss) end with the same weights."""
    base = copy.deepcopy(voc_model).train()
    views = _views(base)
    params, losses = {}, {}
    for name in ("ours", "release"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.trainable_parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if name == "ours":
            losses[name] = ours_train_epoch(model, opt, views, 1, epoch=1, device=torch.device("cpu"))
        else:
            losses[name] = release_train_epoch(model, opt, views, epoch=1, device=torch.device("cpu"))
        params[name] = model.trainable_state_dict()
    assert losses["ours"] == pytest.approx(losses["release"], rel=1e-5)
    moved = False
    for k, v in params["ours"].items():
        assert torch.allclose(v, params["release"][k], rtol=1e-4, atol=1e-6), k
        moved |= not torch.equal(v, base.trainable_state_dict()[k])
    assert moved


def test_cached_epoch_runs_in_batches(voc_model):
    model = copy.deepcopy(voc_model).train()
    views = _views(model)
    cache = ours_feature_cache(model, views, 2, torch.device("cpu"))
    assert model.training and cache.feats.shape[:2] == (1, 3)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.01, momentum=0.9)
    losses = ours_train_epoch(model, opt, cache, 2, epoch=1, device=torch.device("cpu"))
    assert len(losses) == 2 and all(l == l for l in losses)


def test_hypotheses_batched_equal_per_window(tiny, voc_model):
    image = torch.randint(0, 256, (3, 40, 56), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    window, stride = window_geometry(96)
    assert (window, stride) == (16, 8)
    assert len(window_boxes(40, 56, window, stride)) == 4 * 6
    text = voc_model.text
    hyp_o = ours_hypothesis(tiny, image, text, window, stride, 32, batch_size=10)
    hyp_r, votes_r = release_hypothesis(tiny, image, text, window, stride, 32)
    assert len(votes_r) == 24 and hyp_o == hyp_r
    assert len(hyp_o) > 1  # not a degenerate all-one-class vote


def test_window_count_at_voc_size():
    window, stride = window_geometry(336)
    assert (window, stride) == (56, 28)
    assert len(window_boxes(375, 500, window, stride)) == 192
    assert len(window_boxes(112, 252, window, stride)) == 24  # the timed region of the full CPU run


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------
def test_analytic_flops_match_flop_counter(tiny):
    from torch.utils.flop_counter import FlopCounterMode

    H, W = 40, 50
    x = torch.randn(1, 3, H, W)
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused fast path hides its matmuls from the counter
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            reclip_core.dense_features(tiny, x)
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)
    counted = fc.get_total_flops()
    ours = harness.dense_forward_flops(tiny, H, W)
    n = (-(-H // 8)) * (-(-W // 8)) + 1
    attention = (len(tiny.visual.transformer.resblocks) - 1) * 4 * n * n * tiny.visual.transformer.width
    # the counter may or may not see the attention products (sdpa on CPU), nothing else may differ
    assert counted in (ours, ours - attention)


def test_summarize_and_missed_targets_are_printed():
    s = harness.summarize([3.0, 1.0, 2.0])
    assert s["median"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0 and s["n"] == 3
    with pytest.raises(ValueError):
        harness.summarize([])

    def row(ours, release):
        def path(ts):
            return {"timings": {"forward": ts, "step": ts},
                    "stats": {"forward": harness.summarize(ts), "step": harness.summarize(ts)},
                    "extra": {"classes": 20, "input": [8, 8], "image": [9, 9]}, "memory": None, "output": None}
        return {"paths": {"ours": path(ours), "release": path(release)},
                "round_ratios": {"ours": {k: [r / o for r, o in zip(release, ours)] for k in ("forward", "step")}}}

    rows = build_rows({("eval_voc", "fp32"): row([1.0, 1.0, 1.0], [1.5, 1.4, 1.6])}, ["fp32"], None)
    r1a = next(r for r in rows if r["id"] == "1a")
    assert r1a["ratio"] == "1.50×" and r1a["result"] == "MISSED"
    # the ratio is the median of the per-round ratios, not the ratio of medians
    rows = build_rows({("eval_voc", "fp32"): row([1.0, 2.0, 4.0], [2.5, 5.0, 4.0])}, ["fp32"], None)
    r1a = next(r for r in rows if r["id"] == "1a")
    assert r1a["ratio"] == "2.50×" and r1a["result"] == "met" and r1a["rounds"] == "2.50, 2.50, 1.00"
    rows = build_rows({}, ["fp32"], {"command": "make reproduce", "seconds": 700.0, "returncode": 0})
    assert rows[0]["result"] == "MISSED"
    rows = build_rows({}, ["fp32"], {"command": "make reproduce", "seconds": 5.0, "returncode": 2})
    assert rows[0]["result"].startswith("FAILED")
    assert same_output(torch.zeros(3), torch.ones(3)).startswith("NO")
    assert same_output(torch.zeros(3), torch.zeros(3)).startswith("yes")


def test_reproduce_is_timed_in_a_fresh_results_tree(tmp_path, monkeypatch):
    # a cached run (trained runs, hypotheses) under results/ would make the timing meaningless, and
    # the benchmark must not overwrite the committed results
    monkeypatch.setenv("RECLIP_RESULTS", str(tmp_path / "committed"))
    probe = tmp_path / "seen.txt"
    code = ("import os,pathlib,sys; d=pathlib.Path(os.environ['RECLIP_RESULTS']); "
            f"pathlib.Path({str(probe)!r}).write_text(str(d)+'|'+str(list(d.iterdir())))")
    res = time_reproduce([sys.executable, "-c", code], timeout=60)
    assert res["returncode"] == 0
    seen_dir, listing = probe.read_text().split("|")
    assert seen_dir != str(tmp_path / "committed") and listing == "[]"
    assert not Path(seen_dir).exists()  # cleaned up afterwards


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def _table(md: str):
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    body = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return header, body


def test_quick_run_writes_well_formed_table(tmp_path, capsys):
    out = tmp_path / "bench.md"
    assert main(["--quick", "--in-process", "--repeats", "1", "--out", str(out)]) == 0
    md = out.read_text()
    assert "## Machine" in md and "torch" in md and "threads" in md and "load average" in md
    header, body = _table(md)
    assert header[:7] == ["#", "row", "ours (median)", "release-style (median)", "ratio", "target", "met?"]
    assert all(len(r) == len(header) for r in body)
    ids = [r[0] for r in body]
    assert ids == ["1a", "1b", "1c", "1d", "1e", "1f", "2a", "2b", "3", "4a", "4b"]
    for r in body:
        assert r[6] in ("met", "MISSED", "(info)")
        if r[0] in ("1a", "1b", "2a", "2b", "3"):
            assert re.fullmatch(r"\d+\.\d\d×", r[4])
    same = {r[0]: r[header.index("same output")] for r in body}
    assert same["1a"].startswith("yes") and same["1b"].startswith("yes") and same["3"].startswith("yes")
    assert same["1c"].startswith("yes") and same["1d"].startswith("yes")  # evaluate_run's scoring, same PD numbers
    assert "wrote" in capsys.readouterr().out


def test_worker_process_reports_peak_memory(tmp_path):
    spec = {"row": "eval_voc", "mode": "quick", "device": "cpu", "repeats": 1,
            "amp": None, "threads": 1, "cache_dir": str(tmp_path)}
    out = tmp_path / "res.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--worker", json.dumps(spec),
                           "--worker-out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["threads"] == 1 and set(res["paths"]) == {"ours", "ours_all", "release"}
    for path in ("ours", "ours_all", "release"):
        assert res["paths"][path]["memory"]["peak_mb"] > 0 and res["paths"][path]["memory"]["method"]
        assert res["paths"][path]["stats"]["forward"]["n"] == 1
    assert res["paths"]["release"]["extra"]["prediction_files"] == 1  # one timed image (no own warm-up)
    assert len(res["round_ratios"]["ours"]["forward"]) == 1
