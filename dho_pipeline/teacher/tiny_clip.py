"""The demo's teacher: a tiny CLIP (`dho-tiny-clip`) pretrained contrastively on Fashion-MNIST with open_clip's loss.

Each image is paired with a caption made from a random prompt template and its class name; the image side
sees the same views the pipeline caches (RandomResizedCrop to 32 px + horizontal flip), normalised with the
OpenAI CLIP mean/std that open_clip applies when the saved state dict is later loaded by model name.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from tqdm import tqdm

from dho_pipeline.atomic_write import atomic_write
from dho_pipeline.student.schedule import make_scheduler
from dho_pipeline.teacher.open_clip_teacher import register_model_configs

MODEL_NAME = "dho-tiny-clip"
RATIO = (3 / 4, 4 / 3)
WARMUP = 0.05  # fraction of all steps
WEIGHT_DECAY = 0.1


def _random_boxes(n: int, side: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for n square images at once: (left, top, w, h) pixels."""
    area = side * side * torch.empty(n, 10).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, 10).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=generator)
    w = torch.round(torch.sqrt(area * torch.exp(log_ratio)))
    h = torch.round(torch.sqrt(area / torch.exp(log_ratio)))
    ok = (w > 0) & (w <= side) & (h > 0) & (h <= side)
    first = ok.int().argmax(dim=1, keepdim=True)  # the first of 10 tries that fits; the whole image if none does
    w = torch.where(ok.any(1), w.gather(1, first)[:, 0], float(side))
    h = torch.where(ok.any(1), h.gather(1, first)[:, 0], float(side))
    left = torch.floor(torch.rand(n, generator=generator) * (side - w + 1))
    top = torch.floor(torch.rand(n, generator=generator) * (side - h + 1))
    return torch.stack([left, top, w, h], dim=1)


def _render(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop `boxes` (left, top, w, h pixels) out of uint8 (N, H, W) images, bicubic to size, flip, normalise RGB."""
    n, height, width = images.shape
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flips, -1.0, 1.0) * boxes[:, 2] / width
    theta[:, 0, 2] = (2 * boxes[:, 0] + boxes[:, 2]) / width - 1
    theta[:, 1, 1] = boxes[:, 3] / height
    theta[:, 1, 2] = (2 * boxes[:, 1] + boxes[:, 3]) / height - 1
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    gray = F.grid_sample(images[:, None].float() / 255, grid, mode="bicubic", padding_mode="border",
                         align_corners=False).clamp(0, 1)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (gray.expand(-1, 3, -1, -1) - mean) / std


def _views(images: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Random views of uint8 (N, H, W) square images: RandomResizedCrop to size + horizontal flip."""
    n, side = images.shape[0], images.shape[-1]
    flips = torch.rand(n, generator=generator) < 0.5
    return _render(images, _random_boxes(n, side, scale, generator), flips, size)


def _clean(images: torch.Tensor, size: int) -> torch.Tensor:
    """The clean view of uint8 (N, H, W) images: the whole image resized to size (bicubic)."""
    n, height, width = images.shape
    boxes = torch.tensor([0.0, 0.0, width, height]).expand(n, 4)
    return _render(images, boxes, torch.zeros(n, dtype=torch.bool), size)


def pretrain_tiny_clip(images: np.ndarray, labels: np.ndarray, class_names: list[str], templates: list[str],
                       out_path: Path, epochs: int = 10, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                       crop_scale: tuple[float, float] = (0.5, 1.0), progress: bool = True) -> Path:
    """Train `dho-tiny-clip` from scratch on uint8 (N, 28, 28) images with ClipLoss; save its state dict."""
    register_model_configs()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = open_clip.create_model(MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    # Every caption is one of len(class_names) * len(templates) strings: encode those once per step and
    # index them per image, which gives the same features and gradients as encoding each image's caption.
    captions = tokenizer([template.format(name) for name in class_names for template in templates])
    pixels = torch.from_numpy(np.array(images, dtype=np.uint8))
    targets = torch.from_numpy(np.array(labels, dtype=np.int64))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    batches = math.ceil(len(pixels) / batch_size)
    scheduler = make_scheduler(optimizer, epochs * batches, WARMUP, "cosine")
    loss_fn = open_clip.ClipLoss()
    model.train()
    with tqdm(total=epochs * batches, desc="pretrain tiny CLIP", disable=not progress) as bar:
        for _ in range(epochs):
            for index in torch.randperm(len(pixels), generator=generator).split(batch_size):
                views = _views(pixels[index], model.visual.image_size, crop_scale, generator)
                picks = torch.randint(len(templates), (len(index),), generator=generator)
                image_features = model.encode_image(views, normalize=True)
                text_features = model.encode_text(captions, normalize=True)[targets[index] * len(templates) + picks]
                loss = loss_fn(image_features, text_features, model.logit_scale.exp())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_path) as tmp:
        torch.save(model.state_dict(), tmp)
    return out_path


@torch.no_grad()
def zero_shot_accuracy(model: torch.nn.Module, tokenizer: object, images: np.ndarray, labels: np.ndarray,
                       class_names: list[str], templates: list[str], batch_size: int = 1024) -> float:
    """Top-1 zero-shot accuracy (eval mode) on clean uint8 (N, H, W) images: logits = 100 * f̂ @ W."""
    model.eval()
    device = next(model.parameters()).device
    classifier = open_clip.build_zero_shot_classifier(model, tokenizer, class_names, templates, device=device)
    pixels = torch.from_numpy(np.array(images, dtype=np.uint8))
    targets = torch.from_numpy(np.array(labels, dtype=np.int64))
    correct = 0
    for start in range(0, len(pixels), batch_size):
        batch = _clean(pixels[start:start + batch_size], model.visual.image_size).to(device)
        logits = 100.0 * model.encode_image(batch, normalize=True) @ classifier
        correct += int((logits.argmax(1).cpu() == targets[start:start + batch_size]).sum())
    return correct / len(pixels)
