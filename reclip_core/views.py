"""The label-free training views: augmented images (or cached CLIP features) with their image-level
hypotheses. Training never sees a label: :class:`TrainViews` reads only ``item["id"]`` and
``item["image"]`` and refuses items that carry a ``label`` or ``mask``."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch.utils.data import Dataset

from .transforms import TrainTransform, sample_seed

LABEL_KEYS = ("label", "mask", "labels", "masks", "seg", "gt")


def check_unlabeled(item: Mapping[str, Any]) -> None:
    """Refuse a dataset item that carries a label: the training path must never see one."""
    leaked = [k for k in LABEL_KEYS if k in item]
    if leaked:
        raise ValueError(f"training received an item with {leaked}: training is unsupervised and must only "
                         "get {'id', 'image'} items. Use the dataset's unlabeled train split (train_split).")


class TrainViews(Dataset):
    """Augmented, label-free training views with their image-level hypotheses.

    Item ``i`` at epoch ``e`` → ``{"index": i, "image": [3, crop, crop], "hyp": bool [C]}``; the view
    is drawn with seed ``sample_seed(seed, "aug", e, i)`` (set ``views.epoch`` before each epoch).
    With ``fixed_view=v`` the view does not change with the epoch (seed ``(seed, "view", v, i)``):
    that is what the feature cache stores.
    """

    def __init__(self, dataset: Any, hypotheses: Mapping[str, Sequence[int]], num_classes: int,
                 transform: TrainTransform, seed: int = 0):
        self.dataset = dataset
        self.hypotheses = hypotheses
        self.num_classes = int(num_classes)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.fixed_view: Optional[int] = None

    def __len__(self) -> int:
        return len(self.dataset)

    def view_seed(self, index: int) -> int:
        # A pure function of (seed, epoch or fixed view, index): a resumed or DDP run draws the same view.
        if self.fixed_view is not None:
            return sample_seed(self.seed, "view", self.fixed_view, index)
        return sample_seed(self.seed, "aug", self.epoch, index)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = self.dataset[index]
        check_unlabeled(item)
        image_id = str(item["id"])
        if image_id not in self.hypotheses:
            raise KeyError(f"no hypothesis for image {image_id!r}: compute hypotheses for the training split first "
                           "(`python -m reclip_core hypothesis --config ...`).")
        hyp = torch.zeros(self.num_classes, dtype=torch.bool)
        for c in self.hypotheses[image_id]:
            hyp[int(c)] = True
        return {"index": index, "image": self.transform(item["image"], self.view_seed(index)), "hyp": hyp}


class CachedViews(Dataset):
    """Frozen CLIP features of ``V`` fixed views per image; epoch ``e`` uses view ``e % V``."""

    def __init__(self, feats: torch.Tensor, hyps: torch.Tensor):
        self.feats, self.hyps = feats, hyps  # [V, N, D, h, w] (float16), [N, C] bool
        self.epoch = 0

    def __len__(self) -> int:
        return self.feats.shape[1]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        v = self.epoch % self.feats.shape[0]
        return {"index": index, "feat": self.feats[v, index].float(), "hyp": self.hyps[index]}


__all__ = ("LABEL_KEYS", "check_unlabeled", "TrainViews", "CachedViews")
