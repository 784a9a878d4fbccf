"""Image preprocessing: label-free training views, evaluation resize, hypothesis windows.

Training views follow method.md §3 (random rescale of the (long, short) base scale by a ratio in
``scale_range`` keeping the aspect ratio, random crop, horizontal flip, photometric distortion,
CLIP normalisation, zero padding to the crop) with torchvision transforms v2. The release chooses
crops with the ground-truth mask (mmseg's ``cat_max_ratio``); here the crop is uniform and the
transform never receives a mask, so no label can leak.

Randomness: a view is a pure function of ``(seed, epoch, index)`` (:func:`sample_seed`), drawn
inside ``torch.random.fork_rng``. This is what makes training reproducible independently of the
number of DataLoader workers, of DDP ranks, and of where a resumed run restarts.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .backbone import CLIP_MEAN, CLIP_STD
from .image_limits import allow_in_pil, check_pixels, exif_upright
from .options import TEST_RESIZES, WINDOW_RESIZES

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]


def sample_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (``seed, "aug", epoch, index``): stable across processes and
    Python runs (unlike ``hash()``)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image → an 8-bit RGB PIL image, or ``ValueError`` saying how to convert it.

    Greyscale (``L``, ``1``) is replicated to three channels; the alpha channel of ``RGBA``/``LA``
    and of palette images with transparency is dropped; 16-bit greyscale (``I;16*``, and ``I`` with
    values in 0..65535, how 16-bit PNGs open) is scaled to 8 bits (× 255/65535) instead of being
    clipped to white by ``Image.convert``. Floating-point images (``F``) are refused: their range is
    unknown.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(image)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"a 32-bit integer image (mode {mode}) with values outside 0..65535 cannot be read as "
                             "an RGB image; scale it to 8 bits and save it as an RGB or greyscale PNG/JPEG.")
        a8 = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode == "F":
        raise ValueError("a floating-point image (mode F) has no known value range; scale it to 0..255 and "
                         "convert it to 8-bit ('L' or 'RGB') before segmenting it.")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL's documented route (some versions warn on a direct P -> RGB)
    return image.convert("RGB")


def open_image(path) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image (:func:`to_rgb`).

    A corrupt, truncated or non-image file raises ``ValueError`` naming the file (PIL's own errors
    do not say which file); a missing one raises ``FileNotFoundError``. Images above the pixel limit
    are refused and the EXIF orientation is applied (:mod:`reclip_core.image_limits`)."""
    allow_in_pil()
    try:
        with Image.open(path) as im:
            check_pixels(im, path)  # before decoding: a tiny file can declare a huge canvas
            im.load()
            return to_rgb(exif_upright(im))
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist.") from None
    except PermissionError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: the file is corrupt, truncated or not an image "
                         f"({type(err).__name__}: {err}). Replace it with a good copy.") from err


def _check_range(x: torch.Tensor, what: str) -> torch.Tensor:
    """uint8 passes; uint16 is scaled to 8 bits; other integers must lie in 0..255 and floats in [0, 1]."""
    if x.dtype == torch.uint8:
        return x
    if x.dtype == torch.uint16:
        return ((x.to(torch.int64) * 255 + 32767) // 65535).to(torch.uint8)
    if x.dtype == torch.bool:
        raise ValueError(f"{what} is boolean; pass a uint8 image (0..255) or a float image in [0, 1].")
    if x.numel() == 0:
        return x
    lo, hi = float(x.min()), float(x.max())
    if x.is_floating_point():
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 1:
            raise ValueError(f"{what} is floating point with values in [{lo:g}, {hi:g}]; float images must lie in "
                             "[0, 1] (divide 8-bit values by 255) or be passed as uint8.")
        return x
    if lo < 0 or hi > 255:
        raise ValueError(f"{what} has integer values in [{lo:g}, {hi:g}]; pass 8-bit values (0..255) as uint8 "
                         "(16-bit images as uint16, which are scaled to 8 bits).")
    return x


def to_image_tensor(image: ImageLike) -> torch.Tensor:
    """PIL / H×W(×1|3|4) array / [1|3, H, W] tensor → uint8-or-float [3, H, W] tensor (RGB).

    Greyscale is replicated to RGB, an alpha channel is dropped, 16-bit data is scaled to 8 bits
    (:func:`to_rgb`); values outside 0..255 (integers) or [0, 1] (floats) raise ``ValueError``.
    """
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(f"a numpy image must be H x W x 3 (RGB), H x W x 4 (RGBA) or H x W (greyscale), "
                             f"got shape {image.shape}.")
        t = torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1)
        t = _check_range(t, "the numpy image")
        return t.repeat(3, 1, 1) if t.shape[0] == 1 else t
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be [3, H, W] (or [1, H, W] greyscale), got {tuple(image.shape)}.")
        t = _check_range(image, "the image tensor")
        return t.repeat(3, 1, 1) if t.shape[0] == 1 else t
    raise ValueError(f"unsupported image type {type(image).__name__}; pass a PIL image, an HxWx3 array or a tensor.")


