"""Image-level hypotheses: window geometry, batched vote == one forward per window, ReCLIP
threshold/top-K, JSON keyed by id, resumable."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reclip_core.backbone import encode_image_cls
from reclip_core.hypothesis import compute_hypotheses, load_hypotheses, threshold_topk, window_vote
from reclip_core.text import text_embeddings
from reclip_core.transforms import CLIP_MEAN, CLIP_STD, clip_input_size, window_boxes

from .train_fixtures import NAMES, ImageSet

SINGLE = ["a photo of a {}."]


def test_window_boxes_geometry():
    boxes = window_boxes(64, 64, 10, 5)
    assert len(boxes) == 11 * 11
    assert boxes[0] == (0, 0) and boxes[-1] == (50, 50)
    assert window_boxes(375, 500, 56, 28) == [(y, x) for y in range(0, 320, 28) for x in range(0, 445, 28)]
    assert window_boxes(20, 30, 56, 28) == [(0, 0)]  # smaller than the window: one clipped window
    with pytest.raises(ValueError):
        window_boxes(10, 10, 0, 1)


def _naive_votes(clip, image, text, window, stride, size):
    """The release's way: one CLIP forward per window (written independently of the library)."""
    arr = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    h, w = arr.shape[-2:]
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    votes = set()
    for y in range(0, h - window + 1, stride):
        for x in range(0, w - window + 1, stride):
            crop = arr[:, y:y + window, x:x + window][None]
            crop = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            crop = (crop.clamp(0, 1)[0] - mean) / std
            emb = encode_image_cls(clip, crop[None])
            votes.add(int((emb @ text.t()).argmax()))
    return sorted(votes)


def test_batched_vote_equals_one_forward_per_window(tiny_clip):
    text = text_embeddings(tiny_clip, NAMES, SINGLE)
    ds = ImageSet(5)
    items = [(ds[i]["id"], ds[i]["image"]) for i in range(5)]
    size = clip_input_size(tiny_clip)
    # batch_size 7 packs windows of consecutive images into one forward and splits images
    got = dict(window_vote(tiny_clip, iter(items), text, window=16, stride=8, batch_size=7))
    assert list(got) == [i for i, _ in items]  # input order
    for image_id, image in items:
        assert got[image_id] == _naive_votes(tiny_clip, image, text, 16, 8, size), image_id


def test_windows_go_through_clip_at_its_own_input_size(tiny_clip, monkeypatch):
    import reclip_core.hypothesis as hyp

    shapes = []
    real = hyp.encode_image_cls
    monkeypatch.setattr(hyp, "encode_image_cls", lambda clip, x, **k: (shapes.append(tuple(x.shape)), real(clip, x, **k))[1])
    text = text_embeddings(tiny_clip, NAMES, SINGLE)
    img = ImageSet(1)[0]["image"]  # 40 x 48 → 4 x 5 windows of 16 at stride 8
    list(window_vote(tiny_clip, [("a", img)], text, window=16, stride=8, batch_size=100))
    assert shapes == [(20, 3, 32, 32)]  # all windows of the image in one batch, at the tiny CLIP's 32 px
    shapes.clear()
    list(window_vote(tiny_clip, [("a", img)], text, window=16, stride=8, batch_size=6))
    assert [s[0] for s in shapes] == [6, 6, 6, 2]  # chunked to bound memory


def test_threshold_topk(tiny_clip):
    text = text_embeddings(tiny_clip, NAMES, SINGLE)
    items = [(f"i{i}", ImageSet(3)[i]["image"]) for i in range(3)]
    none_pass = dict(threshold_topk(tiny_clip, items, text, threshold=1000.0, topk=2))
    assert all(len(v) == 2 for v in none_pass.values())
    all_pass = dict(threshold_topk(tiny_clip, items, text, threshold=-1000.0, topk=1))
    assert all(v == [0, 1, 2] for v in all_pass.values())
    # the top-K classes are the best-scoring ones
    from reclip_core.transforms import clip_preprocess

    emb = encode_image_cls(tiny_clip, clip_preprocess(items[0][1], 32))
    best = (emb @ text.t())[0].argmax().item()
    assert dict(threshold_topk(tiny_clip, items[:1], text, threshold=1000.0, topk=1))["i0"] == [best]


