"""The segmenter a config describes: ReCLIP++, ReCLIP or the MaskCLIP baseline on the config's
CLIP, class names and templates, with the config's loss and presence settings applied."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from .backbone import logit_scale
from .clip_loading import resolve_device
from .model import MaskCLIP, ReCLIP, ReCLIPPP
from .run_inputs import load_config_clip, presence_rule, resolve_class_names, resolve_templates


def build_model(cfg: Mapping[str, Any], clip: Optional[nn.Module] = None, device: Any = None,
                kind: Optional[str] = None) -> nn.Module:
    """The segmenter a config describes (``kind`` overrides ``cfg["model"]``; ``"maskclip"`` too)."""
    dev = resolve_device(device if device is not None else cfg["device"])
    if clip is None:
        if cfg["clip"]["pretrained"] is None:
            torch.manual_seed(cfg["seed"])  # a random CLIP must be the same in every command and process
        clip = load_config_clip(cfg, dev)
        # Building a CLIP draws from the RNG (random init before its weights are loaded): reseed so
        # the heads start from the same state whether the CLIP was loaded here (the CLI) or passed
        # in (the notebooks' Lab). Without this the same config trained to 6.4 vs 21.4 mIoU.
        torch.manual_seed(cfg["seed"])
    names, templates = resolve_class_names(cfg), resolve_templates(cfg)
    common = dict(templates=templates, ln_eps=cfg["clip"]["ln_eps"], cls_token=cfg["clip"]["cls_token"])
    kind = kind or cfg["model"]
    slot = cfg.get("reference_slot", "eot")  # where the Reference prompt is read (a release option)
    if kind == "reclip++":
        model = ReCLIPPP(clip, names, use_decoder=cfg["use_decoder"], bias_mode=cfg["bias_mode"],
                         reference_slot=slot, decoder_init=cfg.get("decoder_init", "kaiming"), **common)
    elif kind == "reclip":
        model = ReCLIP(clip, names, reference_slot=slot, **common)
    elif kind == "maskclip":
        model = MaskCLIP(clip, names, **common)
    else:
        raise ValueError(f"unknown model kind {kind!r}; use 'reclip++', 'reclip' or 'maskclip'.")
    if cfg["gumbel_scale"] is not None and kind != "maskclip":  # > 0, checked with the config
        model.gumbel_scale = float(cfg["gumbel_scale"])  # an instance attribute shadows the class constant
    if kind != "maskclip":
        model.loss_normalisation = cfg.get("loss_normalisation", "nonempty")
        rule = presence_rule(cfg, kind)
        if rule != (float(cfg["pd_threshold"]), 10.0):
            model.pd_rule = rule  # the PD of this model's own heads (evaluation.evaluate reads it)
    if cfg["score_scale"] is not None and kind != "maskclip":
        # 'clip': the loss scores regions on this CLIP's own temperature. The method's 100 *is*
        # OpenAI CLIP's; on a CLIP that learned a lower one (the toy CLIP: 20.8) 100 saturates the
        # cross-entropy, which then prefers CLIP's own argmax to the hypotheses (docs/training.md).
        model.score_scale = logit_scale(clip) if cfg["score_scale"] == "clip" else float(cfg["score_scale"])
    return model.to(dev)


__all__ = ("build_model",)
