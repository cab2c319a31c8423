"""One writer per teacher store: a lock file beside the store naming its holder (host, pid, start time).

The lock is an flock on `<store>.lock`: the kernel releases it when the holder exits, however it exits
(kill -9 included), so a lock file left behind by a dead writer is stale by construction and the next
writer takes it over. Under torchrun, rank 0 holds it for all ranks, which write disjoint shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from dho_pipeline.errors import DhoError, warn
from dho_pipeline.runtime import Runtime


class StoreLocked(DhoError):
    """Another process is writing the store; the message says who."""


def lock_path(store: Path) -> Path:
    return Path(store).with_name(Path(store).name + ".lock")


@contextlib.contextmanager
def store_write_lock(store: Path) -> Iterator[None]:
    """Hold the store's write lock for the `with` block, or raise StoreLocked naming the holder."""
    path = lock_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, store)
    left_behind = _holder(fd)
    if left_behind:
        warn(f"{store}: taking over the lock left by {left_behind} (no longer running)")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                              "command": " ".join(sys.argv)}).encode(), 0)
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def rank_zero_lock(store: Path, runtime: Runtime) -> Iterator[None]:
    """Rank 0 holds the store's lock for every rank; if it cannot, every rank raises StoreLocked."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if runtime.is_main:
            try:
                stack.enter_context(store_write_lock(store))
            except StoreLocked as e:
                refusal = str(e)
        refusal = runtime.broadcast(refusal)
        if refusal:
            raise StoreLocked(refusal)
        yield


def _acquire(path: Path, store: Path) -> int:
    """An open, flock'd descriptor of the lock file at `path` (retrying if a releasing holder removed it)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "another process"
            os.close(fd)
            raise StoreLocked(f"{store}: being written by {holder}; wait for it to finish or stop it, then rerun "
                              f"(lock file {path})") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)  # the holder released and removed the file between our open and flock: try again


def _holder(fd: int) -> str:
    """'pid P on host H since T' from the lock file's contents ('' for an empty or unreadable file)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on host {info['host']} since {since} ({info['command']})"
    except (ValueError, TypeError, KeyError):
        return ""
