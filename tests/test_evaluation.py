"""Evaluation: padding-aware upsampling, whole-image inference at the test size, PD on/off, both
mIoU definitions, bias map once per input size, hypothesis precision/recall."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from reclip_core.diagnostics import hypothesis_quality
from reclip_core.evaluation import evaluate, evaluate_run, upsample_logits

from .train_fixtures import NAMES, ImageSet, hypotheses_for, tiny_config

COLOURS = np.array([(220, 30, 30), (30, 200, 30), (30, 30, 220)], np.uint8)


def test_upsample_crops_the_padding_before_resizing():
    # input 16 x 20 → padded to 16 x 24 → grid 2 x 3; class 1 wins only in the last column
    logits = torch.zeros(1, 2, 2, 3)
    logits[:, 0, :, :2] = 1.0
    logits[:, 1, :, 2] = 1.0
    pred = upsample_logits(logits, 8, (16, 20), (16, 20)).argmax(1)[0]
    assert pred.shape == (16, 20)
    # the column boundary stays at x = 16 (between the token centres 12 and 20 of the padded input);
    # resizing the grid straight to 20 px would move it to x ≈ 13
    assert (pred[:, :16] == 0).all() and (pred[:, 16:] == 1).all()


class BlockSet:
    """Images made of 8-px vertical stripes of class colours; label = stripe class (class 2 never
    occurs). Stripes, not a checkerboard: bilinear upsampling of a grid is exact at a straight
    boundary between tokens but not at corners where four tokens of two classes meet."""

    def __init__(self, n=3, h=32, w=40):
        self.n, self.h, self.w = n, h, w

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        blocks = np.repeat(rng.integers(0, 2, (1, self.w // 8)), self.h // 8, axis=0)
        label = np.kron(blocks, np.ones((8, 8), np.int64))
        return {"id": f"b{i}", "image": Image.fromarray(COLOURS[label]), "label": label}


class ColourModel(nn.Module):
    """A fake segmenter: per token, logits from the mean colour (a perfect reader of BlockSet);
    its 'maskclip' head always says class 0."""

    def __init__(self):
        super().__init__()
        self.class_names = list(NAMES)
        self.clip = nn.Module()
        self.clip.visual = nn.Module()
        self.clip.visual.patch_size = (8, 8)
        self.clip.visual.conv1 = nn.Conv2d(3, 1, 1)
        self.use_decoder = True
        self.inputs = []

    def forward(self, images):
        self.inputs.append(tuple(images.shape))
        mean = nn.functional.avg_pool2d(images, 8)  # [1, 3, h, w], CLIP-normalised colours
        ref = (torch.tensor(COLOURS, dtype=torch.float32) / 255 - torch.tensor([0.48, 0.46, 0.41])) / 0.27
        dist = ((mean[:, None] - ref[None, :, :, None, None]) ** 2).sum(2)  # [1, C, h, w]
        logits = -dist
        const = torch.zeros_like(logits)
        const[:, 0] = 1.0
        return {"clip_logits": const, "rectified": logits, "logits": logits}


def test_evaluate_perfect_and_constant_heads():
    ds = BlockSet()
    labels = np.concatenate([ds[i]["label"].ravel() for i in range(len(ds))])
    model = ColourModel()
    rep = evaluate(model, ds, test_size=64, pd_threshold=0.5, progress=False)
    # whole image at the test size: short side 32 → 64, one forward per image
    assert model.inputs == [(1, 3, 64, 80)] * 3
    for tag in ("no_pd", "pd"):
        m = rep.metrics["reclip++"][tag]
        assert m.miou() == pytest.approx(100.0)  # classes 0 and 1 perfect; class 2 absent
        assert m.miou_release() == pytest.approx(200.0 / 3)  # absent class counts 0, divided by C
    frac0 = (labels == 0).mean()
    assert rep.metrics["maskclip"]["no_pd"].miou() == pytest.approx(100 * frac0 / 2)  # IoU(0)=frac0, IoU(1)=0
    summary = rep.summary()
    assert list(summary["model"]) == ["maskclip", "rectified", "reclip++"]
    table = rep.per_class("reclip++")
    assert list(table["class"]) == NAMES and np.isnan(table["iou"].iloc[2])
    wide = rep.per_class_iou()
    assert list(wide.columns) == ["class", "maskclip", "rectified", "reclip++"] and list(wide["class"]) == NAMES
    assert wide["reclip++"].iloc[:2].tolist() == pytest.approx([100.0, 100.0])
    # the constant head predicts class 0 everywhere: IoU(0) = its pixel share, IoU(1) = 0
    assert wide["maskclip"].iloc[:2].tolist() == pytest.approx([100 * frac0, 0.0])
    assert "reclip++" in rep.format()


def test_presence_filter_changes_the_prediction():
    class Weak(ColourModel):
        def forward(self, images):
            out = super().forward(images)
            lg = nn.functional.one_hot(out["logits"].argmax(1), 3).permute(0, 3, 1, 2).float()
            lg[:, 2, :, 0] = 1.05  # class 2 narrowly wins in the first token column, never confident
            out["logits"] = lg
            return out

    rep = evaluate(Weak(), BlockSet(), test_size=32, pd_threshold=0.9, progress=False, heads=["reclip++"])
    off, on = rep.metrics["reclip++"]["no_pd"], rep.metrics["reclip++"]["pd"]
    assert off.pred_pixels[2] > 0 and off.miou() < 100
    # softmax(10 * [1, 0, 1.05]) peaks at 0.62 < 0.9 for class 2: PD drops it everywhere (a true
    # class seen only in that column is dropped too: PD is per image and per class)
    assert on.pred_pixels[2] == 0 and on.miou() > off.miou()


def test_bias_map_is_computed_once_per_input_size(tiny_clip):
    from reclip_core.model import ReCLIPPP

    model = ReCLIPPP(tiny_clip, NAMES, templates=["a photo of a {}."])
    calls = []
    real = model.reference.forward
    model.reference.forward = lambda: (calls.append(1), real())[1]
    ds = ImageSet(6, labels=True)  # 3 image sizes → 3 input sizes at test size 32
    rep = evaluate(model, ds, test_size=32, pd_threshold=0.5, progress=False)
    assert len(calls) == 3
    assert set(rep.metrics) == {"maskclip", "rectified", "reclip++"}


def test_evaluate_needs_labels():
    with pytest.raises(ValueError, match="labelled"):
        evaluate(ColourModel(), ImageSet(2), test_size=32, pd_threshold=0.5, progress=False)


def test_hypothesis_quality_by_hand():
    class Labels:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            lab = np.full((4, 4), 255, np.int64)
            if i == 0:
                lab[0, 0], lab[1, 1] = 0, 1  # classes {0, 1}
            else:
                lab[2, 2] = 2  # {2}
            return {"id": f"x{i}", "image": None, "label": lab}

    q = hypothesis_quality({"x0": [0, 2], "x1": [2]}, Labels(), 3)
    # TP: (x0,0), (x1,2) = 2; FP: (x0,2) = 1; FN: (x0,1) = 1
    assert q["precision"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(2 / 3)
    assert q["exact_match"] == pytest.approx(0.5)
    assert q["per_class_recall"][1] == 0.0 and q["per_class_precision"][2] == pytest.approx(0.5)
    with pytest.raises(KeyError):
        hypothesis_quality({"x0": [0]}, Labels(), 3)


def test_evaluate_run_last_checkpoint_and_outputs(tmp_path, tiny_clip):
    from reclip_core.training import train

    cfg = tiny_config(tmp_path / "run", epoch=1)
    val = ImageSet(4, labels=True)
    with pytest.warns(UserWarning, match="MaskCLIP only"):
        base = evaluate_run(cfg, dataset=val, clip=tiny_clip, progress=False, save=False)
    assert list(base.metrics) == ["maskclip"]
    train(cfg, dataset=ImageSet(8), hypotheses=hypotheses_for(8), clip=tiny_clip, progress=False)
    rep = evaluate_run(cfg, dataset=val, clip=tiny_clip, progress=False)
    assert list(rep.metrics) == ["maskclip", "rectified", "reclip++"]
    assert rep.info["epoch"] == 1 and rep.info["finished"] is True
    # the MaskCLIP head of the trained model is the untrained baseline
    np.testing.assert_array_equal(rep.metrics["maskclip"]["no_pd"].confusion, base.metrics["maskclip"]["no_pd"].confusion)
    files = sorted(p.name for p in (tmp_path / "run" / "eval").iterdir())
    assert "metrics.json" in files and "summary.csv" in files
    assert len(files) == 2 + 3 * 2  # dataset-level tables only, nothing per image


def test_batched_evaluation_equals_one_image_at_a_time(tiny_clip):
    from reclip_core.model import ReCLIPPP

    model = ReCLIPPP(tiny_clip, NAMES, templates=["a photo of a {}."])
    ds = ImageSet(9, labels=True, sizes=((40, 48), (40, 48), (32, 32)))  # runs of equal sizes
    one = evaluate(model, ds, test_size=32, pd_threshold=0.5, progress=False, batch_size=1)
    many = evaluate(model, ds, test_size=32, pd_threshold=0.5, progress=False, batch_size=4)
    for head in one.metrics:
        for tag in ("no_pd", "pd"):
            np.testing.assert_array_equal(one.metrics[head][tag].confusion, many.metrics[head][tag].confusion)


def test_token_labels_majority_per_patch_with_padding():
    from reclip_core.diagnostics import token_labels

    label = np.full((12, 20), 255, np.int64)
    label[0:8, 0:6] = 1          # token (0, 0): 6 of 8 columns are class 1
    label[0:8, 8:16] = 0         # token (0, 1): all class 0
    label[8:12, 0:20] = 2        # bottom row of tokens: 4 rows of class 2, 4 rows of padding -> tie
    label[8:12, 16:20] = 7       # an out-of-range class counts as ignored
    tok = token_labels(label, (12, 20), patch=8, num_classes=3)
    assert tok.shape == (2, 3)   # 12 x 20 padded to 16 x 24
    assert tok[0].tolist() == [1, 0, 3]  # columns 16-23: ignored label, then padding
    assert tok[1, 0].item() == 2  # 32 class-2 pixels vs 32 padding: ties go to the class
    assert tok[1, 2].item() == 3  # class 7 of 3 classes is ignored


def test_loss_preference_rows_and_the_loss_of_each_segmentation(tiny_clip):
    import pandas as pd

    from reclip_core.diagnostics import loss_preference
    from reclip_core.loss import gumbel_masked_contrastive_loss
    from reclip_core.model import MaskCLIP, ReCLIPPP
    from reclip_core.transforms import eval_preprocess

    model = ReCLIPPP(tiny_clip, NAMES, templates=["a photo of a {}."])
    ds = ImageSet(4, labels=True, sizes=((32, 32),))
    every = {f"img{i:03d}": list(range(len(NAMES))) for i in range(4)}
    got = loss_preference(model, ds, every, test_size=32, score_scales=(100, 5))
    assert list(got.index) == ["MaskCLIP argmax", "MaskCLIP argmax within the hypothesis",
                               "truth (other tokens: MaskCLIP argmax)", "model"]
    assert list(got.columns) == ["scale 100", "scale 5"]
    # with every class in the hypothesis, restricting MaskCLIP to it changes nothing
    pd.testing.assert_series_equal(got.iloc[0], got.iloc[1], check_names=False)
    # the MaskCLIP row by hand: the loss of the one-hot argmax masks, image by image
    want = []
    with torch.no_grad():
        for i in range(4):
            out = model.eval()(images=eval_preprocess(ds[i]["image"], 32))
            m = torch.nn.functional.one_hot(out["clip_logits"].argmax(1), len(NAMES)).permute(0, 3, 1, 2).float()
            want.append(float(gumbel_masked_contrastive_loss(m * 1e4, out["feat"], model.text, [every[f"img{i:03d}"]],
                                                             gumbel_scale=1.0, score_scale=5.0)))
    assert got.loc["MaskCLIP argmax", "scale 5"] == pytest.approx(np.mean(want), rel=1e-5)
    # a one-class hypothesis: restricted to it, every token is that class; the truth differs from MaskCLIP
    one = {f"img{i:03d}": [0] for i in range(4)}
    got1 = loss_preference(MaskCLIP(tiny_clip, NAMES, templates=["a photo of a {}."]), ds, one, test_size=32)
    assert "model" not in got1.index and got1.shape == (3, 1)
    assert np.isfinite(got1.values).all() and got1.iloc[1, 0] != got1.iloc[0, 0]
    with pytest.raises(KeyError, match="compute hypotheses on this split first"):
        loss_preference(model, ds, {"img000": [0]}, test_size=32)
    with pytest.raises(ValueError, match="no image with a non-empty hypothesis"):
        loss_preference(model, ds, {k: [] for k in every}, test_size=32)


def test_class_terms_compare_each_true_mask_with_an_empty_one(tiny_clip):
    import math

    import pandas as pd

    from reclip_core.diagnostics import class_terms, token_labels
    from reclip_core.evaluation import patch_size
    from reclip_core.loss import gumbel_masked_contrastive_loss
    from reclip_core.model import MaskCLIP
    from reclip_core.transforms import eval_preprocess

    model = MaskCLIP(tiny_clip, NAMES, templates=["a photo of a {}."])
    ds = ImageSet(4, labels=True, sizes=((32, 32),))
    C = len(NAMES)
    hyps = {f"img{i:03d}": list(range(C)) if i % 2 else [0] for i in range(4)}
    torch.manual_seed(1)
    got = class_terms(model, ds, hyps, test_size=32, score_scale=5.0).set_index("class")
    torch.manual_seed(2)  # fixed masks: no Gumbel draw changes a term
    pd.testing.assert_frame_equal(class_terms(model, ds, hyps, test_size=32, score_scale=5.0).set_index("class"), got)
    # by hand: per image, each labelled class of its hypothesis, the term of its one-hot true mask
    want = {k: [] for k in range(C)}
    change = {k: [] for k in range(C)}

    def image_loss(seg, feat, hyp):
        m = torch.nn.functional.one_hot(seg, C).permute(2, 0, 1)[None].float() * 1e4
        return float(gumbel_masked_contrastive_loss(m, feat, model.text, [hyp], gumbel_scale=1.0, score_scale=5.0))

    with torch.no_grad():
        for i in range(4):
            x = eval_preprocess(ds[i]["image"], 32)
            out = model.eval()(images=x)
            tok = token_labels(ds[i]["label"], tuple(x.shape[-2:]), patch_size(model), C)
            hyp = hyps[f"img{i:03d}"]
            mc = out["clip_logits"][0]
            for k in set(tok.unique().tolist()) & set(hyp):
                # k's mask: its labelled tokens; every other token to another class
                m = torch.zeros(1, C, *tok.shape)
                m[0, k], m[0, (k + 1) % C] = (tok == k) * 1e4, (tok != k) * 1e4
                want[k].append(float(gumbel_masked_contrastive_loss(m, out["feat"], model.text, [[k]],
                                                                    gumbel_scale=1.0, score_scale=5.0)))
                # the whole image's loss with k's tokens given to MaskCLIP's best other class
                truth = torch.where(tok == C, mc.argmax(0), tok)
                rival = mc.clone()
                rival[k] = -1e9
                dropped = torch.where(truth == k, rival.argmax(0), truth)
                assert not (dropped == k).any()
                change[k].append(image_loss(dropped, out["feat"], hyp) - image_loss(truth, out["feat"], hyp))
    assert sum(len(v) for v in want.values()) > 0
    for k, name in enumerate(NAMES):
        assert got.loc[name, "images"] == len(want[k])
        assert got.loc[name, "empty mask"] == pytest.approx(math.log(C))
        if want[k]:
            assert got.loc[name, "true mask"] == pytest.approx(np.mean(want[k]), rel=1e-5)
            share = 100 * np.mean(np.asarray(want[k]) > math.log(C))
            assert got.loc[name, "true mask above empty %"] == pytest.approx(share)
            assert got.loc[name, "loss change, given away"] == pytest.approx(np.mean(change[k]), rel=1e-5, abs=1e-7)
            lowers = 100 * np.mean(np.asarray(change[k]) < 0)
            assert got.loc[name, "giving away lowers the loss %"] == pytest.approx(lowers)
        else:
            assert np.isnan(got.loc[name, "true mask"])
    # the empty mask's log C is the loss's own: class 1 everywhere leaves class 0's mask empty
    feat = torch.randn(1, model.text.shape[1], 2, 2, generator=torch.Generator().manual_seed(0))
    class1 = torch.zeros(1, C, 2, 2)
    class1[:, 1] = 1e4
    assert float(gumbel_masked_contrastive_loss(class1, feat, model.text, [[0]], gumbel_scale=1.0,
                                                score_scale=5.0)) == pytest.approx(math.log(C))


# --------------------------------------------------------------------------------------------
# PD read from one upsampling: identical to upsampling the filtered logits
# --------------------------------------------------------------------------------------------
def _old_pd_pred(logits, threshold, scale, patch, input_hw, label_hw, mode="crop"):
    """The reference: PD's logits upsampled on their own, then the argmax."""
    from reclip_core.rectify import presence_filter

    return upsample_logits(presence_filter(logits, threshold, scale=scale), patch, input_hw, label_hw,
                           mode=mode).argmax(dim=1)


