"""The paper profile's release options: each computes what the authors' release computes (its rule
written out step by step here, never imported), and its other value is the project's choice.

Options: ``class_name_set``, ``pd_scale`` / ``reclip_pd_threshold`` / ``reclip_pd_scale``,
``hypothesis_tiling``, ``hypothesis_threshold`` / ``hypothesis_topk``, ``loss_normalisation``,
``hypothesis_clip``; and the conversion of ReCLIP's released checkpoints.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reclip_core.config import load_config
from reclip_core.run_inputs import resolve_class_names
from reclip_core.datasets.class_lists import class_names
from reclip_core.datasets.names import BENCHMARK_NAMES
from reclip_core.text import PROMPT_TEMPLATES

from .train_fixtures import NAMES, ImageSet, hypotheses_for, tiny_config

PAPER = BENCHMARK_NAMES
SINGLE = ["a photo of a {}."]

# ------------------------------------------------------------------------------------------------
# 1. Class names: the release's lists, written out name by name
# ------------------------------------------------------------------------------------------------
RELEASE_NAMES = {
    "voc": ["airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table",
            "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor"],
    "context": ["airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
                "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup",
                "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
                "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
                "potted plant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
                "table", "track", "train", "tree", "truck", "tv monitor", "wall", "water", "window", "wood"],
    "ade": ["wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
            "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
            "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
            "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
            "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
            "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
            "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
            "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
            "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
            "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
            "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
            "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
            "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
            "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
            "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
            "bulletin board", "shower", "radiator", "glass", "clock", "flag"],
    "cityscapes": ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                   "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                   "bicycle"],
    "coco_stuff27": ["electronic", "appliance", "food things", "furniture things", "indoor", "kitchen", "accessory",
                     "animal", "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food stuff",
                     "furniture stuff", "raw material", "textile", "wall", "window", "building", "ground", "plant",
                     "sky", "solid", "structural", "water"],
}
# where the project's own lists differ (index: project name → release name)
PROJECT_DIFFERS = {
    "voc": {0: ("aeroplane", "airplane")},
    "context": {0: ("aeroplane", "airplane")},
    "ade": {},
    "cityscapes": {},
    "coco_stuff27": {2: ("food", "food things"), 3: ("furniture", "furniture things"),
                     14: ("food-stuff", "food stuff"), 15: ("furniture-stuff", "furniture stuff")},
}


@pytest.mark.parametrize("dataset", PAPER)
def test_release_class_lists_pin_every_name(dataset):
    import open_clip

    shipped = class_names(dataset, source="release")
    release = RELEASE_NAMES[dataset]
    assert len(shipped) == len(release)
    for i, (ours, theirs) in enumerate(zip(shipped, release)):
        if ours != theirs:
            # only ADE's "bed " differs, by a trailing space that no prompt's tokens can see
            assert (dataset, i, ours, theirs) == ("ade", 7, "bed", "bed ")
            prompts = [t.format(n) for t in PROMPT_TEMPLATES for n in (ours, theirs)]
            tokens = open_clip.tokenize(prompts)
            assert torch.equal(tokens[0::2], tokens[1::2])
    project = class_names(dataset)
    differ = {i: (p, r) for i, (p, r) in enumerate(zip(project, shipped)) if p != r}
    assert differ == PROJECT_DIFFERS[dataset]


@pytest.mark.parametrize("dataset", PAPER)
def test_paper_configs_read_the_release_names_and_the_project_list_stays_selectable(dataset):
    assert resolve_class_names(load_config(dataset)) == class_names(dataset, source="release")
    assert resolve_class_names(load_config(dataset, ["class_name_set=project"])) == class_names(dataset)
    with pytest.raises(ValueError, match="class_name_set"):
        load_config(dataset, ["class_name_set=mmseg"])


def test_toy_names_do_not_change_and_the_release_has_no_toy_list():
    from reclip_core.datasets.toyworld import toyworld_class_names

    cfg = load_config("toy")
    assert cfg.class_name_set == "project" and resolve_class_names(cfg) == toyworld_class_names("biased")
    with pytest.raises(ValueError, match="release has no class list for 'toyworld'"):
        class_names("toyworld", source="release")


# ------------------------------------------------------------------------------------------------
# 5. PD per model
# ------------------------------------------------------------------------------------------------
def _release_pd(output, model_name, pd, reclip_pd):
    """The release's test-time PD, step by step: softmax(10·x) vs TEST.PD for ReCLIP++,
    softmax(100·x) vs TEST.ReCLIP_PD for ReCLIP; classes below get −100 everywhere."""
    output = output.clone()
    N, C, H, W = output.shape
    scale, threshold = (10, pd) if model_name == "RECLIPPP" else (100, reclip_pd)
    prob = torch.softmax(output * scale, dim=1)
    best = prob.view(N, C, -1).max(dim=-1)[0]
    drop = (best < threshold)[:, :, None, None].expand(N, C, H, W)
    output[drop] = -100
    return output


@pytest.mark.parametrize("dataset, reclip_pd", [("voc", 0.5), ("context", 0.6), ("ade", 0.5)])
def test_pd_rule_per_model_equals_the_release(dataset, reclip_pd):
    from reclip_core.rectify import presence_filter
    from reclip_core.run_inputs import presence_rule

    cfg = load_config(dataset)
    g = torch.Generator().manual_seed(3)
    C = cfg.num_classes
    # logits on both models' scales: ReCLIP++'s decoder output (BatchNorm, ~1) and ReCLIP's cosines (~0.05)
    for spread in (1.0, 0.05):
        logits = spread * torch.randn(2, C, 6, 7, generator=g)
        for kind, name in (("reclip++", "RECLIPPP"), ("reclip", "ReCLIP")):
            threshold, scale = presence_rule(cfg, kind)
            ours = presence_filter(logits, threshold, scale=scale)
            assert torch.equal(ours, _release_pd(logits, name, cfg.pd_threshold, reclip_pd)), (kind, spread)
    assert presence_rule(cfg, "reclip") == (reclip_pd, 100.0)
    assert presence_rule(cfg, "reclip++") == (cfg.pd_threshold, 10.0)
    # the project's value (null): ReCLIP++'s rule on ReCLIP too
    off = load_config(dataset, ["reclip_pd_threshold=null", "reclip_pd_scale=null"])
    assert presence_rule(off, "reclip") == presence_rule(off, "reclip++")


def test_evaluate_applies_the_reclip_rule_to_reclip_heads_only(tiny_clip, monkeypatch):
    import reclip_core.evaluation as ev
    from reclip_core.model_factory import build_model

    cfg = tiny_config("unused", model="reclip", pd_threshold=0.85, reclip_pd_threshold=0.6, reclip_pd_scale=100.0)
    model = build_model(cfg, clip=tiny_clip)
    assert model.pd_rule == (0.6, 100.0)
    calls = []
    real = ev.presence_filter
    monkeypatch.setattr(ev, "presence_filter", lambda lg, t, scale: (calls.append((t, scale)), real(lg, t, scale))[1])
    ev.evaluate(model, ImageSet(1, labels=True), test_size=32, pd_threshold=0.85, progress=False)
    assert calls == [(0.85, 10.0), (0.6, 100.0)]  # maskclip: ReCLIP++'s rule; rectified: ReCLIP's
    # a ReCLIP++ model and the toy defaults keep one rule for every head, as before
    assert getattr(build_model(tiny_config("unused", pd_threshold=0.85, reclip_pd_threshold=0.6), clip=tiny_clip),
                   "pd_rule", None) is None
    assert getattr(build_model(tiny_config("unused", model="reclip"), clip=tiny_clip), "pd_rule", None) is None


# ------------------------------------------------------------------------------------------------
# 6. Hypothesis window grid and the ReCLIP threshold / top-K of the release's configs
# ------------------------------------------------------------------------------------------------
def _release_starts(h, w, window, stride):
    """The release's window loop: starts y in range(0, H − w, stride), x in range(0, W − w, stride)."""
    starts = []
    y = 0
    while y < h - window:
        x = 0
        while x < w - window:
            starts.append((y, x))
            x += stride
        y += stride
    return starts


