"""TensorBoard scalars beside metrics.jsonl (train.tensorboard: true): the same numbers, one tag each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dho_pipeline.extras import require_extra


def scalars(record: dict) -> Iterator[tuple[str, float]]:
    """(tag, value) of each number in a metrics.jsonl record: val/<head> for a validation line, else train/<key>."""
    if "val" in record:
        for head, accuracy in record["val"].items():
            yield f"val/{head}", accuracy
        return
    for key, value in record.items():
        if key not in ("step", "epoch"):
            yield f"train/{key}", value


def require_tensorboard() -> None:
    """MissingExtra naming train.tensorboard and the extra that installs it, unless tensorboard imports."""
    require_extra("tensorboard", "train.tensorboard: true", "tensorboard")


class TensorBoardLog:
    """Event files in `folder`, flushed after every record; events past the step a run resumes from are hidden.

    A resumed run hides the events after its checkpoint's step, a fresh run every earlier event in the
    folder (SummaryWriter's purge_step), just as metrics.jsonl drops those lines.
    """

    def __init__(self, folder: Path, resume_step: int):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else 0)

    def write(self, record: dict) -> None:
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
