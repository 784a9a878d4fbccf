"""ReCLIP++ model parts against method.md §2–§3 and the parameter counts of the release."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import reclip_core
from reclip_core import MaskCLIP, ReCLIP, ReCLIPPP, ReferencePrompt, class_names
from reclip_core.loss import gumbel_masked_contrastive_loss, gumbel_softmax_hard
from reclip_core.datasets.names import BENCHMARK_NAMES
from reclip_core.text import PROMPT_TEMPLATES

ONE_TEMPLATE = ["a photo of a {}."]


@pytest.mark.parametrize(
    "dataset, expected",
    [("voc", 697_164), ("context", 1_273_506), ("ade", 2_914_054), ("cityscapes", 683_386),
     ("coco_stuff27", 795_010)],
)
def test_trainable_parameter_counts_match_release(vit_b16, dataset, expected):
    model = ReCLIPPP(vit_b16, class_names(dataset))
    assert model.num_trainable_parameters() == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"reference.tokens", "positional.proj.weight", "positional.proj.bias",
                         "decoder.conv.weight", "decoder.conv.bias", "decoder.norm.weight", "decoder.norm.bias"}
    assert model.reference.tokens.shape == (73, 512)


def test_class_lists_have_release_sizes():
    sizes = {d: len(class_names(d)) for d in BENCHMARK_NAMES}
    assert sizes == {"voc": 20, "context": 59, "ade": 150, "cityscapes": 19, "coco_stuff27": 27}
    assert len(PROMPT_TEMPLATES) == 85 and len(set(PROMPT_TEMPLATES)) == 85
    assert all("{}" in t for t in PROMPT_TEMPLATES)


def test_reference_prompt_reproduces_encode_text(vit_b16):
    """With its learnable tokens set to the embeddings of a real tokenized text, the Reference
    prompt path must equal clip.encode_text of that text."""
    clip = vit_b16
    tok = clip.tokenizer
    prompt = ReferencePrompt(clip, ["cat"])
    words = " ".join(["a photo of a small striped animal sitting on the grass"] * 12)
    word_ids = tok([words])[0, 1:1 + prompt.n_ctx]  # 73 real word tokens
    assert (word_ids > 0).all() and (word_ids != tok.eot_token_id).all()
    cat_id = tok(["cat"])[0, 1]
    ids = torch.zeros(1, clip.context_length, dtype=torch.long)
    ids[0, 0] = tok.sot_token_id
    ids[0, 1:1 + prompt.n_ctx] = word_ids
    ids[0, 1 + prompt.n_ctx] = cat_id
    ids[0, 2 + prompt.n_ctx] = tok.eot_token_id
    with torch.no_grad():
        prompt.tokens.copy_(clip.token_embedding(word_ids))
        ours = prompt.encode()
        theirs = clip.encode_text(ids)
        normed = prompt()
    assert (ours - theirs).abs().max() < 1e-4
    assert torch.allclose(normed, ours / ours.norm())  # one global norm over [C, D]


def test_reference_prompt_reads_eot_slot_or_last_slot(vit_b16):
    prompt = ReferencePrompt(vit_b16, ["cat", "chest of drawers", "potted plant"])
    n = prompt.n_ctx
    # "cat" → [cat, eot, 0] reads slot 1; "chest of drawers" has 3 word tokens → last slot.
    assert prompt.read_index.tolist()[:2] == [1 + n + 1, 1 + n + 2]
    assert torch.equal(prompt.tokens[0], vit_b16.token_embedding.weight[0])  # initialised with id 0


def test_bias_map_is_image_independent_and_rectified_is_difference(tiny_clip):
    model = ReCLIPPP(tiny_clip, ["cat", "dog", "bird"], templates=ONE_TEMPLATE)
    torch.manual_seed(0)
    a, b = torch.randn(1, 3, 40, 56), torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        oa, ob = model(a), model(b)
    assert torch.equal(oa["bias_logits"], ob["bias_logits"])
    assert not torch.equal(oa["clip_logits"], ob["clip_logits"])
    assert torch.equal(oa["rectified"], oa["clip_logits"] - oa["bias_logits"])
    pe_feat = model.positional((5, 7))
    ref = model.reference()
    manual = torch.einsum("dhw,cd->chw", pe_feat, ref)
    assert torch.allclose(oa["bias_logits"][0], manual, atol=1e-6)


def test_bias_map_cache_only_in_eval_no_grad(tiny_clip):
    model = ReCLIPPP(tiny_clip, ["cat", "dog"], templates=ONE_TEMPLATE).eval()
    with torch.no_grad():
        first = model.bias_map((4, 4))
        assert model.bias_map((4, 4)) is first  # computed once per input size
        assert model.bias_map((5, 4)) is not first
    model.train()
    assert not model._bias_cache  # training invalidates it
    with torch.no_grad():
        model.positional.proj.bias.add_(1.0)
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model.bias_map((4, 4)), first)


def _naive_loss(logits_masks, feat, text, hypotheses):
    """The release's per-image, per-class loop."""
    B, C, h, w = logits_masks.shape
    per_image = []
    for i in range(B):
        if not hypotheses[i]:
            continue
        losses = []
        for k in hypotheses[i]:
            pooled = (feat[i] * logits_masks[i, k][None]).sum(dim=(1, 2)) / (h * w)
            scores = 100 * pooled @ text.t()
            losses.append(F.cross_entropy(scores[None], torch.tensor([k])))
        per_image.append(torch.stack(losses).mean())
    return torch.stack(per_image).mean()


