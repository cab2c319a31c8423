"""Evaluate a dual-head student: per-head logits, the alpha/beta combination and its grid search."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from dho_pipeline.data.views import normalize
from dho_pipeline.student.model import DualHeadStudent, StudentData


@dataclass
class HeadOutputs:
    """Both heads' logits on a set of images, with their labels and row ids."""

    ce: torch.Tensor
    kd: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor


@torch.no_grad()
def head_outputs(model: DualHeadStudent, batches: Iterable[dict], data: StudentData,
                 device: torch.device) -> HeadOutputs:
    """Run the student over clean-view batches (see data.student_stream.clean_batches)."""
    was_training = model.training
    model.eval()
    ce, kd, labels, rows = [], [], [], []
    for batch in batches:
        out_ce, out_kd = model(normalize(batch["images"].to(device), data.mean, data.std))
        ce.append(out_ce.float().cpu())
        kd.append(out_kd.float().cpu())
        labels.append(batch["label"])
        rows.append(batch["row"])
    model.train(was_training)
    if not labels:  # every sample skipped as bad
        return HeadOutputs(torch.empty(0, 0), torch.empty(0, 0), torch.empty(0, dtype=torch.long),
                           torch.empty(0, dtype=torch.long))
    return HeadOutputs(torch.cat(ce), torch.cat(kd), torch.cat(labels), torch.cat(rows))


def restrict(out: HeadOutputs, classes: list[int]) -> HeadOutputs:
    """Both heads restricted to `classes`: every other class's logit is -inf, out of every softmax and argmax."""
    mask = torch.full((out.ce.shape[1],), float("-inf"))
    mask[classes] = 0.0
    return HeadOutputs(out.ce + mask, out.kd + mask, out.labels, out.rows)


def combine(ce: torch.Tensor, kd: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """p = alpha * softmax(ce) + (1 - alpha) * softmax(kd / beta)."""
    return alpha * ce.softmax(-1) + (1 - alpha) * (kd / beta).softmax(-1)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def search_alpha_beta(out: HeadOutputs, alphas: list[float], betas: list[float]) -> tuple[float, float, float]:
    """(alpha, beta, accuracy) of the best grid point; ties go to the first in (beta, alpha) grid order."""
    best = (alphas[0], betas[0], -1.0)
    for beta in betas:
        for alpha in alphas:
            acc = accuracy(combine(out.ce, out.kd, alpha, beta), out.labels)
            if acc > best[2]:
                best = (alpha, beta, acc)
    return best
