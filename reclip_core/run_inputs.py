"""What every command derives from a run config: the class list, the prompt templates, the
dataset reader, and the presence rule (PD) of each model's own heads."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Tuple

from torch import nn

from .clip_loading import load_clip
from .datasets import get_dataset
from .datasets.class_lists import DATASETS, class_names, read_class_file
from .datasets.toyworld_presets import toyworld_class_names
from .planted_bias import plant_bias
from .text import PROMPT_TEMPLATES, validate_class_names


def load_config_clip(cfg: Mapping[str, Any], device: Any) -> nn.Module:
    """The frozen CLIP a config names (``clip.arch``, ``clip.pretrained``), carrying the planted
    bias ``clip.planted_bias`` when it names one (toy CLIP only)."""
    clip_cfg = cfg["clip"]
    planted = clip_cfg.get("planted_bias")
    if planted is not None and clip_cfg["arch"] != "toy":
        raise ValueError(f"clip.planted_bias is a toy-CLIP option (clip.arch 'toy'), not for {clip_cfg['arch']!r}; "
                         "set it to null.")
    clip = load_clip(clip_cfg["arch"], clip_cfg["pretrained"], device=device)
    return clip if planted is None else plant_bias(clip, planted)


def resolve_class_names(cfg: Mapping[str, Any]) -> List[str]:
    """The class list: ``class_names`` (list, dataset name or text file) else ``class_lists.class_names(dataset)``;
    a dataset name reads the ``class_name_set`` list (the project's or the release's), any other
    string is a class-name file (``class_lists.read_class_file``)."""
    cn = cfg.get("class_names")
    source = cfg.get("class_name_set", "project")
    if isinstance(cn, list):
        names = validate_class_names(cn)
    elif isinstance(cn, str) and cn not in DATASETS:
        if not Path(cn).is_file():
            raise ValueError(f"class_names {cn!r} is neither a dataset name ({', '.join(DATASETS)}) nor an existing "
                             "class-name file; pass a file with one class per line (docs/your-images.md).")
        names = read_class_file(cn)
    elif isinstance(cn, str):
        names = class_names(cn, source=source)
    elif cfg["dataset"] == "folder":
        raise ValueError("the folder dataset needs your class names: --set class_names=FILE (one class per line, "
                         "see docs/your-images.md) or a list --set 'class_names=[cat, dog]'.")
    elif cfg["dataset"] == "toyworld" and source == "project":
        names = toyworld_class_names(cfg.get("dataset_kwargs", {}).get("preset", "biased"))
    else:
        names = class_names(cfg["dataset"], source=source)
    if cfg.get("num_classes") is not None and cfg["num_classes"] != len(names):
        raise ValueError(f"num_classes is {cfg['num_classes']} but the class list has {len(names)} names.")
    return names


def resolve_templates(cfg: Mapping[str, Any]) -> List[str]:
    t = cfg["templates"]
    if t == "all":
        return list(PROMPT_TEMPLATES)
    if t == "single":
        return ["a photo of a {}."]
    return list(t)


def build_dataset(cfg: Mapping[str, Any], split: str):
    """The dataset reader for ``split`` (``datasets.get_dataset``)."""
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if cfg["dataset"] == "folder":  # label ids are checked against the class count
        kwargs.setdefault("num_classes", len(resolve_class_names(cfg)))
    return get_dataset(cfg["dataset"], split, root=cfg.get("data_root"), **kwargs)


def presence_rule(cfg: Mapping[str, Any], model: str) -> Tuple[float, float]:
    """(threshold, softmax scale) of the PD on the own heads of ``model`` ("reclip++" or "reclip").

    The release filters ReCLIP++ with softmax(10·logits) against its ``TEST.PD`` but ReCLIP with
    softmax(100·logits) against a threshold of its own (``TEST.ReCLIP_PD``): the two models' logits
    are not on one scale, and ReCLIP++'s rule can drop every class of a ReCLIP model (measured in
    docs/deviations.md). ``reclip_pd_threshold`` / ``reclip_pd_scale`` null apply ReCLIP++'s rule
    (``pd_threshold``, ``pd_scale``) to ReCLIP too.
    """
    threshold, scale = float(cfg["pd_threshold"]), float(cfg.get("pd_scale", 10.0))
    if model == "reclip":
        if cfg.get("reclip_pd_threshold") is not None:
            threshold = float(cfg["reclip_pd_threshold"])
        if cfg.get("reclip_pd_scale") is not None:
            scale = float(cfg["reclip_pd_scale"])
    return threshold, scale
