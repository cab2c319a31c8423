"""One writer per teacher store: a lock beside the store naming its holder (host, pid, start time).

A local store's lock is an flock on `<store>.lock`: the kernel releases it when the holder exits, however it
exits (kill -9 included), so a lock file left behind by a dead writer is stale by construction and the next
writer takes it over. Under torchrun, rank 0 holds it for all ranks, which write disjoint shards.

An object store has no flock. Its lock is a lease: numbered objects `<store>.lock/g-000001.json`, ...,
each created only if absent (S3 If-None-Match, fsspec mode "xb"), so of two writers racing for the next
number exactly one wins. The holder rewrites its object with a heartbeat every HEARTBEAT_S seconds and
marks it released at the end. A writer that finds the latest lease silent for LEASE_S seconds (its holder
was killed) takes over by creating the next number; a holder that sees a newer number has lost the lock
and stops before its next shard write (`Lease.check`). Clocks of the machines involved must agree to
well within LEASE_S (NTP does).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from dho_pipeline.errors import DhoError, warn
from dho_pipeline.locations import Location, UrlPath, location
from dho_pipeline.runtime import Runtime

LEASE_S = 300.0  # an object-store lock silent this long is taken over
HEARTBEAT_S = 30.0  # how often its holder says it is alive


class StoreLocked(DhoError):
    """Another process is writing the store; the message says who."""


class Lease:
    """What a lock's holder checks before each write: whether it still holds the lock."""

    def __init__(self) -> None:
        self.lost_to: str | None = None

    def check(self) -> None:
        if self.lost_to:
            raise StoreLocked(self.lost_to)


def lock_path(store: Location) -> Location:
    return store.with_name(store.name + ".lock")


@contextlib.contextmanager
def store_write_lock(store: Location | str) -> Iterator[Lease]:
    """Hold the store's write lock for the `with` block, or raise StoreLocked naming the holder."""
    store = location(store)
    if isinstance(store, UrlPath):
        with _object_store_lock(store) as lease:
            yield lease
        return
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
        yield Lease()  # the kernel never takes an flock away
    finally:
        os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def rank_zero_lock(store: Location, runtime: Runtime) -> Iterator[Lease]:
    """Rank 0 holds the store's lock for every rank; if it cannot, every rank raises StoreLocked."""
    with contextlib.ExitStack() as stack:
        refusal, lease = None, Lease()
        if runtime.is_main:
            try:
                lease = stack.enter_context(store_write_lock(store))
            except StoreLocked as e:
                refusal = str(e)
        refusal = runtime.broadcast(refusal)
        if refusal:
            raise StoreLocked(refusal)
        yield lease


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


def _holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "command": " ".join(sys.argv)}


def _describe(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
    return f"pid {info['pid']} on host {info['host']} since {since} ({info['command']})"


@contextlib.contextmanager
def _object_store_lock(store: UrlPath) -> Iterator[Lease]:
    """The lease lock of a store on an object store (see the module docstring)."""
    folder = lock_path(store)
    leases = folder.glob("g-*.json")
    number = int(leases[-1].name[2:8]) if leases else 0
    if leases:
        latest = json.loads(leases[-1].read_text())
        silent = time.time() - latest["heartbeat"]
        if not latest.get("released") and silent < LEASE_S:
            raise StoreLocked(f"{store}: being written by {_describe(latest)}, last heard from {silent:.0f} s ago; "
                              f"wait for it to finish or stop it (a stopped writer's lock is taken over "
                              f"{LEASE_S:.0f} s after its last heartbeat; lock {leases[-1]})")
        if not latest.get("released"):
            warn(f"{store}: taking over the lock left by {_describe(latest)} (silent for {silent:.0f} s)")
    mine, info = folder / f"g-{number + 1:06d}.json", _holder_info()
    try:
        with mine.open("xb") as f:
            f.write(json.dumps({**info, "heartbeat": time.time()}).encode())
    except FileExistsError:
        raise StoreLocked(f"{store}: another writer took the lock at the same moment ({mine}); rerun to see "
                          "who holds it") from None
    lease, stop = Lease(), threading.Event()
    newer = folder / f"g-{number + 2:06d}.json"

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            if newer.exists():
                lease.lost_to = (f"{store}: lost the write lock to {_describe(json.loads(newer.read_text()))} "
                                 f"(this process was silent for over {LEASE_S:.0f} s); stopping before the next "
                                 "shard write")
                return
            mine.write_text(json.dumps({**info, "heartbeat": time.time()}))

    beating = threading.Thread(target=heartbeat, name="store-lock-heartbeat", daemon=True)
    beating.start()
    try:
        yield lease
    finally:
        stop.set()
        beating.join()
        if not lease.lost_to:
            mine.write_text(json.dumps({**info, "heartbeat": time.time(), "released": True}))
            for old in leases:  # every earlier lease; this released one stays the latest
                with contextlib.suppress(FileNotFoundError):
                    old.remove()
