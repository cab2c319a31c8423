"""Replace a local file whole or not at all: write a temporary file beside it, then rename it over the file."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


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
