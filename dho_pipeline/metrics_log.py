"""metrics.jsonl, the numbers of a train-student run (and their TensorBoard copy), kept right across resumes."""

from __future__ import annotations

import json
from pathlib import Path

from dho_pipeline.atomic_write import atomic_write
from dho_pipeline.errors import disk_full, is_disk_full, warn
from dho_pipeline.tensorboard_log import TensorBoardLog


class MetricsLog:
    """metrics.jsonl, one JSON object a line; on resume, lines past the checkpoint's step are dropped, and so
    is a line cut off by a kill or a full disk (with a warning naming it). With `tensorboard`, the same numbers
    as TensorBoard scalars in the same folder."""

    def __init__(self, path: Path, resume_step: int, enabled: bool, tensorboard: bool = False):
        self.path, self.enabled = path, enabled
        self.tensorboard = TensorBoardLog(path.parent, resume_step) if enabled and tensorboard else None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and path.exists():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                step = self._step(number, line)
                if step is not None and step <= resume_step:
                    kept.append(line)
        self._replace("".join(line + "\n" for line in kept))

    def _replace(self, text: str) -> None:
        """Make `text` the whole file through a temporary file and a rename: a kill or a full disk on the way
        leaves the lines already there (a full disk raises DiskFull naming the file)."""
        try:
            with atomic_write(self.path) as tmp:
                tmp.write_text(text)
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(self.path) from e
            raise

    def _step(self, number: int, line: str) -> int | None:
        """The step of line `number`; None, with a warning on stderr, when the line is not a whole record."""
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            warn(f"{self.path}:{number}: dropped a line that is not a whole record (cut off by a kill or a full "
                 f"disk?): {line[:40]!r}")
            return None

    def write(self, record: dict) -> None:
        """Append `record` as one line (and its numbers to TensorBoard); a full disk raises DiskFull naming the file."""
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(self.path) from e
            raise
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if any."""
        if self.tensorboard is not None:
            self.tensorboard.close()
