"""Learning-rate schedules: linear warm-up, then linear decay to zero or a cosine."""

from __future__ import annotations

import math

import torch


def warmup_steps(warmup: float, total_steps: int) -> int:
    """train.warmup as steps: a fraction of the run when < 1, else a step count."""
    return int(warmup * total_steps) if warmup < 1 else int(warmup)


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the base lr at `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1 - progress)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float,
                   kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    steps = warmup_steps(warmup, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, steps, kind))
