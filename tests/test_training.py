"""Training machinery: schedule, label-free views, exact resume, non-finite loss, feature cache."""
from __future__ import annotations

import builtins
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from reclip_core.checkpoint import load_checkpoint
from reclip_core.training import NonFiniteLossError, poly_lr, train
from reclip_core.transforms import TrainTransform, sample_seed
from reclip_core.views import TrainViews

from .train_fixtures import NAMES, ImageSet, hypotheses_for, scene, tiny_config


class Interrupt(Exception):
    pass


def test_poly_lr_per_epoch():
    assert poly_lr(0.01, 0, 200) == pytest.approx(0.01)
    assert poly_lr(0.01, 50, 200) == pytest.approx(0.01 * (150 / 200) ** 0.9)
    assert poly_lr(0.16, 299, 300) == pytest.approx(0.16 * (1 / 300) ** 0.9)


def test_train_transform_seeded_and_shaped():
    t = TrainTransform(32, (2048, 32), (0.5, 2.0))
    img, _ = scene(1, 40, 48)
    a, b, c = t(img, 7), t(img, 7), t(img, 8)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the caller's RNG is left alone (views are drawn in a forked RNG)
    torch.manual_seed(0)
    x = torch.rand(3)
    torch.manual_seed(0)
    t(img, 9)
    assert torch.equal(torch.rand(3), x)


def test_train_transform_pads_small_views_with_zeros():
    t = TrainTransform(64, (20, 16), (1.0, 1.0), flip=False, photometric=False)  # no rescale
    out = t(Image.new("RGB", (20, 16), (255, 255, 255)), 0)
    assert out.shape == (3, 64, 64)
    assert torch.all(out[:, 16:, :] == 0) and torch.all(out[:, :, 20:] == 0)
    assert torch.all(out[:, :16, :20] > 0)


def test_train_views_refuse_labelled_items():
    views = TrainViews(ImageSet(4, labels=True), hypotheses_for(4), 3, TrainTransform(32, (2048, 32)))
    with pytest.raises(ValueError, match="unsupervised"):
        views[0]


def test_train_views_need_a_hypothesis_per_image():
    views = TrainViews(ImageSet(4), {}, 3, TrainTransform(32, (2048, 32)))
    with pytest.raises(KeyError, match="hypothes"):
        views[0]


def test_views_depend_on_seed_epoch_index_only():
    views = TrainViews(ImageSet(4), hypotheses_for(4), 3, TrainTransform(32, (2048, 32)), seed=3)
    views.epoch = 1
    a = views[2]["image"]
    views.epoch = 2
    b = views[2]["image"]
    views.epoch = 1
    assert torch.equal(views[2]["image"], a) and not torch.equal(a, b)
    assert views.view_seed(2) == sample_seed(3, "aug", 1, 2)


class OnDiskTrain:
    """A train reader over a folder with images/ and labels/: like the real readers it holds no
    label path, so a label file opened during training would come from the training code."""

    def __init__(self, root: Path, n: int):
        self.paths = [root / "images" / f"img{i:03d}.png" for i in range(n)]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return {"id": self.paths[i].stem, "image": im.convert("RGB")}


def test_training_path_never_opens_a_label_file(tmp_path, tiny_clip, monkeypatch):
    from reclip_core.hypothesis import compute_hypotheses

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(8):
        img, label = scene(i)
        img.save(tmp_path / "images" / f"img{i:03d}.png")
        Image.fromarray(label.astype(np.uint8)).save(tmp_path / "labels" / f"img{i:03d}.png")
    opened = []
    real_open = builtins.open

    def spy_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    import PIL.Image

    real_pil_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a, **k: (opened.append(str(fp)), real_pil_open(fp, *a, **k))[1])
    cfg = tiny_config(tmp_path / "run", epoch=1, batch_size=4)
    ds = OnDiskTrain(tmp_path, 8)
    hyps = compute_hypotheses(tiny_clip, ds, NAMES, tmp_path / "run" / "hypotheses.json",
                              templates=["a photo of a {}."], window=16, stride=8, progress=False)
    train(cfg, dataset=ds, hypotheses=hyps, clip=tiny_clip, progress=False)
    images_read = [p for p in opened if "images" in p]
    assert len(images_read) >= 16  # hypotheses + one epoch really read the images through the spy
    assert not [p for p in opened if "labels" in p]


