"""What every reader of image files shares: items by int index, an id per image, RGB loading.

A reader sets ``name``, ``split``, ``root``, ``ids`` (one per image, in order) and ``_images``
(their paths); items are ``{"id", "image"}``, and readers with labels add ``"label"`` on top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, List

import numpy as np
from PIL import Image

from ..transforms import open_image


class ImageFiles:
    """Indexing, iteration and image loading over ``self.ids`` / ``self._images``."""

    name: str
    split: str
    root: Path
    ids: List[str]
    _images: List[Path]

    def __len__(self) -> int:
        return len(self.ids)

    def _index(self, i) -> int:
        """``i`` as a position in ``[0, len)``; negative indices count from the end."""
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"{self.name} items are indexed by int, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} {self.split} of size {n}")
        return int(i) % n

    def image_path(self, i: int) -> Path:
        return self._images[self._index(i)]

    def load_image(self, i: int) -> Image.Image:
        """The image, RGB whatever its mode on disk (16-bit scaled, not clipped; ``open_image``)."""
        return open_image(self.image_path(i))

    def __getitem__(self, i: int) -> dict:
        i = self._index(i)
        return {"id": self.ids[i], "image": self.load_image(i)}

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]