@pytest.mark.parametrize("h, w", [(168, 224), (375, 500), (336, 336), (500, 333), (57, 200), (56, 80), (40, 48)])
def test_release_tiling_equals_the_release_window_grid(h, w):
    from reclip_core.transforms import window_boxes

    window, stride = int(336 / 6), int(int(336 / 6) / 2)  # VOC: 56, 28
    assert window_boxes(h, w, window, stride, tiling="release") == _release_starts(h, w, window, stride)
    fit = window_boxes(h, w, window, stride)  # the project's grid (default) is unchanged
    assert fit == [(y, x) for y in range(0, max(h - window, 0) + 1, stride)
                   for x in range(0, max(w - window, 0) + 1, stride)]


def test_release_tiling_counts_at_168_by_224():
    from reclip_core.transforms import window_boxes

    assert len(window_boxes(168, 224, 56, 28)) == 35
    assert len(window_boxes(168, 224, 56, 28, tiling="release")) == 24
    with pytest.raises(ValueError, match="tiling"):
        window_boxes(168, 224, 56, 28, tiling="edge")


def _naive_release_votes(clip, image, text, window, stride, size):
    """One CLIP forward per window over the release's grid (independent of the library)."""
    from reclip_core.backbone import CLIP_MEAN, CLIP_STD, encode_image_cls

    arr = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    votes = set()
    for y, x in _release_starts(arr.shape[1], arr.shape[2], window, stride):
        crop = F.interpolate(arr[:, y:y + window, x:x + window][None], size=(size, size), mode="bicubic",
                             align_corners=False, antialias=True)
        votes.add(int((encode_image_cls(clip, ((crop.clamp(0, 1)[0] - mean) / std)[None]) @ text.t()).argmax()))
    return sorted(votes)