@pytest.mark.parametrize("mode", ["crop", "release"])
@pytest.mark.parametrize("case", range(8))
def test_pd_argmax_equals_upsampling_the_filtered_logits(mode, case):
    from reclip_core.eval_scoring import _PDArgmax
    from reclip_core.rectify import presence_filter

    # (classes, batch, grid, input, label, threshold): all kept, some kept, none kept (threshold 1:
    # every class removed, the prediction then rests on the rounding of the upsampled constant)
    C, B, grid, inp, lab, thr = [(20, 1, (6, 8), (48, 64), (45, 60), 1.0), (20, 2, (6, 8), (41, 60), (45, 60), 0.3),
                                 (150, 1, (8, 11), (64, 85), (48, 64), 0.05), (150, 1, (8, 11), (64, 85), (64, 85), 1.0),
                                 (7, 3, (5, 5), (33, 40), (70, 71), 0.5), (3, 2, (4, 6), (32, 48), (32, 48), 0.0),
                                 (59, 1, (7, 9), (56, 70), (90, 111), 0.2), (1, 2, (3, 4), (20, 30), (21, 29), 0.9)][case]
    g = torch.Generator().manual_seed(case)
    logits = torch.randn(B, C, *grid, generator=g) * 0.3
    if C >= 7:
        logits[:, 3] = logits[:, 1]  # exact ties: the first of equal maxima wins in both
        logits[:, 5] = logits[:, 4] - 150.0  # a class below the removed classes' -100
    for scale in (10.0, 100.0):
        pd_logits = presence_filter(logits, thr, scale=scale)
        want = _old_pd_pred(logits, thr, scale, 8, inp, lab, mode)
        up = upsample_logits(logits, 8, inp, lab, mode=mode)
        pd = _PDArgmax(8, mode)
        for pred in (None, up.argmax(dim=1)):
            assert torch.equal(pd(up, pd_logits, (inp, lab), pred), want)


