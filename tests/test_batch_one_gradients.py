"""Training at batch 1 (every paper config but Cityscapes') runs the decoder's BatchNorm in train
mode on one image. PyTorch's CPU BatchNorm backward gives a wrong bias gradient at N = 1 when the
gradient arriving at its output has channels-last strides (the layout a reshape/permute before
``gumbel_softmax`` produces, as in the authors' release; docs/deviations.md). The project's loss
keeps [B, C, h, w] and hands the decoder a contiguous gradient. These tests pin that: the layout
of that gradient, the BatchNorm bias gradient equal to the sum of the upstream gradient, and the
decoder's gradients against finite differences.
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from reclip_core import ReCLIPPP
from reclip_core.decoder import MaskDecoder

ONE_TEMPLATE = ["a photo of a {}."]


def test_decoder_gradients_at_batch_one_equal_finite_differences():
    torch.manual_seed(0)
    decoder = MaskDecoder(feat_dim=6, num_classes=3).double().train()
    feat = torch.randn(1, 6, 5, 7, dtype=torch.float64)
    rectified = torch.randn(1, 3, 5, 7, dtype=torch.float64)
    upstream = torch.randn(1, 3, 5, 7, dtype=torch.float64)
    names = ["conv.weight", "conv.bias", "norm.weight", "norm.bias"]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in decoder.named_parameters()}
    buffers = dict(decoder.named_buffers())

    def loss(*values):  # a smooth scalar of the decoder output, all parameters as inputs
        out = functional_call(decoder, ({**dict(zip(names, values[:4])), **buffers}), (values[4], values[5]))
        return (out * upstream).sum()

    inputs = tuple(params[n] for n in names) + (feat.requires_grad_(True), rectified.requires_grad_(True))
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6)


def test_the_loss_hands_the_decoder_a_contiguous_gradient_at_batch_one(tiny_clip):
    torch.manual_seed(0)
    model = ReCLIPPP(tiny_clip, ["cat", "dog", "bird"], templates=ONE_TEMPLATE).train()
    seen = {}

    def keep_output_grad(module, args, output):  # returns None: the output itself is unchanged
        output.register_hook(lambda g: seen.update(grad=g))

    model.decoder.register_forward_hook(keep_output_grad)
    out = model(torch.randn(1, 3, 32, 40))
    loss = model.loss(out, [[0, 2]], generator=torch.Generator().manual_seed(0))
    loss.backward()
    grad = seen["grad"]
    assert grad.shape == out["logits"].shape and grad.is_contiguous()
    assert grad.abs().sum() > 0
    # BatchNorm's bias enters every output pixel with weight 1: dL/db_c = sum over n, y, x of dL/dy
    torch.testing.assert_close(model.decoder.norm.bias.grad, grad.sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