def keep_ratio_size(h: int, w: int, long_side: float, short_side: float) -> Tuple[int, int]:
    """mmseg ``Resize(keep_ratio=True)``: scale so that the long side <= ``long_side`` and the short
    side <= ``short_side``, with one of them reached exactly → (new_h, new_w)."""
    factor = min(long_side / max(h, w), short_side / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float [.., 3, H, W] → CLIP-normalised float32."""
    x = x.float() / 255.0 if not x.is_floating_point() else x.float()
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


class RandomRescale:
    """Resize keeping ratio to ``ratio * (long, short)`` with ratio ~ U(scale_range) (mmseg
    ``RandomResize(scale, ratio_range, keep_ratio=True)``). Draws from the global torch RNG, which
    :class:`TrainTransform` seeds per sample."""

    def __init__(self, scale: Tuple[int, int], ratio_range: Tuple[float, float]):
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        lo, hi = self.ratio_range
        ratio = lo + (hi - lo) * float(torch.rand(()))
        h, w = img.shape[-2:]
        size = keep_ratio_size(h, w, self.scale[0] * ratio, self.scale[1] * ratio)
        return TF.resize(img, list(size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


class RandomCropNoPad:
    """Uniform random crop of at most ``size`` × ``size`` (smaller images are kept whole; padding
    happens after normalisation, as in mmseg)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        ch, cw = min(self.size, h), min(self.size, w)
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return img[..., top:top + ch, left:left + cw]


class TrainTransform:
    """Label-free training view: image → CLIP-normalised float tensor [3, crop, crop].

    ``transform(image, seed)`` is deterministic in ``seed``. It accepts only an image — there is
    no argument through which a mask could enter.
    """

    def __init__(self, crop: int, scale: Tuple[int, int], ratio_range: Sequence[float] = (0.5, 2.0),
                 flip: bool = True, photometric: bool = True):
        self.crop = int(crop)
        # Everything a view depends on besides its seed (the feature cache's key includes it).
        self.settings = {"crop": self.crop, "scale": [float(v) for v in scale],
                         "ratio_range": [float(v) for v in ratio_range], "flip": bool(flip),
                         "photometric": bool(photometric)}
        steps = [RandomRescale(tuple(scale), tuple(ratio_range)), RandomCropNoPad(self.crop)]
        if flip:
            steps.append(v2.RandomHorizontalFlip(p=0.5))
        if photometric:
            # SSD-style distortion, the same family as mmseg's PhotoMetricDistortion
            # (brightness, contrast, saturation, hue, each applied with probability 1/2).
            steps.append(v2.RandomPhotometricDistort(p=0.5))
        self.pipeline = v2.Compose(steps)

    def __call__(self, image: ImageLike, seed: int) -> torch.Tensor:
        img = to_image_tensor(image)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
            torch.manual_seed(seed)
            img = self.pipeline(img)
        x = normalize(img)
        pad_h, pad_w = self.crop - x.shape[-2], self.crop - x.shape[-1]
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, (0, max(0, pad_w), 0, max(0, pad_h)))  # zeros = the mean colour
        return x


def train_transform_from_config(cfg) -> TrainTransform:
    scale = cfg["train_scale"] or [cfg["max_long_side"], cfg["crop"]]
    return TrainTransform(cfg["crop"], (scale[0], scale[1]), cfg["scale_range"], cfg["flip"], cfg["photometric"])




