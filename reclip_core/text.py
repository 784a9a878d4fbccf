"""Class names and CLIP text embeddings of the classes (method.md §1)."""
from __future__ import annotations

import warnings
from typing import List, Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

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


def tokenize(clip: nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """Token ids [N, context_length] with the model's own tokenizer (``clip.tokenizer``)."""
    tokenizer = getattr(clip, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("this CLIP has no tokenizer attached; load it with reclip_core.load_clip().")
    return tokenizer(list(texts))


SYNONYM_SEPARATOR = ","


def synonyms(name: str) -> List[str]:
    """The prompt names of one class: ``"person, people"`` → ``["person", "people"]``.

    A comma inside a class name separates synonyms whose text features are averaged (class-name
    files of your own folder, docs/your-images.md). A name without a comma is returned unchanged
    (not even stripped), so the shipped lists give exactly the prompts they always gave."""
    if SYNONYM_SEPARATOR not in name:
        return [name]
    parts = [s.strip() for s in name.split(SYNONYM_SEPARATOR)]
    if not all(parts):
        raise ValueError(f"class name {name!r} has an empty synonym; write synonyms as 'person, people'.")
    return parts


def display_name(name: str) -> str:
    """The first synonym: what legends show and what the Reference prompt tokenizes."""
    return synonyms(name)[0]


def check_distinct_tokens(clip: nn.Module, names: Sequence[str], words: Sequence[Sequence[str]],
                          tokens: torch.Tensor) -> None:
    """Refuse class names whose prompts tokenize identically (``tokens``: [synonyms, templates, L]).

    Why: words outside a tokenizer's vocabulary (the toy CLIP's is a few dozen words) all read as
    ``<unk>``, and names longer than the text context are cut off, so different names can give the
    same text feature and one class silently wins everywhere. A name with only some unknown words
    still differs from the others, but its feature ignores those words: that is warned about."""
    unk = getattr(getattr(clip, "tokenizer", None), "unk_token_id", None)
    seen: dict = {}
    start = 0
    for name, ws in zip(names, words):
        key = tokens[start:start + len(ws)].numpy().tobytes()
        start += len(ws)
        if key in seen:
            lost = [n for n in (seen[key], name) if unk is not None and bool((tokenize(clip, [n]) == unk).any())]
            why = (f"the words of {lost} are unknown to this CLIP's tokenizer (each reads as <unk>)" if lost else
                   f"the prompts are cut off at the text context of {tokens.shape[-1]} tokens")
            raise ValueError(f"class names {seen[key]!r} and {name!r} tokenize to the same tokens ({why}), so they "
                             "would get the same text feature. Use names this CLIP knows (for the toy CLIP: the words "
                             "of its vocabulary, e.g. 'red circle'), or shorter ones.")
        seen[key] = name
        if unk is not None and bool((tokenize(clip, ws) == unk).any()):  # per synonym: a comma is no word
            warnings.warn(f"class name {name!r} has words unknown to this CLIP's tokenizer (read as <unk>); its text "
                          "feature ignores them.", stacklevel=3)


@torch.no_grad()
def text_embeddings(
    clip: nn.Module,
    names: Sequence[str],
    templates: Sequence[str] = PROMPT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """Class text features [C, D]: each name in every template, encoded, L2-normalised,
    averaged over templates and L2-normalised again. A name with comma-separated synonyms
    (:func:`synonyms`) averages every synonym in every template before the last normalisation."""
    names = validate_class_names(names)
    templates = list(templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("templates must be a non-empty list of strings containing '{}'.")
    device = clip.token_embedding.weight.device
    words = [synonyms(n) for n in names]
    flat = [w for ws in words for w in ws]
    prompts = [t.format(w) for w in flat for t in templates]
    all_tokens = tokenize(clip, prompts)
    check_distinct_tokens(clip, names, words, all_tokens.view(len(flat), len(templates), -1))
    feats = []
    for i in range(0, len(prompts), batch_size):
        tokens = all_tokens[i:i + batch_size].to(device)
        feats.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))
    feats = torch.cat(feats).view(len(flat), len(templates), -1).mean(dim=1)
    if len(flat) != len(names):  # some class has synonyms: average them (equal weight per synonym)
        owner = torch.tensor([c for c, ws in enumerate(words) for _ in ws], device=feats.device)
        feats = torch.zeros(len(names), feats.shape[1], device=feats.device).index_add_(0, owner, feats)
        feats = feats / torch.tensor([len(ws) for ws in words], device=feats.device).unsqueeze(1)
    return F.normalize(feats, dim=-1)


__all__ = ("PROMPT_TEMPLATES", "SCENE_TEMPLATES", "text_embeddings", "validate_class_names", "tokenize",
           "check_distinct_tokens", "synonyms", "display_name")