def test_vectorised_loss_equals_naive_loop():
    torch.manual_seed(0)
    B, C, D, h, w = 3, 6, 16, 5, 7
    logits = torch.randn(B, C, h, w, requires_grad=True)
    feat = F.normalize(torch.randn(B, D, h, w), dim=1)
    text = F.normalize(torch.randn(C, D), dim=1)
    hyps = [[0, 2, 5], [], [1]]
    loss, masks = gumbel_masked_contrastive_loss(logits, feat, text, hyps,
                                                 generator=torch.Generator().manual_seed(5), return_masks=True)
    naive = _naive_loss(masks, feat, text, hyps)
    assert abs(loss.item() - naive.item()) < 1e-5
    # gradients flow through the straight-through masks to the logits
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_empty_hypotheses_give_zero_loss_with_graph():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = gumbel_masked_contrastive_loss(logits, torch.randn(2, 8, 4, 4), torch.randn(3, 8), [[], []])
    assert loss.item() == 0.0 and loss.requires_grad


def test_seed_reproduces_gumbel_masks():
    logits = torch.randn(2, 5, 6, 6)
    m1 = gumbel_softmax_hard(logits, generator=torch.Generator().manual_seed(7))
    m2 = gumbel_softmax_hard(logits, generator=torch.Generator().manual_seed(7))
    m3 = gumbel_softmax_hard(logits, generator=torch.Generator().manual_seed(8))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert torch.equal(m1.sum(1), torch.ones(2, 6, 6))  # one-hot per pixel


def test_gradients_reach_only_trainable_parameters(tiny_clip):
    model = ReCLIPPP(tiny_clip, ["cat", "dog", "bird"], templates=ONE_TEMPLATE).train()
    out = model(torch.randn(2, 3, 32, 40))
    loss = model.loss(out, [[0, 1], [2]], generator=torch.Generator().manual_seed(0))
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("clip."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_reclip_and_maskclip_outputs(tiny_clip):
    images = torch.randn(2, 3, 32, 48)
    mc = MaskCLIP(tiny_clip, ["cat", "dog"], templates=ONE_TEMPLATE)
    out = mc(images)
    assert set(out) == {"feat", "clip_logits", "logits"} and torch.equal(out["logits"], out["clip_logits"])
    assert mc.num_trainable_parameters() == 0
    rc = ReCLIP(tiny_clip, ["cat", "dog"], templates=ONE_TEMPLATE)
    out = rc(images)
    assert set(out) == {"feat", "clip_logits", "bias_logits", "rectified", "logits"}
    assert out["logits"].shape == (2, 2, 4, 6)
    assert torch.equal(out["rectified"], out["clip_logits"] - out["bias_logits"])
    assert rc.gumbel_scale == 1000.0
    # ReCLIP's class bias depends on the image (feat · refᵀ), unlike ReCLIP++'s
    with torch.no_grad():
        o1, o2 = rc.eval()(images[:1]), rc(images[1:])
    assert not torch.equal(o1["bias_logits"], o2["bias_logits"])


@pytest.mark.parametrize("mode", ["class", "space"])
def test_bias_ablation_modes(tiny_clip, mode):
    model = ReCLIPPP(tiny_clip, ["cat", "dog"], templates=ONE_TEMPLATE, bias_mode=mode, use_decoder=False)
    out = model(torch.randn(1, 3, 32, 32))
    assert torch.equal(out["logits"], out["rectified"])
    bias = out["bias_logits"][0]
    if mode == "class":  # constant over space
        assert torch.equal(bias, bias[:, :1, :1].expand_as(bias))
    assert not hasattr(model, "decoder")


def test_trainable_state_roundtrip_and_class_mismatch(tiny_clip):
    a = ReCLIPPP(tiny_clip, ["cat", "dog"], templates=ONE_TEMPLATE)
    b = ReCLIPPP(tiny_clip, ["cat", "dog"], templates=ONE_TEMPLATE)
    with torch.no_grad():
        a.positional.proj.weight.normal_()
    b.load_trainable_state_dict(a.trainable_state_dict())
    assert torch.equal(a.positional.proj.weight, b.positional.proj.weight)
    assert not any(k.startswith("clip.") for k in a.trainable_state_dict())
    c = ReCLIPPP(tiny_clip, ["cat", "dog", "bird"], templates=ONE_TEMPLATE)
    with pytest.raises(ValueError, match="another class list"):
        c.load_trainable_state_dict(a.trainable_state_dict())


@pytest.mark.parametrize(
    "names, match",
    [([], "empty"), (["cat", "cat"], "duplicate"), ("cat", "list of strings"), (["cat", ""], "non-empty")],
)
def test_bad_class_lists(tiny_clip, names, match):
    with pytest.raises(ValueError, match=match):
        ReCLIPPP(tiny_clip, names, templates=ONE_TEMPLATE)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: voc, context, ade"):
        class_names("pascal")


def test_text_embeddings_are_normalised_template_averages(tiny_clip):
    names = ["cat", "dog"]
    templates = ["a photo of a {}.", "a drawing of a {}."]
    text = reclip_core.text_embeddings(tiny_clip, names, templates)
    with torch.no_grad():
        per = torch.stack([F.normalize(tiny_clip.encode_text(tiny_clip.tokenizer([t.format(n) for t in templates])), dim=-1).mean(0)
                           for n in names])
    assert torch.allclose(text, F.normalize(per, dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="templates"):
        reclip_core.text_embeddings(tiny_clip, names, ["no placeholder"])


def test_any_number_of_classes_and_sizes(tiny_clip):
    for C in (1, 2, 7):
        model = ReCLIPPP(tiny_clip, [f"class {i}" for i in range(C)], templates=ONE_TEMPLATE)
        out = model(torch.randn(2, 3, 25, 37))
        assert out["logits"].shape == (2, C, 4, 5)
