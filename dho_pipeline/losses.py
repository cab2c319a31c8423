"""DHO's losses and its baselines: dual-head DHO, single-head KD, CE only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("dho", "single_head_kd", "ce_only")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def training_loss(
    method: str,
    out_l: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    teacher_l: torch.Tensor | None = None,
    out_u: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher_u: torch.Tensor | None = None,
    temperature: float = 2.0,
    weighting: str = "few_shot",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's loss and its parts (detached: reading them waits for the device), from the (CE head, KD head)
    outputs on the labelled and unlabelled batch.

    dho:            few_shot 0.5 * CE(h_ce(L)) + 0.5 * (KD(h_kd(L)) + KD(h_kd(U)));
                    semi_supervised CE + KD_L + KD_U.
    single_head_kd: CE(h(L)) + KD(h(L)) + KD(h(U)) on the CE head alone.
    ce_only:        CE(h_ce(L)).
    """
    if method not in METHODS:
        raise ValueError(f"train.method: unknown method {method!r} (one of {', '.join(METHODS)})")
    ce = F.cross_entropy(out_l[0].float(), labels)
    if method == "ce_only":
        return ce, {"ce": ce.detach()}
    head = 0 if method == "single_head_kd" else 1
    kd_lab = kd_loss(out_l[head], teacher_l, temperature)
    kd_unl = kd_loss(out_u[head], teacher_u, temperature)
    parts = {"ce": ce.detach(), "kd_l": kd_lab.detach(), "kd_u": kd_unl.detach()}
    if method == "single_head_kd":
        return ce + kd_lab + kd_unl, parts
    w = 0.5 if weighting == "few_shot" else 1.0
    return w * ce + w * (kd_lab + kd_unl), parts
