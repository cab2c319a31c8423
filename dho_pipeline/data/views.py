"""Augmented views: sample a crop box + flip per (row, view) from a seed, and replay it on any image.

View 0 is the clean view (the centre square, as Resize + CenterCrop would take it); views 1..K are
RandomResizedCrop boxes (torchvision's algorithm) with a flip bit. Boxes are stored as fractions of
the image (x0, y0, w, h) so stage two can replay the exact crop and resize it to the student's size.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

CLEAN_VIEW = 0


@dataclass(frozen=True)
class ViewRecipe:
    """How random views are drawn: K views per image, RandomResizedCrop scale/ratio, flip, seed."""

    count: int = 8
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    seed: int = 0


# how each format's files begin: a file that begins so, yet PIL cannot identify, is a damaged one of them
FORMAT_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF8": "GIF", b"BM": "BMP",
                     b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def unidentified(data: bytes) -> str:
    """Why PIL could not identify `data`, in words: a damaged JPEG (PNG, ...) by its signature, else no image."""
    kind = next((name for magic, name in FORMAT_SIGNATURES.items() if data.startswith(magic)), None)
    if kind is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "WebP"
    if kind:
        return f"a damaged {kind} (it begins as one, but PIL cannot read its header)"
    return f"not an image in any format PIL reads (it begins {data[:16]!r})"


def decode_image(data: bytes) -> torch.Tensor:
    """Decode image bytes to an RGB uint8 tensor (3, H, W); bytes of no image format raise ValueError."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError(unidentified(data)) from None
    with img:
        if img.mode.startswith("I"):  # 16-bit grey (I;16, or I from older PIL): convert("RGB") would clip it white
            grey = (np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
            rgb = np.repeat(grey[..., None], 3, axis=2)
        else:
            rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _random_resized_box(rng: np.random.Generator, width: int, height: int, recipe: ViewRecipe) -> tuple[int, ...]:
    """torchvision's RandomResizedCrop.get_params, driven by a numpy generator: (left, top, w, h) pixels."""
    area = width * height
    log_ratio = (math.log(recipe.ratio[0]), math.log(recipe.ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(recipe.scale[0], recipe.scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < recipe.ratio[0]:
        w, h = width, int(round(width / recipe.ratio[0]))
    elif in_ratio > recipe.ratio[1]:
        w, h = int(round(height * recipe.ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def view_params(recipe: ViewRecipe, row: int, view: int, width: int, height: int) -> tuple[np.ndarray, bool]:
    """The crop box (fractions x0, y0, w, h) and flip bit of view `view` of row `row`; seeded, pure."""
    if view == CLEAN_VIEW:
        side = min(width, height)
        box = ((width - side) // 2, (height - side) // 2, side, side)
        flip = False
    else:
        rng = np.random.default_rng([recipe.seed, row, view])
        box = _random_resized_box(rng, width, height, recipe)
        flip = recipe.flip and bool(rng.random() < 0.5)
    frac = np.array([box[0] / width, box[1] / height, box[2] / width, box[3] / height], dtype=np.float32)
    return frac, flip


def pixel_box(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """A box of fractions (x0, y0, w, h) as whole pixels (left, top, w, h) of a width x height image."""
    left, top = round(float(box[0]) * width), round(float(box[1]) * height)
    return left, top, max(1, round(float(box[2]) * width)), max(1, round(float(box[3]) * height))


def render_view(image: torch.Tensor, box: np.ndarray, flip: bool, size: int) -> torch.Tensor:
    """Crop `box` (fractions) out of a uint8 (3, H, W) image, resize to size x size (bicubic), flip."""
    _, height, width = image.shape
    left, top, w, h = pixel_box(box, width, height)
    out = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC,
                          antialias=True)
    return TF.horizontal_flip(out) if flip else out


def normalize(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, 3, H, W) on any device -> float, scaled to [0, 1] and normalised per channel."""
    mean_t = torch.tensor(mean, device=batch.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=batch.device).view(1, -1, 1, 1)
    return (batch.float() / 255.0 - mean_t) / std_t