def linear_resize(img: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """OpenCV's ``INTER_LINEAR`` (the release's test resize) written with torch: bilinear with
    half-pixel centres and edge clamping, no antialiasing; a uint8 image is rounded back to uint8
    (OpenCV rounds fixed-point weights, so the two differ by at most one grey level). A float image
    has no grey levels to round to and stays float."""
    x = F.interpolate(img.float()[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=False)[0]
    return x.round().clamp(0, 255).to(torch.uint8) if img.dtype == torch.uint8 else x


def eval_preprocess(image: ImageLike, test_size: int, max_long_side: int = 2048, resize: str = "torch") -> torch.Tensor:
    """Evaluation input: resize keeping ratio so the short side is ``test_size`` (long side at most
    ``max_long_side``), CLIP-normalise → [1, 3, H', W'] float32. ``resize="torch"``: torch's
    bilinear with antialiasing; ``"release"``: :func:`linear_resize` on the 8-bit image."""
    if resize not in TEST_RESIZES:
        raise ValueError(f"resize must be one of {TEST_RESIZES}, got {resize!r}.")
    img = to_image_tensor(image)
    h, w = img.shape[-2:]
    size = keep_ratio_size(h, w, max_long_side, test_size)
    if size != (h, w):
        if resize == "release":
            img = linear_resize(img, size)
        else:
            img = TF.resize(img, list(size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    return normalize(img).unsqueeze(0)


def window_boxes(h: int, w: int, window: int, stride: int, tiling: str = "fit") -> list:
    """Top-left corners (y, x), row by row, of the square windows of side ``window`` and step
    ``stride`` over an h × w image.

    ``tiling="fit"``: every window that fits, including one ending exactly at the bottom or right
    edge; an image smaller than the window yields one window at (0, 0) (clipped). ``"release"``:
    the authors' grid, starts strictly below h − window and w − window, so a window that would end
    at the edge is not taken and an image no larger than the window has none (its hypothesis is
    empty).
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window and stride must be positive, got {window} and {stride}.")
    if tiling == "release":
        # y ∈ {0, s, 2s, ...} with y < H − w (and the same for x)
        ys, xs = range(0, h - window, stride), range(0, w - window, stride)
    elif tiling == "fit":
        # y ∈ {0, s, 2s, ...} with y ≤ max(H − w, 0)
        ys, xs = range(0, max(h - window, 0) + 1, stride), range(0, max(w - window, 0) + 1, stride)
    else:
        raise ValueError(f"tiling must be 'fit' or 'release', got {tiling!r}.")
    return [(y, x) for y in ys for x in xs]




def _pil_bicubic(crops: torch.Tensor, input_size: int) -> torch.Tensor:
    """uint8 [N, 3, s, s] → float [N, 3, S, S] in [0, 1] through PIL's bicubic resize, as CLIP's own
    preprocessing (``Resize(S, BICUBIC)`` of a PIL image, then ``ToTensor``) treats each window."""
    out = []
    for c in crops:
        pil = Image.fromarray(c.permute(1, 2, 0).contiguous().numpy(), "RGB")
        pil = pil.resize((input_size, input_size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255.0


def crop_windows(image: ImageLike, boxes: Sequence[Tuple[int, int]], window: int, input_size: int,
                 resize: str = "torch") -> torch.Tensor:
    """Square crops of side ``window`` at ``boxes`` (top-left corners), each resized to
    ``input_size`` (bicubic, like CLIP's preprocessing; a square window needs no centre crop) and
    CLIP-normalised → [N, 3, input_size, input_size].

    ``resize="torch"``: torch's bicubic with antialias on the float crops. ``"release"``: PIL's
    bicubic on the uint8 crops, which is what CLIP's own preprocessing does to the release's PIL
    windows (PIL computes on 8-bit values and rounds its output to them; a float image is first
    quantised to 8 bits, as the release reads 8-bit files)."""
    if resize not in WINDOW_RESIZES:
        raise ValueError(f"resize must be one of {WINDOW_RESIZES}, got {resize!r}.")
    img = to_image_tensor(image)
    crops = [img[:, y:y + window, x:x + window] for y, x in boxes]
    side = min(min(c.shape[-2:]) for c in crops)  # < window only when the image is smaller
    crops = torch.stack([TF.center_crop(c, [side, side]) for c in crops])
    if resize == "release":
        if crops.is_floating_point():
            crops = (crops * 255.0).round().clamp(0, 255)
        return normalize(_pil_bicubic(crops.to(torch.uint8).cpu(), input_size))
    crops = crops.float() / 255.0 if not crops.is_floating_point() else crops.float()
    crops = TF.resize(crops, [input_size, input_size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return normalize(crops.clamp(0, 1))


def window_batch(image: ImageLike, window: int, stride: int, input_size: int, resize: str = "torch") -> torch.Tensor:
    """All windows of one image (:func:`window_boxes`) → [N, 3, input_size, input_size]."""
    img = to_image_tensor(image)
    return crop_windows(img, window_boxes(img.shape[-2], img.shape[-1], window, stride), window, input_size, resize)


def clip_preprocess(image: ImageLike, input_size: int) -> torch.Tensor:
    """CLIP's own preprocessing (resize short side, centre crop, normalise) → [1, 3, S, S]."""
    img = to_image_tensor(image)
    img = TF.resize(img, [input_size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    img = TF.center_crop(img, [input_size, input_size])
    return normalize(img).unsqueeze(0)


def clip_input_size(clip: torch.nn.Module) -> int:
    """The image side the CLIP was pretrained at (224 for ViT-B/16, 64 for the toy CLIP)."""
    size = clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


__all__ = ("TrainTransform", "train_transform_from_config", "eval_preprocess", "window_boxes", "window_batch", "crop_windows",
           "WINDOW_RESIZES", "linear_resize", "TEST_RESIZES",
           "clip_preprocess", "clip_input_size", "keep_ratio_size", "sample_seed", "to_image_tensor", "to_rgb", "open_image", "normalize")