def _weights(run):
    return load_checkpoint(run).weights


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, tiny_clip):
    n = 12  # 3 steps per epoch at batch 4, 2 epochs
    full = train(tiny_config(tmp_path / "a"), dataset=ImageSet(n), hypotheses=hypotheses_for(n),
                 clip=tiny_clip, progress=False)
    assert full.steps == 6

    cfg_b = tiny_config(tmp_path / "b", checkpoint_every=2)

    def stop_at_5(ev):
        if ev["step"] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg_b, dataset=ImageSet(n), hypotheses=hypotheses_for(n), clip=tiny_clip, progress=False,
              callback=stop_at_5)
    state = load_checkpoint(tmp_path / "b").state
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (1, 1, 4)  # mid-epoch checkpoint

    after = []
    resumed = train(cfg_b, dataset=ImageSet(n), hypotheses=hypotheses_for(n), clip=tiny_clip, progress=False,
                    callback=lambda ev: after.append(ev["step"]))
    assert after == [5, 6]  # continued at the batch after the checkpoint
    assert resumed.steps == 6
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa = load_checkpoint(tmp_path / "a").optimizer["state"]
    ob = load_checkpoint(tmp_path / "b").optimizer["state"]
    for i in oa:
        assert torch.equal(oa[i]["momentum_buffer"], ob[i]["momentum_buffer"])
    la = pd.read_csv(tmp_path / "a" / "loss.csv")
    lb = pd.read_csv(tmp_path / "b" / "loss.csv")
    assert list(la["step"]) == list(lb["step"]) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(la["loss"].to_numpy(), lb["loss"].to_numpy())
    assert load_checkpoint(tmp_path / "b").state["finished"] is True


def test_training_changes_the_heads_and_logs_every_step(tmp_path, tiny_clip):
    from reclip_core.model_factory import build_model

    n = 8
    cfg = tiny_config(tmp_path / "run", epoch=2, batch_size=2)
    res = train(cfg, dataset=ImageSet(n), hypotheses=hypotheses_for(n), clip=tiny_clip, progress=False)
    torch.manual_seed(cfg["seed"])  # seeded like the run's initialisation
    init = build_model(cfg, clip=tiny_clip).trainable_state_dict()
    trained = _weights(tmp_path / "run")
    assert not torch.equal(init["decoder.conv.weight"], trained["decoder.conv.weight"])
    assert not torch.equal(init["reference.tokens"], trained["reference.tokens"])
    log = pd.read_csv(tmp_path / "run" / "loss.csv")
    assert len(log) == res.steps == 8
    assert np.isfinite(log["loss"]).all()
    # poly per epoch: epoch 2 runs at the decayed rate
    assert log.loc[log.epoch == 2, "lr"].iloc[0] == pytest.approx(poly_lr(0.01, 1, 4))


def _denormal_kept() -> bool:
    # 1e-39 is a float32 denormal: kept, it doubles to 2e-39; flushed, it reads and writes as 0
    return (torch.tensor([1e-39]) * 2).item() != 0.0


def test_training_flushes_denormals_and_keeps_them_again_afterwards(tmp_path, tiny_clip):
    from reclip_core.denormals import flushed_denormals

    with flushed_denormals() as supported:
        pass
    if not supported:
        pytest.skip("this CPU cannot flush denormals")
    assert _denormal_kept()
    seen = []
    n = 4
    train(tiny_config(tmp_path / "run", epoch=1, batch_size=2), dataset=ImageSet(n), hypotheses=hypotheses_for(n),
          clip=tiny_clip, progress=False, callback=lambda info: seen.append(_denormal_kept()))
    assert seen == [False, False]  # every step ran flushed
    assert _denormal_kept()  # torch's default again for whatever runs next
    with pytest.raises(Interrupt), flushed_denormals():
        raise Interrupt  # a run stopped by an error restores it too
    assert _denormal_kept()


def test_refuses_to_resume_a_different_config(tmp_path, tiny_clip):
    train(tiny_config(tmp_path / "r", epoch=1), dataset=ImageSet(8), hypotheses=hypotheses_for(8),
          clip=tiny_clip, progress=False)
    with pytest.raises(ValueError, match="different config"):
        train(tiny_config(tmp_path / "r", epoch=2, lr=0.5), dataset=ImageSet(8), hypotheses=hypotheses_for(8),
              clip=tiny_clip, progress=False)
    # only resume-free keys changed (more epochs): continues
    res = train(tiny_config(tmp_path / "r", epoch=2), dataset=ImageSet(8), hypotheses=hypotheses_for(8),
                clip=tiny_clip, progress=False)
    assert res.steps == 4