def test_compute_hypotheses_keyed_by_id_and_resumable(tmp_path, tiny_clip):
    out = tmp_path / "h.json"
    first = ImageSet(6)
    h1 = compute_hypotheses(tiny_clip, first, NAMES, out, templates=SINGLE, window=16, stride=8, progress=False,
                            max_images=4)
    assert sorted(h1) == ["img000", "img001", "img002", "img003"]
    data = json.loads(out.read_text())
    assert data["class_names"] == NAMES and data["settings"]["window"] == 16
    assert set(data["hypotheses"]) == set(h1)

    second = ImageSet(6)
    h2 = compute_hypotheses(tiny_clip, second, NAMES, out, templates=SINGLE, window=16, stride=8, progress=False)
    # the 4 done ids were skipped (read only to learn their id), the others computed
    assert sorted(h2) == [f"img{i:03d}" for i in range(6)]
    assert {k: h2[k] for k in h1} == h1
    fresh = compute_hypotheses(tiny_clip, ImageSet(6), NAMES, tmp_path / "fresh.json", templates=SINGLE, window=16,
                               stride=8, progress=False)
    assert fresh == h2
    assert load_hypotheses(out, NAMES) == h2


def test_resume_skips_ids_without_decoding_when_the_reader_lists_ids(tmp_path, tiny_clip):
    class WithIds(ImageSet):
        @property
        def ids(self):
            return [f"img{i:03d}" for i in range(self.n)]

    out = tmp_path / "h.json"
    compute_hypotheses(tiny_clip, WithIds(5), NAMES, out, templates=SINGLE, window=16, stride=8, progress=False,
                       max_images=3)
    ds = WithIds(5)
    compute_hypotheses(tiny_clip, ds, NAMES, out, templates=SINGLE, window=16, stride=8, progress=False)
    assert ds.reads == [3, 4]


def test_resume_refuses_other_settings(tmp_path, tiny_clip):
    out = tmp_path / "h.json"
    compute_hypotheses(tiny_clip, ImageSet(2), NAMES, out, templates=SINGLE, window=16, stride=8, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        compute_hypotheses(tiny_clip, ImageSet(2), NAMES, out, templates=SINGLE, window=12, stride=6, progress=False)
    with pytest.raises(ValueError, match="recompute"):
        load_hypotheses(out, NAMES[::-1])


def test_resume_refuses_hypotheses_of_other_clip_weights(tmp_path, tiny_clip):
    # same architecture and name, retrained weights (e.g. after `make toy-clip`): not the same votes
    import copy

    out = tmp_path / "h.json"
    compute_hypotheses(tiny_clip, ImageSet(2), NAMES, out, templates=SINGLE, window=16, stride=8, progress=False)
    other = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        other.visual.proj.add_(0.01)
    with pytest.raises(ValueError, match="other settings") as err:
        compute_hypotheses(other, ImageSet(2), NAMES, out, templates=SINGLE, window=16, stride=8, progress=False)
    assert err.value.path == out
    # the notebooks' Lab sets the stale file aside and recomputes with the new weights
    from reclip_core.lab import recompute_if_stale

    before = out.read_text()
    fresh = recompute_if_stale(lambda: compute_hypotheses(other, ImageSet(2), NAMES, out, templates=SINGLE,
                                                          window=16, stride=8, progress=False))
    assert len(fresh) == 2 and json.loads(out.read_text())["settings"] != json.loads(before)["settings"]
    (aside,) = tmp_path.glob("h.json.stale-*")
    assert aside.read_text() == before


def test_order_of_the_dataset_does_not_matter(tmp_path, tiny_clip):
    class Reversed(ImageSet):
        def __getitem__(self, i):
            return super().__getitem__(self.n - 1 - i)

    a = compute_hypotheses(tiny_clip, ImageSet(4), NAMES, tmp_path / "a.json", templates=SINGLE, window=16, stride=8,
                           progress=False)
    b = compute_hypotheses(tiny_clip, Reversed(4), NAMES, tmp_path / "b.json", templates=SINGLE, window=16, stride=8,
                           progress=False)
    assert a == b
    assert json.loads((tmp_path / "a.json").read_text())["hypotheses"] == \
        json.loads((tmp_path / "b.json").read_text())["hypotheses"]
