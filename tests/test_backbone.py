"""The frozen backbone: class-token path, dense value path, input handling (method.md §1)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import reclip_core
from reclip_core.backbone import dense_features, encode_image_cls


def _ln(x, norm, eps=None):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + (norm.eps if eps is None else eps)) * norm.weight + norm.bias


def _mlp(block, x):
    h = x @ block.mlp.c_fc.weight.t() + block.mlp.c_fc.bias
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU, as OpenAI CLIP
    return h @ block.mlp.c_proj.weight.t() + block.mlp.c_proj.bias


def _attention(block, x):
    attn = block.attn
    W = x.shape[-1]
    heads = attn.num_heads
    qkv = x @ attn.in_proj_weight.t() + attn.in_proj_bias
    q, k, v = qkv.split(W, dim=-1)
    B, N, _ = x.shape

    def split(t):
        return t.view(B, N, heads, W // heads).transpose(1, 2)

    a = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(W // heads)).softmax(-1)
    o = (a @ split(v)).transpose(1, 2).reshape(B, N, W)
    return o @ attn.out_proj.weight.t() + attn.out_proj.bias


def reference_dense(clip, images, eps=None):
    """method.md §1 written out step by step from the raw weights."""
    vis = clip.visual
    p = vis.patch_size[0]
    B, _, H, W = images.shape
    Hp, Wp = math.ceil(H / p) * p, math.ceil(W / p) * p
    padded = torch.zeros(B, 3, Hp, Wp)
    padded[:, :, :H, :W] = images
    h, w = Hp // p, Wp // p
    patches = padded.unfold(2, p, p).unfold(3, p, p)  # B,3,h,w,p,p
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, h * w, 3 * p * p)
    tokens = patches @ vis.conv1.weight.reshape(vis.conv1.weight.shape[0], -1).t()
    g = vis.grid_size[0]
    pe = vis.positional_embedding[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    if (h, w) != (g, g):
        pe = F.interpolate(pe, size=(h, w), mode="bicubic", align_corners=False)
    pe = pe.permute(0, 2, 3, 1).reshape(h * w, -1)
    x = torch.cat([vis.class_embedding.expand(B, 1, -1), tokens], 1)
    x = x + torch.cat([vis.positional_embedding[:1], pe])
    x = _ln(x, vis.ln_pre)
    blocks = vis.transformer.resblocks
    for blk in blocks[:-1]:
        x = x + _attention(blk, _ln(x, blk.ln_1, eps))
        x = x + _mlp(blk, _ln(x, blk.ln_2, eps))
    last = blocks[-1]
    Wd = x.shape[-1]
    y = _ln(x, last.ln_1, eps)
    v = y @ last.attn.in_proj_weight[2 * Wd:].t() + last.attn.in_proj_bias[2 * Wd:]
    d = x + v @ last.attn.out_proj.weight.t() + last.attn.out_proj.bias
    d = d + _mlp(last, _ln(d, last.ln_2, eps))
    d = _ln(d[:, 1:], vis.ln_post) @ vis.proj
    d = d / d.norm(dim=-1, keepdim=True)
    return d.transpose(1, 2).reshape(B, -1, h, w)


@pytest.mark.parametrize("size", [(224, 224), (336, 500), (17, 33)])
def test_dense_value_path_matches_step_by_step(vit_b16, size):
    torch.manual_seed(1)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        feat, hw = dense_features(vit_b16, images)
        ref = reference_dense(vit_b16, images)
    assert hw == (math.ceil(size[0] / 16), math.ceil(size[1] / 16))
    assert feat.shape == (2, 512, *hw)
    assert torch.allclose(feat.norm(dim=1), torch.ones(2, *hw), atol=1e-5)
    assert (feat - ref).abs().max() < 1e-4


def test_ln_eps_option_is_used(tiny_clip):
    torch.manual_seed(2)
    images = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        a, _ = dense_features(tiny_clip, images, ln_eps=0.5)
        b = reference_dense(tiny_clip, images, eps=0.5)
        c, _ = dense_features(tiny_clip, images)
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-3  # the override really changes the features


def test_cls_token_option_changes_class_path_only(tiny_clip):
    torch.manual_seed(3)
    images = torch.randn(1, 3, 32, 32)
    token = torch.randn(tiny_clip.visual.class_embedding.shape)
    with torch.no_grad():
        a = encode_image_cls(tiny_clip, images, cls_token=token)
        b = encode_image_cls(tiny_clip, images)
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="visual width"):
        encode_image_cls(tiny_clip, images, cls_token=torch.randn(7))


def test_class_token_path_equals_encode_image(vit_b16):
    torch.manual_seed(4)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = encode_image_cls(vit_b16, images, normalize=False)
        theirs = vit_b16.encode_image(images)
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_image_embedding_follows_the_clip_pooling(tmp_path, pool_type):
    """open_clip's ``pool_type="avg"`` (the toy CLIP's) embeds the mean of the patch tokens, not
    the class token: the hypotheses' image path must give what ``encode_image`` gives."""
    import json

    cfg = json.loads((Path(__file__).parent / "fixtures" / "tiny_clip.json").read_text())
    cfg["vision_cfg"]["pool_type"] = pool_type
    path = tmp_path / "tiny_clip_pool.json"
    path.write_text(json.dumps(cfg))
    torch.manual_seed(5)
    clip = reclip_core.load_clip(str(path), pretrained=None, device="cpu")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = encode_image_cls(clip, images, normalize=False)
        theirs = clip.encode_image(images)
    assert (ours - theirs).abs().max() < 1e-4