def test_upsampled_removed_class_stays_within_the_floor():
    """The bound the PD shortcut rests on: a constant -100 map upsampled stays far above -99.9 of
    the floor's margin (measured: a few float32 ulps), and the rounding differs between classes."""
    from reclip_core.eval_scoring import _FLOOR, FILTERED_LOGIT

    worst = 0.0
    for grid, inp, lab in [((6, 8), (48, 64), (45, 60)), ((21, 28), (336, 448), (375, 500)), ((32, 43), (512, 683), (384, 512))]:
        for mode in ("crop", "release"):
            const = upsample_logits(torch.full((1, 20, *grid), FILTERED_LOGIT), 16, inp, lab, mode=mode)
            worst = max(worst, float((const - FILTERED_LOGIT).abs().max()))
    assert worst < 1e-4 < _FLOOR - FILTERED_LOGIT


class _Wild(ColourModel):
    """Three heads of different kinds: a constant one, the colour reader, and logits that are a
    fixed function of each token's colour, with ties and a class far below -100."""

    def forward(self, images):
        out = super().forward(images)
        proj = torch.randn(3, 3, generator=torch.Generator().manual_seed(5))
        noisy = torch.sin(4 * torch.einsum("bchw,cd->bdhw", nn.functional.avg_pool2d(images, 8), proj)) * 0.2
        noisy[:, 2] = noisy[:, 1]
        noisy[:, 0, 0] -= 200.0
        out["logits"] = noisy
        return out


