"""``clip.arch: auto``: the paper's CLIP when its weights are already on this machine, else the
toy CLIP — so a folder of your images runs offline out of the box, and on OpenAI's ViT-B/16 once
its weights were fetched (``load_clip`` caches them in ``$RECLIP_CACHE/clip``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

from huggingface_hub import try_to_load_from_cache
from open_clip import pretrained as oc_pretrained
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from .clip_loading import DEFAULT_ARCH, DEFAULT_PRETRAINED, TOY_ARCH, default_cache_dir

AUTO_ARCH = "auto"
#: the toy CLIP ``auto`` falls back to: the toy world's default weights
TOY_CHOICE = (TOY_ARCH, "biased")


def cached_weights(arch: str, pretrained: str, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
    """The local file of open_clip's ``arch``/``pretrained`` weights when ``load_clip`` would find it
    without a download (the Hugging Face hub layout open_clip fetches into, or a direct URL's file
    in the cache folder); None otherwise. Nothing is fetched."""
    cfg = oc_pretrained.get_pretrained_cfg(arch, pretrained)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_id, filename = os.path.split(cfg.get("hf_hub", ""))
    if model_id:
        # open_clip tries the safetensors file first, then the pickled one
        for name in [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]:
            found = try_to_load_from_cache(model_id, name, cache_dir=str(cache))
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    url = cfg.get("url", "")
    return cache / os.path.basename(url) if url and (cache / os.path.basename(url)).is_file() else None


def resolve_auto_clip(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Tuple[str, str]:
    """(arch, pretrained) that ``clip.arch: auto`` stands for on this machine."""
    if cached_weights(DEFAULT_ARCH, DEFAULT_PRETRAINED, cache_dir) is not None:
        return DEFAULT_ARCH, DEFAULT_PRETRAINED
    return TOY_CHOICE


__all__ = ("AUTO_ARCH", "TOY_CHOICE", "cached_weights", "resolve_auto_clip")
