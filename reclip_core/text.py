"""Class names and CLIP text embeddings of the classes (method.md §1)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CLASS_NAME_DIR = Path(__file__).parent / "class_names"
DATASETS = ("voc", "context", "ade", "cityscapes", "coco_stuff27", "toyworld")
#: the project's class lists, or the release's exact strings (the benchmarks only)
CLASS_NAME_SOURCES = ("project", "release")

# The five scene templates the release adds to CLIP's 80 ImageNet templates.
SCENE_TEMPLATES = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


def _imagenet_templates() -> tuple:
    # open_clip ships CLIP's 80 ImageNet templates as functions of the class name.
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


PROMPT_TEMPLATES = _imagenet_templates() + SCENE_TEMPLATES


def validate_class_names(names: Sequence[str]) -> List[str]:
    """Return ``names`` as a list, or raise ``ValueError`` saying what is wrong with it."""
    if isinstance(names, str):
        raise ValueError(f"class names must be a list of strings, not one string {names!r}; "
                         "use class_names(dataset) or ['cat', 'dog', ...].")
    names = list(names)
    if not names:
        raise ValueError("the class list is empty; pass at least one class name (see class_names(dataset)).")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"class names must be non-empty strings; got {bad!r}.")
    seen, dups = set(), []
    for n in names:
        if n in seen:
            dups.append(n)
        seen.add(n)
    if dups:
        raise ValueError(f"duplicate class names {sorted(set(dups))}: each class needs a distinct name "
                         "(its text embedding would otherwise be identical).")
    return names


def class_names(dataset: str, source: str = "project") -> List[str]:
    """The class list of a dataset in the release's evaluation order.

    ``source="project"``: the project's names (``class_names/<dataset>.txt``). ``source="release"``:
    the exact strings of the authors' release (``class_names/release/<dataset>.txt``), which differ
    in a few names ("airplane" for "aeroplane", COCO-Stuff's "food things"...). The Reference prompt
    tokenizes the names and the text features encode them, so a released checkpoint only means
    what it was trained for with these strings.
    """
    if source not in CLASS_NAME_SOURCES:
        raise ValueError(f"unknown class-name source {source!r}; valid: {', '.join(CLASS_NAME_SOURCES)}.")
    if dataset == "toyworld" and source == "project":
        from .datasets.toyworld import toyworld_class_names

        return toyworld_class_names()
    folder = CLASS_NAME_DIR if source == "project" else CLASS_NAME_DIR / "release"
    path = folder / f"{dataset}.txt"
    if dataset not in DATASETS or not path.is_file():
        if source == "project":
            raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}.")
        valid = ", ".join(sorted(p.stem for p in folder.glob("*.txt")))
        raise ValueError(f"the release has no class list for {dataset!r}; release lists: {valid}.")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return validate_class_names([ln for ln in lines if ln and not ln.startswith("#")])


def tokenize(clip: nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """Token ids [N, context_length] with the model's own tokenizer (``clip.tokenizer``)."""
    tokenizer = getattr(clip, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("this CLIP has no tokenizer attached; load it with reclip_core.load_clip().")
    return tokenizer(list(texts))


@torch.no_grad()
def text_embeddings(
    clip: nn.Module,
    names: Sequence[str],
    templates: Sequence[str] = PROMPT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """Class text features [C, D]: each name in every template, encoded, L2-normalised,
    averaged over templates and L2-normalised again."""
    names = validate_class_names(names)
    templates = list(templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("templates must be a non-empty list of strings containing '{}'.")
    device = clip.token_embedding.weight.device
    prompts = [t.format(n) for n in names for t in templates]
    feats = []
    for i in range(0, len(prompts), batch_size):
        tokens = tokenize(clip, prompts[i:i + batch_size]).to(device)
        feats.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))
    feats = torch.cat(feats).view(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(feats, dim=-1)


__all__ = ("PROMPT_TEMPLATES", "SCENE_TEMPLATES", "DATASETS", "CLASS_NAME_SOURCES", "class_names", "text_embeddings",
           "validate_class_names", "tokenize")
