"""Loading the frozen CLIP: OpenAI's weights through open_clip, a config file, or the toy world's
CLIP; frozen, in eval mode, with its tokenizer attached; the device; a digest of its weights.

The loaded model is what ``backbone`` reads features from (docs/architecture.md, Conventions)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .toy_clip import build_toy_clip, load_toy_clip

DEFAULT_ARCH = "ViT-B-16-quickgelu"
DEFAULT_PRETRAINED = "openai"
TOY_ARCH = "toy"


def default_cache_dir() -> Path:
    """Where CLIP weights are cached (``$RECLIP_CACHE/clip``, default ``~/.cache/reclip/clip``)."""
    root = os.environ.get("RECLIP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "reclip"))
    return Path(root) / "clip"


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; use device='cpu' or 'auto'.")
    return device


def clip_fingerprint(clip: nn.Module) -> str:
    """A short digest of the frozen CLIP's weights. Everything derived from CLIP and stored on disk
    (hypotheses, feature caches, training runs) records it, so files made with other weights (e.g.
    after `make toy-clip`) are refused instead of silently reused. Hashes the patch embedding, the
    visual and text projections and the class embedding: cheap, and any retraining changes them."""
    digest = hashlib.sha256()
    visual = clip.visual
    conv1 = getattr(visual, "conv1", None)
    for t in (None if conv1 is None else conv1.weight, getattr(visual, "proj", None),
              getattr(visual, "class_embedding", None), getattr(clip, "text_projection", None)):
        if isinstance(t, torch.Tensor):
            digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    planted = getattr(visual, "planted_bias", None)
    if planted is not None:  # a planted bias (planted_bias.py) changes the dense features: no shared caches
        digest.update(planted.where.encode())
        for t in planted.state_dict().values():
            digest.update(t.detach().double().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_clip(
    arch: str = DEFAULT_ARCH,
    pretrained: Optional[str] = DEFAULT_PRETRAINED,
    device: Union[str, torch.device] = "auto",
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> nn.Module:
    """A frozen open_clip CLIP in eval mode, with ``model.tokenizer`` attached.

    - ``arch="ViT-B-16-quickgelu", pretrained="openai"``: the paper's backbone (QuickGELU matters).
    - ``pretrained=None``: random weights (tests, pipelines without downloads).
    - ``pretrained=<file path>``: local open_clip weights (``.safetensors``/``.bin``/``.pt``).
    - ``arch=<path to an open_clip model-config .json>``: a custom (e.g. small) architecture.
    - ``arch="toy"``: the toy world's small CLIP (``pretrained`` ``"openai"``/``"biased"`` → the
      committed default weights, ``"uniform"`` → the uniformly pretrained ones, ``"biased_seed1"`` →
      a second pretraining seed of the default, ``"known"`` → the known-answer world's CLIP, a
      folder → weights there, ``None`` → random). A config's ``clip.planted_bias`` is added by
      ``run_inputs.load_config_clip``.
    """
    import open_clip  # lazy: ~2.7 s beyond torch to import; readers and CLI messages never need it

    dev = resolve_device(device)
    if arch == TOY_ARCH:
        if pretrained is None:
            model = build_toy_clip()
        else:
            model = load_toy_clip(_toy_weights_dir(pretrained), device="cpu")
        return _freeze(model.to(dev))

    if str(arch).endswith(".json") and os.path.isfile(arch):
        # A custom architecture as an open_clip model-config file (open_clip's own format).
        open_clip.add_model_config(arch)
        arch = Path(arch).stem
    if arch not in open_clip.list_models():
        raise ValueError(
            f"Unknown CLIP architecture {arch!r}. Use 'toy' or one of open_clip.list_models(), "
            f"e.g. {DEFAULT_ARCH!r}."
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if pretrained is None:
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
    elif os.path.isfile(str(pretrained)):
        try:
            model = open_clip.create_model(arch, pretrained=str(pretrained), device="cpu")
        except Exception as err:  # SafetensorError / UnpicklingError / RuntimeError for a damaged file
            raise ValueError(f"CLIP weights file {pretrained} cannot be loaded for {arch!r} ({type(err).__name__}: "
                             f"{err}); it is truncated, corrupt or of another architecture. Restore it.") from err
    else:
        known = {tag for name, tag in open_clip.list_pretrained() if name == arch}
        if pretrained not in known:
            raise ValueError(
                f"pretrained={pretrained!r} is neither a file nor a known tag for {arch!r}. "
                f"Known tags: {sorted(known)}; or pass a path to local weights."
            )
        try:
            model = open_clip.create_model(
                arch, pretrained=pretrained, device="cpu", cache_dir=str(cache), require_pretrained=True
            )
        except Exception as err:  # network errors come in many types (OSError, HTTPError, HF errors)
            raise RuntimeError(
                f"Could not load CLIP weights {arch}/{pretrained}: {type(err).__name__}: {err}\n"
                f"The weights are fetched once and cached in {cache} (set RECLIP_CACHE to move it). "
                f"On a machine with internet run:\n"
                f"  python -c \"import reclip_core; reclip_core.load_clip('{arch}', '{pretrained}', "
                f"cache_dir='{cache}')\"\n"
                f"and copy {cache} here, or pass pretrained=<path to open_clip_model.safetensors>."
            ) from err
    model.tokenizer = open_clip.get_tokenizer(arch)
    return _freeze(model.to(dev))


def _toy_weights_dir(pretrained: str) -> Optional[Path]:
    if pretrained in ("openai", "biased", "toy"):
        return None  # load_toy_clip's default: the committed, biased-pretrained weights
    committed = Path(__file__).parent / "pretrained" / f"toy_clip_{pretrained}"
    if "/" not in pretrained and committed.is_dir():  # uniform, biased_seed1 (second seed), known
        return committed
    path = Path(pretrained)
    if not path.exists():
        raise FileNotFoundError(
            f"Toy CLIP weights {path} not found. Use pretrained='biased', 'uniform', 'biased_seed1' or 'known' "
            "(committed), or rebuild them with `make toy-clip`."
        )
    return path


__all__ = ("load_clip", "resolve_device", "clip_fingerprint", "default_cache_dir", "DEFAULT_ARCH",
           "DEFAULT_PRETRAINED", "TOY_ARCH")