def test_window_vote_with_release_tiling(tiny_clip):
    from reclip_core.hypothesis import window_vote
    from reclip_core.text import text_embeddings
    from reclip_core.transforms import clip_input_size

    from PIL import Image

    text = text_embeddings(tiny_clip, NAMES, SINGLE)
    ds = ImageSet(2)
    items = [(ds[i]["id"], ds[i]["image"]) for i in range(2)]
    flat = np.random.default_rng(0).integers(0, 256, (16, 40, 3), dtype=np.uint8)
    items.append(("flat", Image.fromarray(flat)))  # no taller than the window
    got = dict(window_vote(tiny_clip, iter(items), text, window=16, stride=8, batch_size=5, tiling="release"))
    assert list(got) == [i for i, _ in items]
    for image_id, image in items:
        assert got[image_id] == _naive_release_votes(tiny_clip, image, text, 16, 8, clip_input_size(tiny_clip))
    assert got[items[2][0]] == []  # no window at all: an empty hypothesis, as in the release


RELEASE_THRESHOLD_K = {"voc": (23, 2), "context": (20, 6), "ade": (21, 5), "cityscapes": (21.5, 2),
                       "coco_stuff27": (20, 8)}


@pytest.mark.parametrize("dataset", PAPER)
def test_paper_configs_set_the_release_hypothesis_options(dataset):
    cfg = load_config(dataset)
    assert cfg.hypothesis_tiling == "release" and cfg.hypothesis_clip == "plain"
    assert (cfg.hypothesis_threshold, cfg.hypothesis_topk) == RELEASE_THRESHOLD_K[dataset]
    assert cfg.loss_normalisation == "batch"
    assert (cfg.pd_scale, cfg.reclip_pd_scale) == (10.0, 100.0)
    assert cfg.reclip_pd_threshold == (0.6 if dataset == "context" else 0.5)
    toy = load_config("toy")  # the toy profile keeps the project's values
    assert (toy.hypothesis_tiling, toy.hypothesis_clip, toy.loss_normalisation, toy.class_name_set) == (
        "fit", "model", "nonempty", "project")
    assert (toy.hypothesis_topk, toy.pd_scale, toy.reclip_pd_threshold, toy.reclip_pd_scale) == (1, 10.0, None, None)