def test_refuses_to_resume_with_other_clip_weights(tmp_path, tiny_clip):
    import copy

    train(tiny_config(tmp_path / "r", epoch=1), dataset=ImageSet(8), hypotheses=hypotheses_for(8),
          clip=tiny_clip, progress=False)
    other = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        other.visual.conv1.weight.mul_(1.01)
    with pytest.raises(ValueError, match="different config") as err:
        train(tiny_config(tmp_path / "r", epoch=2), dataset=ImageSet(8), hypotheses=hypotheses_for(8),
              clip=other, progress=False)
    assert err.value.path == tmp_path / "r"  # a StaleFileError naming the run folder


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_clip, monkeypatch):
    from reclip_core.model import ReCLIPPP

    calls = {"n": 0}
    real = ReCLIPPP.loss

    def poisoned(self, out, hyp, generator=None, return_masks=False):
        calls["n"] += 1
        loss = real(self, out, hyp, generator=generator)
        return loss * float("nan") if calls["n"] > 8 else loss  # step 3 of batch 4 → 9th image

    monkeypatch.setattr(ReCLIPPP, "loss", poisoned)
    n = 8  # 2 steps per epoch: epoch 1 ends at step 2 (checkpoint), the NaN comes at step 3
    cfg = tiny_config(tmp_path / "run", epoch=2)
    with pytest.raises(NonFiniteLossError, match="non-finite") as err:
        train(cfg, dataset=ImageSet(n), hypotheses=hypotheses_for(n), clip=tiny_clip, progress=False)
    assert "last good checkpoint" in str(err.value) and "step 3" in str(err.value)
    ck = load_checkpoint(tmp_path / "run")
    assert ck.state["step"] == 2 and ck.state["finished"] is False
    assert all(torch.isfinite(v.float()).all() for v in ck.weights.values())


def test_feature_cache_skips_the_clip_forward_during_epochs(tmp_path, tiny_clip, monkeypatch):
    import reclip_core.model as model_mod

    n = 8
    calls = {"images": 0}
    real = model_mod.dense_features

    def counting(clip, images, **kw):
        calls["images"] += images.shape[0]
        return real(clip, images, **kw)

    monkeypatch.setattr(model_mod, "dense_features", counting)
    cfg = tiny_config(tmp_path / "run", epoch=3, feature_cache=True, feature_cache_views=2)
    res = train(cfg, dataset=ImageSet(n), hypotheses=hypotheses_for(n), clip=tiny_clip, progress=False)
    assert calls["images"] == 2 * n  # the cache: 2 fixed views per image, nothing during 3 epochs
    assert (tmp_path / "run" / "feature_cache.safetensors").is_file()
    assert res.steps == 6 and math.isfinite(res.last_loss)
    # a second run reuses the cache file: no CLIP forward at all
    calls["images"] = 0
    train(tiny_config(tmp_path / "run", epoch=3, feature_cache=True, feature_cache_views=2), dataset=ImageSet(n),
          hypotheses=hypotheses_for(n), clip=tiny_clip, progress=False, resume=False)
    assert calls["images"] == 0
    # other view settings → other views: the cache is rebuilt, not reused
    train(tiny_config(tmp_path / "run", epoch=3, feature_cache=True, feature_cache_views=2, scale_range=[1.0, 1.0]),
          dataset=ImageSet(n), hypotheses=hypotheses_for(n), clip=tiny_clip, progress=False, resume=False)
    assert calls["images"] == 2 * n


def test_global_batch_must_split_over_processes_and_fit_the_data(tmp_path, tiny_clip):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(tiny_config(tmp_path / "r", batch_size=16), dataset=ImageSet(8), hypotheses=hypotheses_for(8),
              clip=tiny_clip, progress=False)


