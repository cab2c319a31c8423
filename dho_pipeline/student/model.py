"""The dual-head student: a timm (or open_clip visual) backbone with a CE head and a KD head."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import open_clip
import timm
import torch
import torch.nn.functional as F
from torch import nn

from dho_pipeline.config import ConfigError, StudentConfig
from dho_pipeline.errors import one_line, state_dict_problem
from dho_pipeline.teacher.open_clip_teacher import LOGIT_SCALE, register_model_configs
from dho_pipeline.teacher.templates import resolve_templates


@dataclass(frozen=True)
class StudentData:
    """The student's input: square size and normalisation constants."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class DualHeadStudent(nn.Module):
    """z = f(x); ce = h_ce(z); kd = h_kd(z), or 100 * h_kd(normalise(z)) when `kd_on_normalized`."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, kd_on_normalized: bool = False):
        super().__init__()
        self.backbone = backbone
        self.ce_head = nn.Linear(feature_dim, num_classes)
        self.kd_head = nn.Linear(feature_dim, num_classes, bias=not kd_on_normalized)
        self.kd_on_normalized = kd_on_normalized

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.backbone(images)
        if self.kd_on_normalized:
            return self.ce_head(z), LOGIT_SCALE * self.kd_head(F.normalize(z, dim=-1))
        return self.ce_head(z), self.kd_head(z)


def _unknown_model(name: str, known: list[str], library: str) -> ConfigError:
    """The error for a model name `library` does not know, naming close matches."""
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"student.model: unknown {library} model {name!r}{hint}")


def check_student_config(cfg: StudentConfig, base: Path = Path(".")) -> None:
    """Refuse an unknown model or a missing weights file: cheap, before anything is built or written."""
    if cfg.kind == "open_clip":
        register_model_configs()
        if open_clip.get_model_config(cfg.model) is None and not cfg.model.startswith(("hf-hub:", "local-dir:")):
            raise _unknown_model(cfg.model, open_clip.list_models(), "open_clip")
    elif timm.models.parse_model_name(cfg.model)[0] is None and not timm.is_model(cfg.model):
        raise _unknown_model(cfg.model, timm.list_models(), "timm")
    if cfg.pretrained_file and not (base / cfg.pretrained_file).is_file():
        raise FileNotFoundError(f"student.pretrained_file: {base / cfg.pretrained_file} not found")


def _timm_student(cfg: StudentConfig, num_classes: int, base: Path) -> tuple[DualHeadStudent, StudentData]:
    backbone = timm.create_model(cfg.model, pretrained=False, num_classes=0)
    if cfg.pretrained_file:
        load_backbone_weights(backbone, base / cfg.pretrained_file, cfg.model)
    data = timm.data.resolve_model_data_config(backbone)
    size = cfg.image_size or int(data["input_size"][-1])
    student = DualHeadStudent(backbone, backbone.num_features, num_classes)
    return student, StudentData(size, tuple(cfg.image_mean or data["mean"]), tuple(cfg.image_std or data["std"]))


def load_backbone_weights(backbone: nn.Module, weights: Path, model: str) -> None:
    """Load a timm weights file (.safetensors, or torch.save of a state dict) into a classifier-less backbone.

    Every backbone weight must come from the file at its shape; only the file's classifier head may be left over.
    timm's own pretrained loading is lenient once the classifier is dropped, and would train a file of another
    model from random init with no more than a logged warning.
    """
    try:
        state = timm.models.load_state_dict(str(weights))  # weights only: loading runs no code
    except Exception as e:
        raise ConfigError(f"student.pretrained_file: {weights} is no weights file timm reads ({one_line(e)})") from e
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a weight of another shape: the first one named
        raise ConfigError(f"student.pretrained_file: {weights} does not fit timm {model} "
                          f"({state_dict_problem(e)})") from e
    with torch.device("meta"):  # the weights a classifier adds (levit's head holds a BatchNorm too): no memory
        head = set(timm.create_model(model, num_classes=1).state_dict()) - set(backbone.state_dict())
    extra = [k for k in result.unexpected_keys if k not in head]
    missing = result.missing_keys
    if missing or extra:
        problem = (f"lacks {len(missing)} of its {len(backbone.state_dict())} weights (e.g. {missing[0]})" if missing
                   else f"holds {len(extra)} weight{'s' * (len(extra) > 1)} it has not (e.g. {extra[0]})")
        raise ConfigError(f"student.pretrained_file: {weights} is not a timm {model}: it {problem}; the file of "
                          "another model?")


def _open_clip_student(cfg: StudentConfig, class_names: list[str], templates: list[str],
                       base: Path) -> tuple[DualHeadStudent, StudentData]:
    """The ImageNet recipe: CLIP image tower, both heads initialised from the class text embeddings."""
    pretrained = base / cfg.pretrained_file if cfg.pretrained_file else None
    try:
        clip = open_clip.create_model(cfg.model, pretrained=str(pretrained) if pretrained else None)
    except Exception as e:  # open_clip loads strictly: a missing, extra or misshapen weight, or no checkpoint
        if pretrained is None:
            raise
        raise ConfigError(f"student.pretrained_file: {pretrained} does not load into open_clip {cfg.model} "
                          f"({one_line(e)[:200]})") from e
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            clip, open_clip.get_tokenizer(cfg.model), class_names, templates).float().T  # (C, D)
    student = DualHeadStudent(clip.visual, weights.shape[1], len(class_names), kd_on_normalized=True)
    with torch.no_grad():
        student.ce_head.weight.copy_(weights)
        student.ce_head.bias.zero_()
        student.kd_head.weight.copy_(weights)
    pre = open_clip.get_model_preprocess_cfg(clip)
    size = pre["size"][0] if isinstance(pre["size"], (tuple, list)) else pre["size"]
    return student, StudentData(cfg.image_size or int(size), tuple(cfg.image_mean or pre["mean"]),
                                tuple(cfg.image_std or pre["std"]))


def build_student(cfg: StudentConfig, class_names: list[str], templates: list[str] | None = None,
                  base: Path = Path(".")) -> tuple[DualHeadStudent, StudentData]:
    """The student named by the config and the input it expects."""
    check_student_config(cfg, base)
    if cfg.kind == "open_clip":
        return _open_clip_student(cfg, class_names, templates or resolve_templates("generic"), base)
    return _timm_student(cfg, len(class_names), base)
