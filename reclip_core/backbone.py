"""Frozen CLIP backbone: the class-token path and the dense (MaskCLIP-style) features.

method.md §1. Everything here reads sizes from the model (width, patch size, grid, output
dimension), so the OpenAI ViT-B/16 and the toy world's small CLIP go through the same code.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ---------------------------------------------------------------------------------------------
# Image checks and token embedding
# ---------------------------------------------------------------------------------------------
def check_images(images: torch.Tensor) -> None:
    """Raise a ``ValueError`` that says what to do when ``images`` is not a normalised batch."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must have shape [B, 3, H, W] (RGB, CLIP-normalised); got {tuple(images.shape)}. "
            "Add a batch dimension with images[None] or convert greyscale/RGBA to RGB first."
        )
    if not images.is_floating_point():
        raise ValueError("images must be floating point and normalised with CLIP_MEAN/CLIP_STD.")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or Inf values; check the image file and the preprocessing.")


def _patch_size(visual: nn.Module) -> Tuple[int, int]:
    ps = visual.patch_size
    return (ps, ps) if isinstance(ps, int) else tuple(ps)


def resize_patch_pos_embed(visual: nn.Module, hw: Tuple[int, int]) -> torch.Tensor:
    """The patch rows of the positional embedding resized to ``hw`` (bicubic) → [h*w, width].

    The class-token row is kept apart by the caller. When ``hw`` is the pretraining grid the
    embedding is returned unchanged (bit-exact with ``encode_image``).
    """
    pos = visual.positional_embedding[1:]
    gh, gw = visual.grid_size
    if tuple(hw) == (gh, gw):
        return pos
    width = pos.shape[-1]
    grid = pos.reshape(1, gh, gw, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(hw), mode="bicubic", align_corners=False)
    return grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(hw[0] * hw[1], width)


def _load_cls_token(cls_token: Union[None, str, os.PathLike, torch.Tensor], visual: nn.Module) -> torch.Tensor:
    if cls_token is None:
        return visual.class_embedding
    if not isinstance(cls_token, torch.Tensor):
        cls_token = torch.load(cls_token, map_location="cpu", weights_only=True)
    cls_token = cls_token.reshape(-1)
    if cls_token.numel() != visual.class_embedding.numel():
        raise ValueError(
            f"cls_token has {cls_token.numel()} values but the model's class embedding has "
            f"{visual.class_embedding.numel()}; pass a tensor of the visual width."
        )
    return cls_token.to(visual.class_embedding)


