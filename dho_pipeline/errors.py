"""dho's own errors: bad input or damaged files, reported by the CLI as one line that names the culprit."""

from __future__ import annotations

import errno
import shutil
import sys
from pathlib import Path


class DhoError(Exception):
    """An error the user can act on; its message names the file, store, shard, sample or config field.

    Subclasses take one message argument, so a DataLoader worker re-raises them with their type intact.
    """


class DiskFull(DhoError):
    """Writing a file ran out of space; nothing written before is lost."""


class CheckpointError(DhoError):
    """A file that should be a checkpoint cannot be read as one."""


def warn(message: str) -> None:
    """Tell the user about something dho handled on its own (and what it did), on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def one_line(error: BaseException) -> str:
    """The message of `error` on one line; for one re-raised from a DataLoader worker, the worker's own message.

    torch re-raises a worker's exception as `type(msg)` with the worker's traceback in `msg`; its last line
    is `module.Type: message`.
    """
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        head, sep, message = last.partition(": ")
        text = message if sep and " " not in head else last
    return " ".join(text.split())


def state_dict_problem(error: BaseException) -> str:
    """The first mismatch torch's load_state_dict names ('size mismatch for fc.weight: ...', 'Missing key(s) in
    state_dict: ...'), else the message on one line."""
    return next((line.strip() for line in str(error).splitlines() if line.startswith("\t")), one_line(error))


def is_user_error(error: BaseException) -> bool:
    """Errors the user can act on from one line: dho's own, a missing or existing file, a file where a folder
    should be (or the reverse), no permission, a full disk."""
    return isinstance(error, (DhoError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                              PermissionError)) or is_disk_full(error)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says the device is out of space."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full(path: Path, needed: int | None = None) -> DiskFull:
    """A DiskFull naming `path`, the space left there and, where known, how much the write needed."""
    path = Path(path)
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    need = f"; it needed about {human_bytes(needed)}" if needed else ""
    return DiskFull(f"{path}: no space left on device ({human_bytes(free)} free{need}); free some space and rerun "
                    "(train-student: with --resume): nothing written before is lost")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""
