"""Replace a file whole or not at all: on a local disk, write a temporary file beside it and rename it over the
file; on an object store, one PUT. Locally the bytes reach the disk before the rename, and the rename before the
block ends, so a power cut leaves the old file or the new one, never an empty one."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from dho_pipeline.locations import Location, UrlPath


@contextlib.contextmanager
def atomic_write(path: Path, own_name: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block ends it is renamed onto `path`, and if the
    block fails (a kill, a full disk) it is removed and the file at `path` is kept as it was.

    `own_name`: a temporary name of this writer's own, for a file that several processes may write at once
    (the default, `<name>.tmp`, is reused, so a file left by a SIGKILL is overwritten by the next write).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp" if own_name else f"{path.name}.tmp")
    try:
        yield tmp
        flush_to_disk(tmp)
        os.replace(tmp, path)
        flush_to_disk(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def flush_to_disk(path: Path) -> None:
    """fsync a file or a folder (a folder: the names in it, e.g. a rename just done). Without it a file renamed
    into place can be empty after a power cut: the file system may commit the rename before the bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system that cannot sync a folder
            raise
    finally:
        os.close(fd)


def write_whole(path: Location, data: bytes, own_name: bool = False) -> None:
    """Make `data` the whole file at `path`, local (through atomic_write, `own_name` as there) or an object."""
    if isinstance(path, UrlPath):
        path.write_bytes(data)  # one PUT: whole or nothing
    else:
        with atomic_write(path, own_name) as tmp:
            tmp.write_bytes(data)