def test_threshold_mode_falls_back_to_the_release_topk(tiny_clip):
    from reclip_core.hypothesis import threshold_topk
    from reclip_core.text import text_embeddings

    text = text_embeddings(tiny_clip, NAMES, SINGLE)
    image = ImageSet(1)[0]["image"]
    k = load_config("voc").hypothesis_topk
    (_, got), = threshold_topk(tiny_clip, [("a", image)], text, threshold=1000.0, topk=k)
    # release: no class reaches the threshold → the K best by score
    from reclip_core.backbone import encode_image_cls
    from reclip_core.transforms import clip_preprocess, clip_input_size

    scores = 100 * encode_image_cls(tiny_clip, clip_preprocess(image, clip_input_size(tiny_clip))) @ text.t()
    assert got == sorted(torch.sort(scores, descending=True, dim=1)[1][0, :k].tolist()) and len(got) == 2


# ------------------------------------------------------------------------------------------------
# 7. Loss normalisation in a batch
# ------------------------------------------------------------------------------------------------
def _release_batch_loss(masks, feat, text, hyps):
    """The release: per image with a hypothesis, CE averaged over its classes; summed; / batch size."""
    B, C, h, w = masks.shape
    total = 0
    for j in range(B):
        if len(hyps[j]) == 0:
            continue
        pooled = torch.stack([(feat[j] * masks[j, k][None]).mean(dim=(1, 2)) for k in hyps[j]])
        total = total + F.cross_entropy(100 * pooled @ text.t(), torch.tensor(hyps[j]))
    return total / B


def test_batch_normalisation_equals_the_release_loss():
    from reclip_core.loss import gumbel_masked_contrastive_loss

    torch.manual_seed(0)
    B, C, D, h, w = 4, 6, 16, 5, 7
    logits = torch.randn(B, C, h, w)
    feat = F.normalize(torch.randn(B, D, h, w), dim=1)
    text = F.normalize(torch.randn(C, D), dim=1)
    hyps = [[0, 2, 5], [], [1], []]
    kw = dict(generator=torch.Generator().manual_seed(5), return_masks=True)
    batch, masks = gumbel_masked_contrastive_loss(logits, feat, text, hyps, normalisation="batch", **kw)
    assert batch.item() == pytest.approx(_release_batch_loss(masks, feat, text, hyps).item(), abs=1e-6)
    kw["generator"] = torch.Generator().manual_seed(5)
    nonempty, _ = gumbel_masked_contrastive_loss(logits, feat, text, hyps, **kw)
    assert batch.item() == pytest.approx(nonempty.item() * 2 / 4, abs=1e-6)  # 2 of 4 images have a hypothesis
    with pytest.raises(ValueError, match="normalisation"):
        gumbel_masked_contrastive_loss(logits, feat, text, hyps, normalisation="mean")


def test_training_step_divides_by_the_batch_size_under_batch_normalisation(tiny_clip):
    from reclip_core.model import ReCLIPPP
    from reclip_core.training import _step

    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    hyp = torch.zeros(4, 3, dtype=torch.bool)
    hyp[0, 1] = hyp[2, 0] = hyp[2, 2] = True  # images 1 and 3: empty hypotheses
    batch = {"index": torch.arange(4), "image": images, "hyp": hyp}
    results = {}
    for norm in ("nonempty", "batch"):
        torch.manual_seed(1)
        model = ReCLIPPP(tiny_clip, NAMES, templates=SINGLE).train()
        opt = torch.optim.SGD(model.trainable_parameters(), lr=0.0)  # lr 0: weights stay, gradients remain
        loss, n = _step(model, model, opt, batch, torch.device("cpu"), 0, 0, 1, norm)
        results[norm] = (loss, n, model.decoder.conv.weight.grad.clone())
    (l_ne, n_ne, g_ne), (l_b, n_b, g_b) = results["nonempty"], results["batch"]
    assert n_ne == n_b == 2
    assert l_b == pytest.approx(l_ne * 2 / 4, rel=1e-6)  # Σ loss / 4 instead of Σ loss / 2
    assert torch.allclose(g_b, g_ne * 0.5, rtol=1e-5, atol=1e-9)


