"""The segmenters: MaskCLIP (no training), ReCLIP++ and its CVPR predecessor ReCLIP.

All share the frozen CLIP, the dense features and the class text features; they differ in how
the bias is modelled (method.md §2, §5) and whether a decoder refines the result (§3).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .backbone import dense_features, output_dim, visual_width
from .decoder import MaskDecoder
from .loss import BatchHypotheses, gumbel_masked_contrastive_loss
from .options import BIAS_MODES
from .positional_bias import PositionalBias, resized_positional_embedding
from .rectify import bias_logits, clip_logits, rectify
from .reference_prompt import ReferencePrompt
from .text import PROMPT_TEMPLATES, text_embeddings, validate_class_names

ClsToken = Union[None, str, os.PathLike, torch.Tensor]


class _CLIPSegmenter(nn.Module):
    """Frozen CLIP + class text features + dense features; subclasses add the bias model."""

    #: scale inside the Gumbel-Softmax of the training loss
    gumbel_scale: float = 100.0
    #: scale of the loss's class scores (method.md §3: 100, OpenAI CLIP's logit scale)
    score_scale: float = 100.0
    #: divisor of a batch's loss: "nonempty" (images with a hypothesis) or "batch" (the release)
    loss_normalisation: str = "nonempty"

    def __init__(
        self,
        clip: nn.Module,
        names: Sequence[str],
        templates: Sequence[str] = PROMPT_TEMPLATES,
        text: Optional[torch.Tensor] = None,
        ln_eps: Optional[float] = None,
        cls_token: ClsToken = None,
    ):
        super().__init__()
        self.class_names = validate_class_names(names)
        self.clip = clip
        for p in self.clip.parameters():  # every CLIP weight stays frozen
            p.requires_grad_(False)
        self.templates = tuple(templates)
        self.ln_eps = ln_eps
        self.cls_token = cls_token
        if text is not None and tuple(text.shape) != (len(self.class_names), output_dim(clip)):
            raise ValueError(f"text features must be [C, D] = [{len(self.class_names)}, {output_dim(clip)}], "
                             f"got {tuple(text.shape)}.")
        # Computed lazily: 85 templates × C classes through the text encoder is the slowest part of
        # building a model on CPU and many uses (parameter counts, checkpoint conversion) need none.
        self.register_buffer("_text", None if text is None else text.detach().float(), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def text(self) -> torch.Tensor:
        """Class text features [C, D] (templates averaged, L2-normalised)."""
        if self._text is None:
            self._text = text_embeddings(self.clip, self.class_names, self.templates)
        return self._text

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # CLIP is frozen: no dropout/BN updates even while the heads train
        return self

    def features(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        with torch.no_grad():
            return dense_features(self.clip, images, ln_eps=self.ln_eps, cls_token=self.cls_token)

    def _base(self, images: Optional[torch.Tensor], feat: Optional[torch.Tensor]):
        if feat is None:
            if images is None:
                raise ValueError("pass images [B, 3, H, W] (or precomputed dense features feat=[B, D, h, w]).")
            feat, _ = self.features(images)
        logits = clip_logits(feat, self.text)
        planted = getattr(self.clip.visual, "planted_bias", None)
        if planted is not None and planted.where != "features":
            # the known-answer lab's diagnostics (planted_bias.py): the bias in the logits; the dense
            # features clean, or (where="loss"/"decoder", ReCLIPPP.forward) biased for one reader
            logits = logits + planted.logit_map(tuple(feat.shape[-2:])).to(logits)
        return feat, logits

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Weights and buffers of everything but the frozen CLIP (what a checkpoint stores)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def load_trainable_state_dict(self, state: Dict[str, torch.Tensor], strict: bool = True) -> None:
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise ValueError(f"checkpoint does not match this model: missing {missing}, unexpected {unexpected}.")
        for k, v in state.items():
            if k in own and own[k].shape != v.shape:
                raise ValueError(
                    f"checkpoint tensor {k} has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)}: "
                    "was it trained for another class list?"
                )
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        self._clear_cache()

    def _clear_cache(self) -> None:
        pass


class MaskCLIP(_CLIPSegmenter):
    """Frozen CLIP's dense logits with argmax: the biased baseline (method.md §6). No training."""

    def forward(self, images: Optional[torch.Tensor] = None, feat: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        feat, logits = self._base(images, feat)
        return {"feat": feat, "clip_logits": logits, "logits": logits}


class ReCLIPPP(_CLIPSegmenter):
    """ReCLIP++: bias = pe_feat · refᵀ; rectified = CLIP logits − bias; a mask decoder refines.

    ``bias_mode`` (an ablation, not in the paper): ``"both"`` (the method), ``"class"`` (a learnable
    position-independent vector in place of ``pe_feat``: class bias only), ``"space"`` (the frozen
    class texts in place of ``ref``: a class-specific space bias without the Reference prompt).
    ``use_decoder=False`` gives the rectification-only model (logits = rectified).
    ``reference_slot`` says where the Reference prompt's output is read (``ReferencePrompt``'s
    ``read_slot``: ``"eot"``, or the release's ``"release"``). ``decoder_init``: the decoder's start
    (``MaskDecoder``: ``"kaiming"``, the method, or the diagnostic ``"rectified"``).
    """

    gumbel_scale = 100.0

    def __init__(self, clip: nn.Module, names: Sequence[str], *, use_decoder: bool = True, bias_mode: str = "both",
                 reference_slot: str = "eot", decoder_init: str = "kaiming", **common: Any):
        # ``common``: the keyword arguments every segmenter takes (templates, text, ln_eps, cls_token)
        super().__init__(clip, names, **common)
        if bias_mode not in BIAS_MODES:
            raise ValueError(f"bias_mode must be one of {BIAS_MODES}, got {bias_mode!r}.")
        self.bias_mode = bias_mode
        self.use_decoder = use_decoder
        if bias_mode in ("both", "class"):
            self.reference = ReferencePrompt(clip, self.class_names, read_slot=reference_slot)
        if bias_mode in ("both", "space"):
            self.positional = PositionalBias(clip)
        if bias_mode == "class":
            self.class_vector = nn.Parameter(torch.zeros(output_dim(clip)))
        if use_decoder:
            self.decoder = MaskDecoder(output_dim(clip), self.num_classes, init=decoder_init)
        self._bias_cache: Dict[Tuple[int, int], torch.Tensor] = {}

    def _clear_cache(self) -> None:
        self._bias_cache.clear()

    def train(self, mode: bool = True):
        self._clear_cache()  # parameters are about to change
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._clear_cache()  # .to(device)/.half() invalidate cached maps
        return super()._apply(fn, *args, **kwargs)

    def reference_features(self) -> torch.Tensor:
        return self.reference()

    def bias_map(self, hw: Tuple[int, int]) -> torch.Tensor:
        """The bias logit map [C, h, w] for an input grid ``hw``. It does not depend on the image,
        so in eval mode without gradients it is computed once per input size and reused."""
        cacheable = not self.training and not torch.is_grad_enabled()
        key = tuple(hw)
        if cacheable and key in self._bias_cache:
            return self._bias_cache[key]
        if self.bias_mode == "both":
            bias = bias_logits(self.positional(key), self.reference())
        elif self.bias_mode == "class":
            ref = self.reference()
            bias = (ref @ self.class_vector).view(-1, 1, 1).expand(-1, *key)
        else:
            bias = bias_logits(self.positional(key), self.text)
        if cacheable:
            self._bias_cache[key] = bias
        return bias

    def forward(self, images: Optional[torch.Tensor] = None, feat: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        feat, logits = self._base(images, feat)
        bias = self.bias_map(tuple(feat.shape[-2:]))
        rectified = rectify(logits, bias)
        decoder_feat = feat
        planted = getattr(self.clip.visual, "planted_bias", None)
        if planted is not None and planted.where in ("loss", "decoder"):
            # the known-answer lab's diagnostics: the planted offset in the features one reader sees
            biased = feat + planted.feature_offset_map(tuple(feat.shape[-2:])).to(feat)
            feat, decoder_feat = (biased, feat) if planted.where == "loss" else (feat, biased)
        out = {
            "feat": feat,  # what the loss pools
            "clip_logits": logits,
            "bias_logits": bias.unsqueeze(0).expand(feat.shape[0], -1, -1, -1),
            "rectified": rectified,
        }
        out["logits"] = self.decoder(decoder_feat, rectified) if self.use_decoder else rectified
        return out

    def loss(self, out: Dict[str, torch.Tensor], hypotheses: BatchHypotheses,
             generator: Optional[torch.Generator] = None, return_masks: bool = False):
        """Gumbel masked contrastive loss (method.md §3) on ``out["logits"]``."""
        return gumbel_masked_contrastive_loss(
            out["logits"], out["feat"], self.text, hypotheses, gumbel_scale=self.gumbel_scale,
            score_scale=self.score_scale, generator=generator, return_masks=return_masks,
            normalisation=self.loss_normalisation,
        )


class ReCLIP(ReCLIPPP):
    """ReCLIP (CVPR 2024, method.md §5): class bias feat · refᵀ (image-dependent) plus a
    non-negative per-class space map from three 3×3 conv–BN–ReLU layers on the positional
    embedding; no decoder; Gumbel scale 1000."""

    gumbel_scale = 1000.0

    def __init__(self, clip: nn.Module, names: Sequence[str], *, reference_slot: str = "eot", **common: Any):
        # ``common`` as for every segmenter (templates, text, ln_eps, cls_token); the ReCLIP++ heads
        # are not built: ReCLIP has its own bias model and no decoder.
        _CLIPSegmenter.__init__(self, clip, names, **common)
        self.bias_mode = "reclip"
        self.use_decoder = False
        self.reference = ReferencePrompt(clip, self.class_names, read_slot=reference_slot)
        width, C = visual_width(clip), self.num_classes
        layers, chans = [], [width, 512, 256, C]
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.space_net = nn.Sequential(*layers)
        self._bias_cache = {}

    def space_map(self, hw: Tuple[int, int]) -> torch.Tensor:
        pe = resized_positional_embedding(self.clip, hw).unsqueeze(0)
        return self.space_net(pe.to(self.space_net[0].weight.dtype)).squeeze(0)  # [C, h, w] ≥ 0

    def forward(self, images: Optional[torch.Tensor] = None, feat: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        feat, logits = self._base(images, feat)
        hw = tuple(feat.shape[-2:])
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable and hw in self._bias_cache:
            ref, space = self._bias_cache[hw]
        else:
            ref, space = self.reference(), self.space_map(hw)
            if cacheable:
                self._bias_cache[hw] = (ref, space)
        bias = clip_logits(feat, ref) + space.unsqueeze(0)
        rectified = rectify(logits, bias)
        return {"feat": feat, "clip_logits": logits, "bias_logits": bias, "rectified": rectified, "logits": rectified}


__all__ = ("MaskCLIP", "ReCLIPPP", "ReCLIP", "BIAS_MODES")