def visual_tokens(
    clip: nn.Module,
    images: torch.Tensor,
    cls_token: Union[None, str, os.PathLike, torch.Tensor] = None,
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Patchify ``images`` (zero-padded right/bottom to the patch size), add the class token and
    the resized positional embedding, apply ``ln_pre`` → ([B, 1+h*w, width], (h, w))."""
    check_images(images)
    visual = clip.visual
    ph, pw = _patch_size(visual)
    H, W = images.shape[-2:]
    pad_h, pad_w = (-H) % ph, (-W) % pw
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # [B, width, h, w]
    hw = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)  # [B, h*w, width]
    cls = _load_cls_token(cls_token, visual)
    cls_row = cls.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    pos = torch.cat([visual.positional_embedding[:1], resize_patch_pos_embed(visual, hw)], dim=0)
    x = torch.cat([cls_row, x], dim=1) + pos.to(x.dtype)
    return visual.ln_pre(x), hw


# ---------------------------------------------------------------------------------------------
# Transformer blocks (run by hand so LayerNorm eps can be overridden like the release)
# ---------------------------------------------------------------------------------------------
def _ln(norm: nn.LayerNorm, x: torch.Tensor, eps: Optional[float]) -> torch.Tensor:
    if eps is None:
        return norm(x)
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), eps).to(x.dtype)


def _check_block(block: nn.Module) -> None:
    if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
        raise ValueError(
            "dense_features supports open_clip ViTs with standard residual attention blocks "
            "(nn.MultiheadAttention); this model uses a custom block type."
        )


def _block(block: nn.Module, x: torch.Tensor, eps: Optional[float]) -> torch.Tensor:
    """One standard open_clip residual attention block (batch-first)."""
    if eps is None:
        return block(x)
    y = _ln(block.ln_1, x, eps)
    x = x + block.ls_1(block.attn(y, y, y, need_weights=False)[0])
    return x + block.ls_2(block.mlp(_ln(block.ln_2, x, eps)))


def _value_path(block: nn.Module, x: torch.Tensor, eps: Optional[float]) -> torch.Tensor:
    """The last block without query–key attention: each token keeps only its own value."""
    attn: nn.MultiheadAttention = block.attn
    width = x.shape[-1]
    y = _ln(block.ln_1, x, eps)
    w_v = attn.in_proj_weight[2 * width:]
    b_v = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
    v = F.linear(y, w_v, b_v)
    v = attn.out_proj(v)
    d = x + block.ls_1(v)
    return d + block.ls_2(block.mlp(_ln(block.ln_2, d, eps)))


def _blocks_before_last(clip: nn.Module, x: torch.Tensor, ln_eps: Optional[float]) -> torch.Tensor:
    transformer = clip.visual.transformer
    if not getattr(transformer, "batch_first", True):
        raise ValueError("Only batch-first open_clip transformers are supported (open_clip >= 2.24).")
    for block in transformer.resblocks[:-1]:
        _check_block(block)
        x = _block(block, x, ln_eps)
    return x


def _project(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    visual = clip.visual
    tokens = visual.ln_post(tokens)
    return tokens @ visual.proj if visual.proj is not None else tokens


def _tokens_before_last(clip: nn.Module, images: torch.Tensor, ln_eps: Optional[float], cls_token):
    """Tokens entering the last block, the token grid and that block (shared by the image
    embedding and the dense features, so one forward can give both)."""
    x, hw = visual_tokens(clip, images, cls_token)
    x = _blocks_before_last(clip, x, ln_eps)
    last = clip.visual.transformer.resblocks[-1]
    _check_block(last)
    return x, hw, last


def _pooled_embedding(clip: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The image embedding from the last block's output, following open_clip's ``pool_type``."""
    if getattr(clip.visual, "pool_type", "tok") == "avg":
        # ln_post is per token and the projection linear: mean after them = open_clip's pooling
        return _project(clip, x[:, 1:]).mean(1)
    return _project(clip, x[:, 0])


def _dense_tokens(clip: nn.Module, last: nn.Module, x: torch.Tensor, ln_eps: Optional[float],
                  hw: Tuple[int, int], images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP dense features [B, h*w, D], L2-normalised, from the tokens entering the last block
    (``images``: what they came from, read by a planted patch noise)."""
    d = _value_path(last, x[:, 1:], ln_eps)  # the class token does not influence patches here
    feat = F.normalize(_project(clip, d), dim=-1)
    planted = getattr(clip.visual, "planted_bias", None)
    if planted is not None and planted.where == "features":
        # the toy CLIP's known bias (planted_bias.py): added after the normalisation, so the cosine
        # logits move by exactly the planted map
        feat = feat + planted.feature_offset(hw).to(feat)
    if planted is not None and planted.noise_sigma > 0:
        # its patch noise, a function of each patch's pixels: in the features whatever ``where`` is
        feat = feat + planted.noise_offset(images).to(feat)
    return feat


def image_and_dense_features(
    clip: nn.Module,
    images: torch.Tensor,
    ln_eps: Optional[float] = None,
    cls_token: Union[None, str, os.PathLike, torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
    """``encode_image_cls`` (normalised) and ``dense_features`` (as [B, h*w, D]) from one forward
    of the blocks before the last → (image [B, D], dense [B, h*w, D], (h, w)). Used by the toy
    CLIP's pretraining losses on dense features."""
    x, hw, last = _tokens_before_last(clip, images, ln_eps, cls_token)
    image = F.normalize(_pooled_embedding(clip, _block(last, x, ln_eps)), dim=-1)
    return image, _dense_tokens(clip, last, x, ln_eps, hw, images), hw


def encode_image_cls(
    clip: nn.Module,
    images: torch.Tensor,
    ln_eps: Optional[float] = None,
    cls_token: Union[None, str, os.PathLike, torch.Tensor] = None,
    normalize: bool = True,
) -> torch.Tensor:
    """CLIP's image embedding (class-token path) through the same tokens as ``dense_features``.

    At the pretraining resolution and with default options it equals ``clip.encode_image``.
    Used for image-level hypotheses (method.md §3). A CLIP built with open_clip's
    ``pool_type="avg"`` (the toy CLIP) embeds an image as the mean of its projected patch
    tokens, so that is what this returns for it.
    """
    x, _, last = _tokens_before_last(clip, images, ln_eps, cls_token)
    emb = _pooled_embedding(clip, _block(last, x, ln_eps))
    return F.normalize(emb, dim=-1) if normalize else emb


def dense_features(
    clip: nn.Module,
    images: torch.Tensor,
    ln_eps: Optional[float] = None,
    cls_token: Union[None, str, os.PathLike, torch.Tensor] = None,
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """MaskCLIP-style dense features → (feat [B, D, h, w] L2-normalised per patch, (h, w)).

    A CLIP carrying a planted bias (``clip.visual.planted_bias``, the toy lab's known-answer CLIP)
    has its offset added after the normalisation.

    All blocks but the last run normally; in the last one each token passes through the value
    and output projections only (no query–key mixing), then the MLP, ``ln_post`` and the visual
    projection (method.md §1). ``ln_eps`` overrides the blocks' LayerNorm eps (the release uses
    1e-6); ``cls_token`` replaces the class embedding (a tensor or a path to one).
    """
    x, hw, last = _tokens_before_last(clip, images, ln_eps, cls_token)
    feat = _dense_tokens(clip, last, x, ln_eps, hw, images)  # [B, h*w, D]
    B = feat.shape[0]
    return feat.transpose(1, 2).reshape(B, -1, hw[0], hw[1]), hw


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] → CLIP-normalised."""
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def logit_scale(clip: nn.Module) -> float:
    """The CLIP's learned temperature exp(logit_scale): image–text scores are ``logit_scale · cos``
    (≈ 100 for OpenAI's CLIP, whose training clamped it at 100; the toy CLIP learned its own)."""
    if not hasattr(clip, "logit_scale"):
        raise ValueError(f"{type(clip).__name__} has no logit_scale: use a number for score_scale instead of 'clip'.")
    return float(clip.logit_scale.detach().float().exp())


def output_dim(clip: nn.Module) -> int:
    """Width of the joint image–text space (512 for ViT-B/16)."""
    proj = clip.visual.proj
    return proj.shape[1] if proj is not None else clip.visual.transformer.width


def visual_width(clip: nn.Module) -> int:
    return clip.visual.transformer.width


__all__: Sequence[str] = (
    "CLIP_MEAN", "CLIP_STD", "dense_features", "encode_image_cls", "image_and_dense_features",
    "visual_tokens", "resize_patch_pos_embed", "normalize_images", "check_images", "output_dim",
    "visual_width",
)
