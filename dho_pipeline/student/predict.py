"""Classify image files with a trained student, both heads combined with its stored alpha and beta."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import UnidentifiedImageError

from dho_pipeline.data.views import CLEAN_VIEW, ViewRecipe, decode_image, normalize, render_view, view_params
from dho_pipeline.errors import DhoError
from dho_pipeline.runtime import pick_device
from dho_pipeline.student.evaluation import combine
from dho_pipeline.student.from_checkpoint import load_student


class NotAnImage(DhoError, ValueError):
    """A file given to `dho predict` cannot be decoded as an image; the message names it."""


def clean_views(images: list[Path], size: int) -> torch.Tensor:
    """The clean view (centre square, resized to `size`, bicubic) of each image file: uint8 (N, 3, size, size)."""
    batch = []
    for path in images:
        data = Path(path).read_bytes()
        try:
            image = decode_image(data)
        except UnidentifiedImageError:
            raise NotAnImage(f"{path}: not an image (PIL recognises no image format in it)") from None
        except Exception as e:
            raise NotAnImage(f"{path}: cannot decode image: {e}") from None
        box, flip = view_params(ViewRecipe(), 0, CLEAN_VIEW, image.shape[2], image.shape[1])
        batch.append(render_view(image, box, flip, size))
    return torch.stack(batch)


@torch.no_grad()
def predict_files(checkpoint: Path, images: list[Path], top_k: int = 3,
                  device: str = "auto") -> dict[str, list[tuple[str, float]]]:
    """image path -> its top-k (class name, probability) pairs."""
    dev = pick_device(device, "--device")
    student = load_student(checkpoint, dev)
    batch = clean_views(images, student.data.image_size)
    ce, kd = student.model(normalize(batch.to(dev), student.data.mean, student.data.std))
    probs = combine(ce.float(), kd.float(), student.alpha, student.beta).cpu()
    top = probs.topk(min(top_k, probs.shape[1]), dim=-1)
    return {
        str(path): [(student.class_names[i], float(p)) for p, i in zip(top.values[k], top.indices[k], strict=True)]
        for k, path in enumerate(images)
    }