def test_train_uses_the_configured_normalisation(tmp_path, tiny_clip, monkeypatch):
    import reclip_core.training as tr

    seen = []
    real = tr._step
    monkeypatch.setattr(tr, "_step", lambda *a: (seen.append(a[-1]), real(*a))[1])
    cfg = tiny_config(tmp_path / "run", epoch=1, max_epoch=1, loss_normalisation="batch")
    tr.train(cfg, dataset=ImageSet(8), hypotheses=hypotheses_for(8), clip=tiny_clip, progress=False)
    assert seen and set(seen) == {"batch"}
    rows = tr._read_losses(tmp_path / "run" / "loss.csv", 10**9)
    assert sum(r["images"] for r in rows) == 6  # 2 of the 8 images have an empty hypothesis


# ------------------------------------------------------------------------------------------------
# 9. Hypotheses from plain CLIP under the release option
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["window", "threshold"])
def test_plain_clip_hypotheses_ignore_the_model_options(tmp_path, tiny_clip, monkeypatch, mode):
    import reclip_core.hypothesis as hyp_mod
    from reclip_core.hypothesis import hypotheses_from_config

    monkeypatch.setattr(hyp_mod, "build_dataset", lambda cfg, split: ImageSet(4))
    token = tmp_path / "cls_token.pt"
    torch.save(torch.randn(tiny_clip.visual.class_embedding.shape, generator=torch.Generator().manual_seed(4)), token)
    options = {"arch": tiny_config("x")["clip"]["arch"], "pretrained": None, "ln_eps": 0.5, "cls_token": str(token)}
    calls = []
    real = hyp_mod.encode_image_cls
    monkeypatch.setattr(hyp_mod, "encode_image_cls",
                        lambda clip, x, **k: (calls.append((k["ln_eps"], k["cls_token"])), real(clip, x, **k))[1])
    common = dict(hypothesis_mode=mode, hypothesis_threshold=1000.0, hypothesis_topk=1)

    def run(name, **over):
        return hypotheses_from_config(tiny_config(tmp_path, **common, **over), tiny_clip, "train",
                                      tmp_path / f"{name}.json", progress=False)

    plain_clip = run("none")
    assert set(calls) == {(None, None)}
    calls.clear()
    released = run("plain", clip=options, hypothesis_clip="plain")
    assert set(calls) == {(None, None)} and released == plain_clip
    assert json.loads((tmp_path / "plain.json").read_text())["settings"]["ln_eps"] is None
    calls.clear()
    run("model", clip=options)  # the project's value: the options reach the windows too
    assert set(calls) == {(0.5, str(token))}


# ------------------------------------------------------------------------------------------------
# 10. ReCLIP (CVPR) released checkpoints
# ------------------------------------------------------------------------------------------------
def _reclip_release_state(model, prefix="module."):
    """A ReCLIP state dict as the release's ReCLIP module holds it: the space net ``proj_net``
    (conv, BN, ReLU ×3) with its layers also under ``conv1``..``norm3``, plus frozen weights."""
    g = torch.Generator().manual_seed(2)
    own = model.trainable_state_dict()
    state = {"text_encoder.prompt_token": torch.randn(1, *own["reference.tokens"].shape, generator=g),
             "text_encoder.token_embedding.weight": torch.randn(5, 4, generator=g),
             "vit.conv1.weight": torch.randn(4, 3, 2, 2, generator=g),
             "clip.visual.proj": torch.randn(4, 2, generator=g),
             "proj.weight": torch.randn(4, 4, 1, 1, generator=g), "logit_scale": torch.tensor(4.6052)}
    for attr, i in {"conv1": 0, "norm1": 1, "conv2": 3, "norm2": 4, "conv3": 6, "norm3": 7}.items():
        for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            ours = own.get(f"space_net.{i}.{t}")
            if ours is None:
                continue
            value = (torch.tensor(17 + i) if t == "num_batches_tracked" else
                     torch.rand(ours.shape, generator=g) + 0.5 if t == "running_var" else
                     torch.randn(ours.shape, generator=g))
            state[f"proj_net.{i}.{t}"] = value
            state[f"{attr}.{t}"] = value  # the same tensor under its attribute name
    return {prefix + k: v for k, v in state.items()}