def _reference_evaluation(model, ds, test_size, pd_threshold, batch_size):
    """The evaluation loop with every head's PD logits upsampled on their own (the reference):
    batches of equal input size, one upsampling per batch when its label sizes agree."""
    from reclip_core.eval_scoring import HEAD_KEYS
    from reclip_core.metrics import SegMetric
    from reclip_core.rectify import presence_filter
    from reclip_core.transforms import eval_preprocess

    metrics = {h: {t: SegMetric(3) for t in ("no_pd", "pd")} for h in HEAD_KEYS}
    batches, cur = [], []
    for i in range(len(ds)):
        x, lab = eval_preprocess(ds[i]["image"], test_size), np.asarray(ds[i]["label"], np.int64)
        if cur and (x.shape != cur[0][0].shape or len(cur) >= batch_size):
            batches.append(cur)
            cur = []
        cur.append((x, lab))
    batches.append(cur)
    with torch.no_grad():
        for batch in batches:
            x = torch.cat([b[0] for b in batch])
            out = model(images=x)
            same = len({b[1].shape for b in batch}) == 1
            groups = [list(range(len(batch)))] if same else [[j] for j in range(len(batch))]
            for js in groups:
                target = torch.from_numpy(np.stack([batch[j][1] for j in js]))
                sizes = (tuple(x.shape[-2:]), tuple(target.shape[-2:]))
                for head, key in HEAD_KEYS.items():
                    lg = out[key]
                    metrics[head]["no_pd"].update(upsample_logits(lg[js], 8, *sizes).argmax(1), target)
                    pd_lg = presence_filter(lg, pd_threshold, scale=10.0)[js]
                    metrics[head]["pd"].update(upsample_logits(pd_lg, 8, *sizes).argmax(1), target)
    return metrics


