"""Replace a file whole or not at all: on a local disk, write a temporary file beside it and rename it over the
file; on an object store, one PUT."""

from __future__ import annotations

import contextlib
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
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_whole(path: Location, data: bytes, own_name: bool = False) -> None:
    """Make `data` the whole file at `path`, local (through atomic_write, `own_name` as there) or an object."""
    if isinstance(path, UrlPath):
        path.write_bytes(data)  # one PUT: whole or nothing
    else:
        with atomic_write(path, own_name) as tmp:
            tmp.write_bytes(data)
