"""Rebuild a trained student from its checkpoint, without its pretrained weights or the teacher."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from dho_pipeline.config import StudentConfig
from dho_pipeline.errors import CheckpointError, state_dict_problem
from dho_pipeline.student.checkpoint import load_checkpoint
from dho_pipeline.student.model import DualHeadStudent, StudentData, build_student


@dataclass
class TrainedStudent:
    model: DualHeadStudent
    data: StudentData
    class_names: list[str]
    alpha: float
    beta: float
    checkpoint: dict


def final_or_unfinished(path: Path) -> str:
    """Where the final.pt beside the training checkpoint `path` is, or that its run has not finished."""
    final = path.parent / "final.pt"
    return f" ({final})" if final.is_file() else " (this run has not finished: continue it with --resume)"


def load_student(path: Path, device: torch.device) -> TrainedStudent:
    """The model of a final.pt on `device`, in eval mode, with its alpha and beta."""
    ckpt = load_checkpoint(path)
    if "alpha" not in ckpt:
        raise CheckpointError(f"{path}: a training checkpoint, without the alpha and beta a finished run picks on "
                              f"val: use the run's final.pt{final_or_unfinished(Path(path))}")
    cfg = StudentConfig(**ckpt["config"]["student"])
    cfg = dataclasses.replace(cfg, pretrained_file=None)  # the state dict below holds every weight
    model, _ = build_student(cfg, ckpt["class_names"], ckpt["config"]["teacher"]["extra_templates"] or None)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # e.g. weights saved under another timm version that renamed layers
        raise CheckpointError(f"{path}: its weights do not fit the {cfg.kind} {cfg.model} student it names, with "
                              f"{len(ckpt['class_names'])} classes ({state_dict_problem(e)})") from e
    model.to(device).eval()
    data = StudentData(**ckpt["student_data"])
    return TrainedStudent(model, data, ckpt["class_names"], ckpt["alpha"], ckpt["beta"], ckpt)
