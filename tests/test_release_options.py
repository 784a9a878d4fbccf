"""The paper profile's release options: each computes what the authors' release computes (its rule
written out step by step here, never imported), and its other value is the project's choice.

Options: ``class_name_set``, ``pd_scale`` / ``reclip_pd_threshold`` / ``reclip_pd_scale``,
``hypothesis_tiling``, ``hypothesis_threshold`` / ``hypothesis_topk``, ``loss_normalisation``,
``hypothesis_clip``, ``eval_upsampling``, ``test_resize``; and the conversion of ReCLIP's released checkpoints.
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
    import reclip_core.eval_scoring as scoring  # where evaluate's per-forward scoring calls PD
    import reclip_core.evaluation as ev
    from reclip_core.model_factory import build_model

    cfg = tiny_config("unused", model="reclip", pd_threshold=0.85, reclip_pd_threshold=0.6, reclip_pd_scale=100.0)
    model = build_model(cfg, clip=tiny_clip)
    assert model.pd_rule == (0.6, 100.0)
    calls = []
    real = scoring.presence_filter
    monkeypatch.setattr(scoring, "presence_filter", lambda lg, t, scale: (calls.append((t, scale)), real(lg, t, scale))[1])
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


# ------------------------------------------------------------------------------------------------
# 11. Evaluation: the release's upsampling of the padded grid and its OpenCV test resize
# ------------------------------------------------------------------------------------------------
def _bilinear_half_pixel(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of the last two axes written out: source coordinate (d + 0.5)·in/out − 0.5
    (half-pixel centres), clamped to the first and last pixel, no antialiasing (float64)."""
    def taps(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        lo = np.floor(src).astype(int)
        frac = src - lo
        frac[lo < 0], lo[lo < 0] = 0.0, 0
        last = lo >= n_in - 1
        frac[last], lo[last] = 0.0, n_in - 1
        return lo, np.minimum(lo + 1, n_in - 1), frac

    y0, y1, fy = taps(a.shape[-2], out_h)
    x0, x1, fx = taps(a.shape[-1], out_w)
    a = a.astype(np.float64)
    rows = a[..., y0, :] * (1 - fy)[:, None] + a[..., y1, :] * fy[:, None]
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


@pytest.mark.parametrize("input_hw,label_hw", [((333, 505), (333, 505)), ((336, 505), (375, 563)),
                                               ((40, 44), (30, 33))])
def test_release_upsampling_stretches_the_padded_grid_to_the_unpadded_size(input_hw, label_hw):
    from reclip_core.evaluation import upsample_logits

    patch = 16 if input_hw[0] > 100 else 8
    grid = (-(-input_hw[0] // patch), -(-input_hw[1] // patch))  # the zero-padded input's token grid
    logits = torch.randn(2, 5, *grid, generator=torch.Generator().manual_seed(0))
    # the release: the padded grid's logits straight to the unpadded input size, then to the label size
    want = _bilinear_half_pixel(logits.numpy(), *input_hw)
    if input_hw != label_hw:
        want = _bilinear_half_pixel(want, *label_hw)
    got = upsample_logits(logits, patch, input_hw, label_hw, mode="release")
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)  # float32 coordinates and sums
    assert not torch.allclose(got, upsample_logits(logits, patch, input_hw, label_hw))  # the project's crop
    with pytest.raises(ValueError, match="upsampling"):
        upsample_logits(logits, patch, input_hw, label_hw, mode="stretch")


def test_both_upsamplings_agree_without_padding():
    from reclip_core.evaluation import upsample_logits

    logits = torch.randn(1, 4, 21, 28, generator=torch.Generator().manual_seed(1))
    for label in ((336, 448), (375, 500)):
        assert torch.equal(upsample_logits(logits, 16, (336, 448), label, mode="release"),
                           upsample_logits(logits, 16, (336, 448), label))


def _release_test_resize(image: np.ndarray, short: int, long_max: int) -> np.ndarray:
    """The release's test resize written out: s = min(long_max / long, short / short side), size
    (int(w·s + 0.5), int(h·s + 0.5)), bilinear with half-pixel centres on the uint8 image, rounded."""
    h, w = image.shape[:2]
    s = min(long_max / max(h, w), short / min(h, w))
    new_w, new_h = int(w * s + 0.5), int(h * s + 0.5)
    out = _bilinear_half_pixel(np.moveaxis(image, -1, 0), new_h, new_w)
    return np.moveaxis(np.clip(np.rint(out), 0, 255).astype(np.uint8), 0, -1)


@pytest.mark.parametrize("hw,short,long_max", [((375, 500), 336, 2048), ((40, 48), 64, 2048),
                                               ((100, 700), 64, 300), ((333, 505), 336, 2048)])
def test_release_test_resize_is_opencv_bilinear_on_uint8(hw, short, long_max):
    from reclip_core.transforms import eval_preprocess, linear_resize, normalize

    g = np.random.default_rng(hw[0])
    image = np.clip(g.normal(128, 60, (*hw, 3)) + np.linspace(0, 80, hw[1])[None, :, None], 0, 255).astype(np.uint8)
    want = _release_test_resize(image, short, long_max)
    x = eval_preprocess(image, short, long_max, resize="release")
    assert tuple(x.shape[-2:]) == want.shape[:2]  # the sizes exactly
    got = linear_resize(torch.from_numpy(image).permute(2, 0, 1), want.shape[:2])
    assert got.dtype == torch.uint8
    # OpenCV's fixed-point weights round differently from float arithmetic: at most one grey level
    assert np.abs(got.permute(1, 2, 0).numpy().astype(int) - want.astype(int)).max() <= 1
    assert torch.equal(x, normalize(got).unsqueeze(0))
    project = eval_preprocess(image, short, long_max)
    assert project.shape == x.shape
    if want.shape[0] < hw[0]:  # a downscale: the project's antialiasing filter makes another input
        assert not torch.equal(project, x)
    else:  # an upscale: no filter to tell them apart; they agree up to rounding (on some kernels exactly)
        from reclip_core.transforms import CLIP_STD

        grey = (project - x).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
        assert float(grey.max()) <= 1.0 + 1e-3
    with pytest.raises(ValueError, match="resize"):
        eval_preprocess(image, short, long_max, resize="cv2")


@pytest.mark.parametrize("dataset", PAPER)
def test_paper_configs_set_the_release_evaluation_options(dataset):
    cfg = load_config(dataset)
    assert (cfg.eval_upsampling, cfg.test_resize) == ("release", "release")
    toy = load_config("toy")  # the toy profile keeps the project's values
    assert (toy.eval_upsampling, toy.test_resize) == ("crop", "torch")
    with pytest.raises(ValueError, match="eval_upsampling"):
        load_config(dataset, ["eval_upsampling=stretch"])


def test_evaluate_run_and_segment_use_the_configured_evaluation_options(tmp_path, tiny_clip, monkeypatch):
    from reclip_core import evaluation, segment

    seen = {}
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: (seen.update(k), real(*a, **k))[1])
    cfg = tiny_config(tmp_path / "run", eval_upsampling="release", test_resize="release")
    with pytest.warns(UserWarning, match="MaskCLIP only"):
        evaluation.evaluate_run(cfg, dataset=ImageSet(2, labels=True), clip=tiny_clip, progress=False, save=False)
    assert (seen["upsampling"], seen["resize"]) == ("release", "release")
    # segment: the options a checkpoint's config sets travel with its model
    calls = []
    monkeypatch.setattr(segment, "upsample_logits", lambda *a, mode: (calls.append(mode), real_up(*a, mode=mode))[1])
    monkeypatch.setattr(segment, "eval_preprocess", lambda *a, resize: (calls.append(resize), real_pre(*a, resize=resize))[1])
    from reclip_core.eval_scoring import upsample_logits as real_up
    from reclip_core.model import MaskCLIP
    from reclip_core.transforms import eval_preprocess as real_pre

    model = MaskCLIP(tiny_clip, NAMES, templates=SINGLE).eval()
    image = ImageSet(1)[0]["image"]
    segment.predict_mask(model, image, 32, None, "cpu")
    model.eval_upsampling, model.test_resize = "release", "release"
    segment.predict_mask(model, image, 32, None, "cpu")
    assert calls == ["torch", "crop", "release", "release"]


def test_segment_pd_uses_the_models_own_softmax_scale(tiny_clip):
    from reclip_core import segment
    from reclip_core.model import MaskCLIP
    from reclip_core.rectify import presence_filter

    model = MaskCLIP(tiny_clip, NAMES, templates=SINGLE).eval()
    image = ImageSet(1)[0]["image"]
    x = segment.eval_preprocess(image, 32)
    logits = model(images=x)["logits"]
    h, w = segment.to_image_tensor(image).shape[-2:]

    # a threshold that the peak probability passes at scale 100 and not at 10: the scales keep other classes
    peak = {s: float(torch.softmax(s * logits, dim=1).amax()) for s in (10.0, 100.0)}
    assert peak[100.0] > peak[10.0]
    threshold = (peak[10.0] + peak[100.0]) / 2

    def expected(scale):  # PD with this scale, computed here, then the usual upsampling
        up = segment.upsample_logits(presence_filter(logits, threshold, scale=scale), segment.patch_size(model),
                                     tuple(x.shape[-2:]), (h, w))
        return up.argmax(dim=1)[0].numpy()

    assert (expected(10.0) != expected(100.0)).any()  # the fixture tells the two scales apart
    assert (segment.predict_mask(model, image, 32, threshold, "cpu") == expected(10.0)).all()
    model.pd_rule = (0.5, 100.0)  # a ReCLIP model's rule (build_model sets it from the config)
    assert (segment.predict_mask(model, image, 32, threshold, "cpu") == expected(100.0)).all()


# ------------------------------------------------------------------------------------------------
# 11. Reference read-out slot
# ------------------------------------------------------------------------------------------------
# 1, 2, 3, 3, 3, 5 and 4 CLIP tokens; "skyscraper", "conveyer belt" and "skyscraper roof" have their
# largest id before the last slot
SLOT_NAMES = ["cat", "potted plant", "chest of drawers", "skyscraper", "conveyer belt", "chest of drawers and shelves",
              "skyscraper roof"]


def _release_read_index(names, context_length):
    """The release: the text-encoder output is read at 1 + n_ctx + argmax of the 3 name token ids."""
    import open_clip

    ids = open_clip.tokenize(names, context_length=context_length)[:, 1:4]
    n_ctx = context_length - 4  # 73 for CLIP's 77
    return [1 + n_ctx + int(torch.argmax(row)) for row in ids], [int((row != 49407).all()) for row in ids]


def _eot_read_index(names, context_length):
    """The project: the end-of-text slot among the 3, else the last one."""
    import open_clip

    ids = open_clip.tokenize(names, context_length=context_length)[:, 1:4]
    slots = [row.tolist().index(49407) if 49407 in row.tolist() else 2 for row in ids]
    return [1 + context_length - 4 + s for s in slots]


def test_release_reference_slot_reads_the_argmax_of_the_name_ids(vit_b16):
    from reclip_core.reference_prompt import ReferencePrompt

    release, long = _release_read_index(SLOT_NAMES, 77)
    assert long == [0, 0, 1, 1, 1, 1, 1]  # names of 3+ tokens fill every slot with a word
    assert ReferencePrompt(vit_b16, SLOT_NAMES, read_slot="release").read_index.tolist() == release
    eot = ReferencePrompt(vit_b16, SLOT_NAMES).read_index.tolist()
    assert eot == _eot_read_index(SLOT_NAMES, 77) == [75, 76, 76, 76, 76, 76, 76]  # the default is unchanged
    # end-of-text is the largest id: the two agree below 3 tokens, and where the largest word id is last
    assert [r == e for r, e in zip(release, eot)] == [True, True, True, False, False, True, False]
    with pytest.raises(ValueError, match="read_slot"):
        ReferencePrompt(vit_b16, SLOT_NAMES, read_slot="last")


def test_release_reference_features_differ_only_where_the_slot_moves(tiny_clip):
    from reclip_core.reference_prompt import ReferencePrompt

    eot, release = ReferencePrompt(tiny_clip, SLOT_NAMES), ReferencePrompt(tiny_clip, SLOT_NAMES, read_slot="release")
    assert release.read_index.tolist() == _release_read_index(SLOT_NAMES, tiny_clip.context_length)[0]
    with torch.no_grad():
        a, b = eot.encode(), release.encode()
    moved = (eot.read_index != release.read_index).tolist()
    assert moved == [False, False, False, True, True, False, True]
    for c, m in enumerate(moved):
        assert torch.equal(a[c], b[c]) != m, SLOT_NAMES[c]


@pytest.mark.parametrize("kind", ["reclip++", "reclip"])
def test_build_model_passes_the_reference_slot(tiny_clip, kind):
    from reclip_core.config_schema import ModelConfig
    from reclip_core.model_factory import build_model
    from reclip_core.reference_prompt import READ_SLOTS

    assert ModelConfig.__dataclass_fields__["reference_slot"].metadata["choices"] == READ_SLOTS
    assert build_model(tiny_config("unused", model=kind), clip=tiny_clip).reference.read_slot == "eot"
    model = build_model(tiny_config("unused", model=kind, reference_slot="release"), clip=tiny_clip)
    assert model.reference.read_slot == "release"
    with pytest.raises(ValueError, match="reference_slot"):
        tiny_config("unused", reference_slot="argmax")


# ------------------------------------------------------------------------------------------------
# 12. Hypothesis window resize
# ------------------------------------------------------------------------------------------------
def _release_window_input(image, box, window, size):
    """CLIP's own preprocessing of one PIL window, step by step: bicubic resize of the uint8 window
    so its short side is ``size`` (a square: size × size), centre crop (nothing left to cut), /255,
    CLIP's mean and std."""
    from PIL import Image

    from reclip_core.backbone import CLIP_MEAN, CLIP_STD

    y, x = box
    crop = image.crop((x, y, x + window, y + window))
    resized = crop.resize((size, size), Image.BICUBIC)
    assert resized.size == (size, size)
    t = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255.0
    return (t - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


@pytest.mark.parametrize("h, w, window, stride, size", [(168, 224, 56, 28, 224), (40, 48, 16, 8, 32)])
def test_release_resize_equals_clip_preprocessing_of_each_window(h, w, window, stride, size):
    from PIL import Image

    from reclip_core.backbone import CLIP_MEAN, CLIP_STD
    from reclip_core.transforms import crop_windows, window_boxes

    image = Image.fromarray(np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    boxes = window_boxes(h, w, window, stride, tiling="release")
    got = crop_windows(image, boxes, window, size, resize="release")
    assert torch.equal(got, torch.stack([_release_window_input(image, b, window, size) for b in boxes]))
    # the default: torch's bicubic with antialias on the float window, as before
    arr = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    torch_way = torch.stack([(F.interpolate(arr[:, y:y + window, x:x + window][None], size=(size, size),
                                            mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)
                              - mean) / std for y, x in boxes])
    assert torch.equal(crop_windows(image, boxes, window, size), torch_way)
    assert not torch.equal(got, torch_way)
    with pytest.raises(ValueError, match="resize"):
        crop_windows(image, boxes, window, size, resize="cv2")


def test_window_vote_with_release_resize(tiny_clip):
    from reclip_core.backbone import encode_image_cls
    from reclip_core.hypothesis import window_vote
    from reclip_core.text import text_embeddings
    from reclip_core.transforms import clip_input_size, window_boxes

    text = text_embeddings(tiny_clip, NAMES, SINGLE)
    size = clip_input_size(tiny_clip)
    ds = ImageSet(3)
    items = [(ds[i]["id"], ds[i]["image"]) for i in range(3)]
    got = dict(window_vote(tiny_clip, iter(items), text, window=16, stride=8, batch_size=5, resize="release"))
    for image_id, image in items:
        boxes = window_boxes(image.height, image.width, 16, 8)
        x = torch.stack([_release_window_input(image, b, 16, size) for b in boxes])
        assert got[image_id] == sorted(set((encode_image_cls(tiny_clip, x) @ text.t()).argmax(dim=1).tolist()))


def test_hypotheses_of_another_resize_are_refused(tmp_path, tiny_clip, monkeypatch):
    import reclip_core.hypothesis as hyp_mod
    from reclip_core.atomic_io import StaleFileError
    from reclip_core.config_schema import HypothesisConfig
    from reclip_core.hypothesis import hypotheses_from_config
    from reclip_core.provenance import check_hypothesis_file
    from reclip_core.transforms import WINDOW_RESIZES

    assert HypothesisConfig.__dataclass_fields__["hypothesis_resize"].metadata["choices"] == WINDOW_RESIZES
    monkeypatch.setattr(hyp_mod, "build_dataset", lambda cfg, split: ImageSet(3))
    plain, release = tiny_config(tmp_path), tiny_config(tmp_path, hypothesis_resize="release")
    for name, cfg in (("torch", plain), ("release", release)):
        hypotheses_from_config(cfg, tiny_clip, "train", tmp_path / f"{name}.json", progress=False)
    settings = {n: json.loads((tmp_path / f"{n}.json").read_text())["settings"] for n in ("torch", "release")}
    assert "resize" not in settings["torch"]  # files of the default resize keep the settings they had
    assert settings["release"]["resize"] == "release"
    assert {k: v for k, v in settings["release"].items() if k != "resize"} == settings["torch"]
    check_hypothesis_file(tmp_path / "release.json", release, tiny_clip, ImageSet(3))
    check_hypothesis_file(tmp_path / "torch.json", plain, tiny_clip, ImageSet(3))
    for path, cfg in (("release.json", plain), ("torch.json", release)):
        with pytest.raises(StaleFileError, match="resize"):
            check_hypothesis_file(tmp_path / path, cfg, tiny_clip, ImageSet(3))
    with pytest.raises(StaleFileError, match="resize"):  # nor is one resumed under the other resize
        hypotheses_from_config(plain, tiny_clip, "train", tmp_path / "release.json", progress=False)


@pytest.mark.parametrize("dataset", PAPER)
def test_paper_configs_set_the_release_slot_and_resize(dataset):
    cfg = load_config(dataset)
    assert (cfg.reference_slot, cfg.hypothesis_resize) == ("release", "release")
    toy = load_config("toy")
    assert (toy.reference_slot, toy.hypothesis_resize) == ("eot", "torch")