def test_small_custom_clip_any_size(tiny_clip):
    feat, hw = dense_features(tiny_clip, torch.randn(3, 3, 19, 45))
    assert hw == (3, 6) and feat.shape == (3, 48, 3, 6)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(3, 32, 32), r"\[B, 3, H, W\]"),
        (torch.randn(1, 4, 32, 32), r"\[B, 3, H, W\]"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN or Inf"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating point"),
    ],
)
def test_bad_images_raise_helpful_value_error(tiny_clip, bad, match):
    with pytest.raises(ValueError, match=match):
        dense_features(tiny_clip, bad)


def test_frozen_and_eval(vit_b16):
    assert not vit_b16.training
    assert all(not p.requires_grad for p in vit_b16.parameters())
    assert hasattr(vit_b16, "tokenizer")


def test_device_auto_and_errors():
    assert reclip_core.resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            reclip_core.resolve_device("cuda")
    with pytest.raises(ValueError, match="Unknown CLIP architecture"):
        reclip_core.load_clip("ViT-Q-99", pretrained=None)
    with pytest.raises(ValueError, match="Known tags"):
        reclip_core.load_clip("ViT-B-16-quickgelu", pretrained="no-such-tag")


def test_offline_load_names_cache_dir(tmp_path):
    """Without network or cache, the error must say where the cache is and how to fill it."""
    code = (
        "import reclip_core\n"
        f"reclip_core.load_clip('ViT-B-16-quickgelu', 'openai', device='cpu', cache_dir={str(tmp_path)!r})\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "Could not load CLIP weights" in proc.stderr
    assert str(tmp_path) in proc.stderr and "pretrained=<path" in proc.stderr


def test_local_weights_file(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.state_dict().items()}, str(path))
    from tests.conftest import FIXTURES

    loaded = reclip_core.load_clip(str(FIXTURES / "tiny_clip.json"), pretrained=str(path), device="cpu")
    for (k, a), (_, b) in zip(tiny_clip.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast(tiny_clip):
    clip = reclip_core.load_clip(str(__import__("tests.conftest").conftest.FIXTURES / "tiny_clip.json"),
                                 pretrained=None, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        feat, _ = dense_features(clip, torch.randn(2, 3, 40, 40, device="cuda"))
    assert feat.is_cuda and torch.isfinite(feat).all()