def test_heads_start_the_same_whether_clip_is_loaded_or_passed_in():
    # the CLI loads the CLIP inside build_model, the notebooks pass theirs in: same initial heads
    from reclip_core.clip_loading import load_clip
    from reclip_core.config import load_config
    from reclip_core.model_factory import build_model

    cfg = load_config("toy")
    torch.manual_seed(cfg["seed"])
    loaded_here = build_model(cfg, device="cpu").trainable_state_dict()
    clip = load_clip("toy", "biased", device="cpu")
    torch.manual_seed(cfg["seed"])
    passed_in = build_model(cfg, clip=clip, device="cpu").trainable_state_dict()
    assert loaded_here.keys() == passed_in.keys()
    for k in loaded_here:
        assert torch.equal(loaded_here[k], passed_in[k]), k


def test_gumbel_scale_key_overrides_the_method_constant_for_the_loss(tmp_path, tiny_clip):
    from reclip_core.loss import gumbel_masked_contrastive_loss
    from reclip_core.model import ReCLIP, ReCLIPPP
    from reclip_core.model_factory import build_model

    assert build_model(tiny_config(tmp_path / "a"), clip=tiny_clip).gumbel_scale == ReCLIPPP.gumbel_scale == 100.0
    assert build_model(tiny_config(tmp_path / "a"), clip=tiny_clip, kind="reclip").gumbel_scale == ReCLIP.gumbel_scale
    model = build_model(tiny_config(tmp_path / "b", gumbel_scale=1), clip=tiny_clip).eval()
    assert model.gumbel_scale == 1.0 and ReCLIPPP.gumbel_scale == 100.0  # the class constant is untouched
    with torch.no_grad():
        out = model(images=torch.randn(2, 3, 32, 32))
    hyps = [[0], [1]]
    got = model.loss(out, hyps, generator=torch.Generator().manual_seed(0))
    want = gumbel_masked_contrastive_loss(out["logits"], out["feat"], model.text, hyps, gumbel_scale=1.0,
                                          generator=torch.Generator().manual_seed(0))
    other = gumbel_masked_contrastive_loss(out["logits"], out["feat"], model.text, hyps, gumbel_scale=100.0,
                                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want) and not torch.equal(got, other)
    with pytest.raises(ValueError, match="'gumbel_scale' must be > 0 or null"):
        tiny_config(tmp_path / "c", gumbel_scale=0)  # refused when the config is loaded


def test_score_scale_key_sets_the_loss_score_scale_or_reads_the_clip_temperature(tmp_path, tiny_clip):
    from reclip_core.backbone import logit_scale
    from reclip_core.loss import gumbel_masked_contrastive_loss
    from reclip_core.model import ReCLIPPP
    from reclip_core.model_factory import build_model

    assert build_model(tiny_config(tmp_path / "a"), clip=tiny_clip).score_scale == ReCLIPPP.score_scale == 100.0
    saved = tiny_clip.logit_scale.detach().clone()  # the fixture is shared by the whole session
    try:
        with torch.no_grad():
            tiny_clip.logit_scale.fill_(math.log(7.5))  # a CLIP with its own temperature
        assert logit_scale(tiny_clip) == pytest.approx(7.5)
        model = build_model(tiny_config(tmp_path / "b", score_scale="clip"), clip=tiny_clip).eval()
    finally:
        with torch.no_grad():
            tiny_clip.logit_scale.copy_(saved)
    assert model.score_scale == pytest.approx(7.5) and ReCLIPPP.score_scale == 100.0
    assert build_model(tiny_config(tmp_path / "c", score_scale=3), clip=tiny_clip).score_scale == 3.0
    assert build_model(tiny_config(tmp_path / "c", score_scale=3), clip=tiny_clip, kind="reclip").score_scale == 3.0
    with torch.no_grad():
        out = model(images=torch.randn(2, 3, 32, 32))
    hyps = [[0], [1]]

    def loss(**kw):
        return gumbel_masked_contrastive_loss(out["logits"], out["feat"], model.text, hyps,
                                              generator=torch.Generator().manual_seed(0), **kw)

    got = model.loss(out, hyps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, loss(score_scale=model.score_scale)) and not torch.equal(got, loss(score_scale=100.0))
    for bad in ("CLIP", "auto", 0, -2):
        with pytest.raises(ValueError, match="score_scale must be null .* or a number > 0"):
            tiny_config(tmp_path / "d", score_scale=bad)
    without = torch.nn.Module()
    with pytest.raises(ValueError, match="no logit_scale: use a number"):
        logit_scale(without)
