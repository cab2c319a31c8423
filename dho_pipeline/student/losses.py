"""DHO's losses and its baselines: dual-head DHO, single-head KD, CE only."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

METHODS = ("dho", "single_head_kd", "ce_only")


class TopKLogits(NamedTuple):
    """A teacher row kept as its k largest logits, their class indices and the log-sum-exp of all C logits."""

    values: torch.Tensor  # (N, k)
    indices: torch.Tensor  # (N, k), int64
    lse: torch.Tensor  # (N,)

    def to(self, device: torch.device, non_blocking: bool = False) -> TopKLogits:
        return TopKLogits(*(t.to(device, non_blocking=non_blocking) for t in self))


def kd_loss(student: torch.Tensor, teacher: torch.Tensor | TopKLogits, temperature: float = 2.0) -> torch.Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch; top-k teachers via topk_kd_loss."""
    if isinstance(teacher, TopKLogits):
        return topk_kd_loss(student, teacher, temperature)
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def topk_kd_loss(student: torch.Tensor, teacher: TopKLogits, temperature: float = 2.0) -> torch.Tensor:
    """KD against a top-k teacher row over k + 1 buckets: the teacher's k classes and the rest of the classes.

    Teacher: log p_i = z_i - lse for its k classes, the rest bucket log(1 - sum p_i) (exact at T = 1).
    Student: its log-probabilities at the same k classes, the rest bucket a logsumexp over all its other
    classes. Both are tempered over the buckets, softmax(log p / T), and compared as the dense loss is:
    T^2 * KL(teacher || student). With k = C the rest bucket is empty and this is kd_loss exactly.
    """
    log_s = F.log_softmax(student.float(), dim=-1)
    log_s_buckets = log_s.gather(1, teacher.indices)
    log_p_buckets = teacher.values.float() - teacher.lse.float()[:, None]
    if teacher.indices.shape[1] < student.shape[1]:  # a rest bucket: every class outside the teacher's k
        log_s_rest = log_s.scatter(1, teacher.indices, float("-inf")).logsumexp(-1, keepdim=True)
        log_p_rest = torch.log1p(-log_p_buckets.exp().sum(-1, keepdim=True).clamp(max=1.0))
        log_s_buckets = torch.cat([log_s_buckets, log_s_rest], -1)
        log_p_buckets = torch.cat([log_p_buckets, log_p_rest], -1)
    log_t = F.log_softmax(log_p_buckets / temperature, dim=-1)
    log_q = F.log_softmax(log_s_buckets / temperature, dim=-1)
    terms = log_t.exp() * (log_t - log_q)
    kl = torch.where(torch.isneginf(log_t), 0.0, terms).sum(-1).mean()  # an empty teacher bucket adds nothing
    return temperature**2 * kl


def training_loss(
    method: str,
    out_l: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    teacher_l: torch.Tensor | TopKLogits | None = None,
    out_u: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher_u: torch.Tensor | TopKLogits | None = None,
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
