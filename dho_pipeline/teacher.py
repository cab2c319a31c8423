"""The open_clip teacher: loading by (model, pretrained), its preprocessing, and the zero-shot head."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import open_clip
import torch
import torch.nn.functional as F

from dho_pipeline.config import TeacherConfig
from dho_pipeline.shards import sha256_file
from dho_pipeline.templates import resolve_templates

if TYPE_CHECKING:
    from dho_pipeline.tip_adapter import TipAdapter

BUILTIN_MODEL_CONFIGS = Path(__file__).parent / "model_configs"
LOGIT_SCALE = 100.0


def register_model_configs(extra_dir: Path | None = None) -> None:
    """Make dho's own open_clip model configs (and the user's folder, if any) known to open_clip.

    Must run before `open_clip.get_tokenizer(name)`, which otherwise falls back to context length 77.
    """
    for folder in (BUILTIN_MODEL_CONFIGS, extra_dir):
        if folder is not None:
            open_clip.add_model_config(Path(folder))


@dataclass
class Teacher:
    """A CLIP image tower with its class weights: logits = 100 * normalise(f(x)) @ W."""

    model: torch.nn.Module
    tokenizer: object
    classifier: torch.Tensor  # (D, C), columns L2-normalised
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: dict
    adapter: TipAdapter | None = None  # a fitted few-shot cache model: logits = adapter.logits(features, W)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features of normalised float images (N, 3, S, S)."""
        return F.normalize(self.model.encode_image(images).float(), dim=-1)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits: zero-shot, or through the few-shot adapter when one is attached."""
        return self.head(self.features(images))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None:
            return self.adapter.logits(features, self.classifier)
        return self.zero_shot(features)

    def zero_shot(self, features: torch.Tensor) -> torch.Tensor:
        return LOGIT_SCALE * features @ self.classifier


def resolve_pretrained(pretrained: str | None, base: Path) -> tuple[str | None, str | None]:
    """(value for open_clip, sha256 of the file) where `pretrained` names a local file, else (tag, None)."""
    if pretrained is None:
        return None, None
    path = Path(pretrained).expanduser()
    path = path if path.is_absolute() else base / path
    if path.is_file():
        return str(path), sha256_file(path)
    if any(sep in pretrained for sep in ("/", "\\")) or pretrained.endswith((".pt", ".bin", ".safetensors")):
        raise FileNotFoundError(f"teacher.pretrained: checkpoint file {path} not found")
    return pretrained, None


def load_teacher(cfg: TeacherConfig, class_names: list[str], device: torch.device, base: Path = Path(".")) -> Teacher:
    """Build the teacher from (model, pretrained) and its zero-shot head from the class names and templates."""
    register_model_configs(base / cfg.model_config_dir if cfg.model_config_dir else None)
    if open_clip.get_model_config(cfg.model) is None and not cfg.model.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"teacher.model: unknown open_clip model {cfg.model!r}; "
                         "add its JSON config folder as teacher.model_config_dir")
    pretrained, checkpoint_sha = resolve_pretrained(cfg.pretrained, base)
    with _quiet_open_clip():
        model = open_clip.create_model(
            cfg.model, pretrained=pretrained, device=device, force_quick_gelu=cfg.quick_gelu,
            force_image_size=cfg.image_size,
        )
    model.eval()
    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess["size"]
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(cfg.image_mean or preprocess["mean"])
    std = tuple(cfg.image_std or preprocess["std"])
    tokenizer = open_clip.get_tokenizer(cfg.model)
    templates = resolve_templates(cfg.templates, cfg.extra_templates)
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(
            model, tokenizer, class_names, templates, num_classes_per_batch=10, device=device
        ).float()
    fingerprint = {
        "model": cfg.model,
        "pretrained": Path(pretrained).name if checkpoint_sha else pretrained,
        "checkpoint_sha256": checkpoint_sha,
        "image_size": size,
        "image_mean": list(mean),
        "image_std": list(std),
        "quick_gelu": cfg.quick_gelu,
        "templates": templates,
        "head": "zero-shot",
        "logit_scale": LOGIT_SCALE,
    }
    return Teacher(model, tokenizer, classifier, size, mean, std, fingerprint)


class _quiet_open_clip:
    """Silence open_clip's 'no pretrained weights' warning: a random teacher is a deliberate choice here."""

    def __enter__(self) -> None:
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().setLevel(self.level)