@pytest.mark.parametrize("pd_threshold", [0.4, 0.9, 1.0])
def test_evaluate_equals_the_reference_loop(pd_threshold):
    ds = ImageSet(7, labels=True, sizes=((40, 48), (40, 48), (33, 51)))
    for batch_size in (1, 3):
        want = _reference_evaluation(_Wild(), ds, 36, pd_threshold, batch_size)
        rep = evaluate(_Wild(), ds, test_size=36, pd_threshold=pd_threshold, progress=False, batch_size=batch_size)
        for head, by_tag in want.items():
            for tag, m in by_tag.items():
                np.testing.assert_array_equal(rep.metrics[head][tag].confusion, m.confusion, err_msg=f"{head} {tag}")
    # only what is asked for is scored; what is scored does not change
    rep = evaluate(_Wild(), ds, test_size=36, pd_threshold=pd_threshold, progress=False, heads=["reclip++"],
                   pd_variants=("pd",))
    assert {h: list(t) for h, t in rep.metrics.items()} == {"reclip++": ["pd"]}
    np.testing.assert_array_equal(rep.metrics["reclip++"]["pd"].confusion, want["reclip++"]["pd"].confusion)
    assert rep.summary()["mIoU_no_pd"].isna().all() and "-" in rep.format()
    with pytest.raises(ValueError, match="pd_variants"):
        evaluate(_Wild(), ds, test_size=36, pd_threshold=0.5, progress=False, pd_variants=("both",))
