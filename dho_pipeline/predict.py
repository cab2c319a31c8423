"""Classify image files with a trained student, both heads combined with its stored alpha and beta."""

from __future__ import annotations

from pathlib import Path

import torch

from dho_pipeline.evaluation import combine
from dho_pipeline.runtime import pick_device
from dho_pipeline.student_checkpoint import load_student
from dho_pipeline.views import CLEAN_VIEW, ViewRecipe, decode_image, normalize, render_view, view_params


@torch.no_grad()
def predict_files(checkpoint: Path, images: list[Path], top_k: int = 3,
                  device: str = "auto") -> dict[str, list[tuple[str, float]]]:
    """image path -> its top-k (class name, probability) pairs."""
    dev = pick_device(device)
    student = load_student(checkpoint, dev)
    size = student.data.image_size
    batch = []
    for path in images:
        try:
            image = decode_image(Path(path).read_bytes())
        except Exception as e:
            raise ValueError(f"{path}: cannot decode image: {e}") from None
        box, flip = view_params(ViewRecipe(), 0, CLEAN_VIEW, image.shape[2], image.shape[1])
        batch.append(render_view(image, box, flip, size))
    ce, kd = student.model(normalize(torch.stack(batch).to(dev), student.data.mean, student.data.std))
    probs = combine(ce.float(), kd.float(), student.alpha, student.beta).cpu()
    top = probs.topk(min(top_k, probs.shape[1]), dim=-1)
    return {
        str(path): [(student.class_names[i], float(p)) for p, i in zip(top.values[k], top.indices[k], strict=True)]
        for k, path in enumerate(images)
    }