def test_convert_reclip_release_checkpoint(tmp_path, tiny_clip):
    from reclip_core.checkpoint import convert_release_checkpoint, load_model_weights
    from reclip_core.model import ReCLIP
    from reclip_core.positional_bias import resized_positional_embedding

    model = ReCLIP(tiny_clip, NAMES, templates=SINGLE)
    release = _reclip_release_state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # frozen keys and the aliases are known: nothing is "ignored"
        converted = convert_release_checkpoint(release)
    assert set(converted) == set(model.trainable_state_dict())
    assert torch.equal(converted["reference.tokens"], release["module.text_encoder.prompt_token"][0])
    assert torch.equal(converted["space_net.6.weight"], release["module.proj_net.6.weight"])
    assert converted["space_net.7.num_batches_tracked"].item() == 24
    # the release's space map, step by step from its tensors: (conv 3x3, BN with running stats, ReLU) x 3
    path = tmp_path / "best_weight.pth"
    torch.save(release, path)
    load_model_weights(model, path)
    model.eval()
    r = {k[len("module."):]: v for k, v in release.items()}
    x = resized_positional_embedding(tiny_clip, (3, 5)).unsqueeze(0)
    for conv, bn in (("conv1", "norm1"), ("conv2", "norm2"), ("conv3", "norm3")):
        x = F.conv2d(x, r[f"{conv}.weight"], r[f"{conv}.bias"], padding=1)
        stats = ("running_mean", "running_var", "weight", "bias")
        mean, var, gamma, beta = (r[f"{bn}.{t}"].view(1, -1, 1, 1) for t in stats)
        # BN in eval: (x − μ) / √(σ² + 1e-5) · γ + β, then ReLU
        x = torch.relu((x - mean) / torch.sqrt(var + 1e-5) * gamma + beta)
    with torch.no_grad():
        assert torch.allclose(model.space_map((3, 5)), x[0], atol=1e-4, rtol=1e-4)


def test_reclip_conversion_errors_and_detection(tiny_clip):
    from reclip_core.checkpoint import convert_release_checkpoint
    from reclip_core.model import ReCLIP, ReCLIPPP

    model = ReCLIP(tiny_clip, NAMES, templates=SINGLE)
    state = _reclip_release_state(model, prefix="")
    assert set(convert_release_checkpoint(state, model="reclip")) == set(model.trainable_state_dict())
    with warnings.catch_warnings(), pytest.raises(ValueError, match="ReCLIP\\+\\+ best_weight"):
        warnings.simplefilter("ignore")  # its proj_net keys are "ignored" before the missing ones fail
        convert_release_checkpoint(state, model="reclip++")
    bad = dict(state, **{"conv2.bias": state["conv2.bias"] + 1})
    with pytest.raises(ValueError, match="two different tensors"):
        convert_release_checkpoint(bad)
    gone = {k: v for k, v in state.items() if not k.endswith(("conv3.weight", "proj_net.6.weight"))}
    with pytest.raises(ValueError, match="space_net.6.weight"):
        convert_release_checkpoint(gone)
    with pytest.raises(ValueError, match="model must be"):
        convert_release_checkpoint(state, model="maskclip")
    # only the attribute names (no proj_net.*) are enough
    attrs_only = {k: v for k, v in state.items() if not k.startswith("proj_net.")}
    assert set(convert_release_checkpoint(attrs_only)) == set(model.trainable_state_dict())
    # a ReCLIP++ file is still detected as one
    pp = ReCLIPPP(tiny_clip, NAMES, templates=SINGLE)
    own = pp.trainable_state_dict()
    names = {"text_encoder.prompt_token": "reference.tokens", "pe_proj.weight": "positional.proj.weight",
             "pe_proj.bias": "positional.proj.bias", "decoder_conv2.weight": "decoder.conv.weight",
             "decoder_conv2.bias": "decoder.conv.bias", "decoder_norm2.weight": "decoder.norm.weight",
             "decoder_norm2.bias": "decoder.norm.bias", "decoder_norm2.running_mean": "decoder.norm.running_mean",
             "decoder_norm2.running_var": "decoder.norm.running_var"}
    release_pp = {k: torch.ones_like(own[v]) for k, v in names.items()}
    release_pp.update({"vit.conv1.weight": torch.zeros(1), "proj.weight": torch.zeros(1),
                       "logit_scale": torch.zeros(())})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(convert_release_checkpoint(release_pp)) == set(own)
