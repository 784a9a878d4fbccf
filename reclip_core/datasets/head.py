"""The first ``n`` items of a dataset: how ``max_train_images`` / ``max_val_images`` cut a split."""
from __future__ import annotations


class Head:
    """The first ``n`` items of a dataset (``max_train_images`` / ``max_val_images``); keeps the
    reader's ``ids`` so resumable passes can skip done items without decoding them."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, min(int(n), len(dataset))
        ids = getattr(dataset, "ids", None)
        if ids is not None:
            self.ids = ids[:self.n]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[i]
