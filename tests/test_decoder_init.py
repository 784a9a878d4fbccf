"""The mask decoder's two starts: the method's Kaiming-random conv, and the diagnostic pass-through
of the rectified logits (``decoder_init="rectified"``)."""
from __future__ import annotations

import pytest
import torch

from reclip_core import ReCLIPPP
from reclip_core.config import load_config
from reclip_core.decoder import MaskDecoder
from reclip_core.model_factory import build_model

ONE_TEMPLATE = ["a photo of a {}."]


def test_rectified_start_passes_each_class_logit_through():
    decoder = MaskDecoder(feat_dim=6, num_classes=4, init="rectified").eval()  # running stats: mean 0, var 1
    feat = torch.randn(2, 6, 5, 7)
    rectified = torch.randn(2, 4, 5, 7)
    out = decoder(feat, rectified)
    eps = decoder.norm.eps
    torch.testing.assert_close(out, rectified / (1 + eps) ** 0.5)
    # the features are not read at all: other features, the same output
    torch.testing.assert_close(decoder(torch.randn(2, 6, 5, 7), rectified), out)


def test_rectified_start_keeps_the_segmentation_in_train_mode():
    # BatchNorm standardises each class channel over the batch: a per-class shift and scale, which the
    # output shows exactly
    decoder = MaskDecoder(feat_dim=3, num_classes=2, init="rectified").train()
    rectified = torch.randn(4, 2, 6, 6)
    out = decoder(torch.randn(4, 3, 6, 6), rectified)
    mean = rectified.mean(dim=(0, 2, 3), keepdim=True)
    var = rectified.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(out, (rectified - mean) / (var + decoder.norm.eps).sqrt())


def test_both_starts_draw_the_same_random_numbers():
    # what is built after the decoder (and the RNG state after it) must not depend on its start
    torch.manual_seed(0)
    MaskDecoder(5, 3, init="kaiming")
    after_kaiming = torch.rand(3)
    torch.manual_seed(0)
    MaskDecoder(5, 3, init="rectified")
    torch.testing.assert_close(torch.rand(3), after_kaiming)


def test_the_default_start_is_the_methods_kaiming_draw():
    torch.manual_seed(0)
    default = MaskDecoder(5, 3)
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(8, 3, kernel_size=5, padding=2)
    torch.nn.init.kaiming_normal_(reference.weight, mode="fan_out", nonlinearity="relu")
    torch.testing.assert_close(default.conv.weight, reference.weight)
    assert not (default.conv.weight == 0).all()


def test_an_unknown_start_is_refused():
    with pytest.raises(ValueError, match="decoder init must be one of"):
        MaskDecoder(5, 3, init="zeros")


def test_the_config_key_reaches_the_model(tiny_clip):
    cfg = dict(load_config("toy_known"), decoder_init="rectified", templates=ONE_TEMPLATE)
    model = build_model(cfg, clip=tiny_clip, device="cpu")
    assert isinstance(model, ReCLIPPP)
    w = model.decoder.conv.weight.detach()
    assert int((w != 0).sum()) == model.num_classes and float(w.sum()) == model.num_classes
    assert load_config("toy_known")["decoder_init"] == "kaiming"
