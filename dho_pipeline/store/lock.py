"""One writer per teacher store (and per train-student run folder): a lock beside it naming its holder (host,
pid, start time).

A local store's lock is an flock on `<store>.lock`: the kernel releases it when the holder exits, however it
exits (kill -9 included), so a lock file left behind by a dead writer is stale by construction and the next
writer takes it over. Under torchrun, rank 0 holds it for all ranks, which write disjoint shards.

An object store has no flock. Its lock is a lease: numbered objects `<store>.lock/g-000001.json`, ...,
each created only if absent (S3 If-None-Match, fsspec mode "xb"; a random nonce read back catches a server
that ignores it), so of two writers racing for the next number exactly one wins. The holder rewrites its
object with a heartbeat every HEARTBEAT_S seconds and marks it released at the end. A writer that finds
the latest lease silent for LEASE_S seconds (its holder was killed) takes over by creating the next
number. A holder that sees a newer number, finds its own lease gone, or has not landed a heartbeat for
LEASE_S / 2 seconds stops before its next shard write (`Lease.check`); under torchrun the other ranks, on
other nodes maybe, look for a newer number before each of theirs. Clocks of the machines involved
must agree to well within LEASE_S (NTP does).
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
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from dho_pipeline.errors import DhoError, warn
from dho_pipeline.locations import Location, LocationError, UrlPath, location
from dho_pipeline.runtime import Runtime

LEASE_S = 300.0  # an object-store lock silent this long is taken over
HEARTBEAT_S = 30.0  # how often its holder says it is alive


class StoreLocked(DhoError):
    """Another process is writing the store (or training into the run folder); the message says who."""


class Lease:
    """What a lock's holder checks before each write: whether it still holds the lock.

    `number`: an object-store lease's number (None for a local flock), which rank 0 passes to the other ranks.
    """

    def __init__(self, number: int | None = None) -> None:
        self.number = number
        self.lost_to: str | None = None
        # an object-store lease whose heartbeats stopped, or that another writer took over from rank 0
        self.fenced: Callable[[], str | None] = lambda: None

    def check(self) -> None:
        problem = self.lost_to or self.fenced()
        if problem:
            raise StoreLocked(problem)


def lock_path(store: Location, hidden: bool = False) -> Location:
    """`<name>.lock` beside the store; `.<name>.lock` when `hidden` (a run folder's, out of the way of `runs/*`)."""
    return store.with_name(f"{'.' if hidden else ''}{store.name}.lock")


@contextlib.contextmanager
def store_write_lock(store: Location | str, hidden: bool = False) -> Iterator[Lease]:
    """Hold the store's write lock for the `with` block, or raise StoreLocked naming the holder. `hidden`: the
    lock file's name begins with a dot (local folders only)."""
    store = location(store)
    if isinstance(store, UrlPath):
        with _object_store_lock(store) as lease:
            yield lease
        return
    path = lock_path(store, hidden)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"{path.parent}: a file, where the folder that holds {store} should be") from None
    fd = _acquire(path, store)
    left_behind = _holder(fd)
    if left_behind:
        warn(f"{store}: taking over the lock left by {left_behind} (no longer running)")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
    try:
        yield Lease()  # the kernel never takes an flock away
    finally:
        os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def rank_zero_lock(store: Location, runtime: Runtime, hidden: bool = False) -> Iterator[Lease]:
    """Rank 0 holds the store's lock for every rank; if it cannot, every rank raises StoreLocked.

    On an object store the other ranks (other nodes, maybe) check rank 0's lease themselves before each shard
    write: should another writer take it over, they stop too.
    """
    with contextlib.ExitStack() as stack:
        refusal, lease = None, Lease()
        if runtime.is_main:
            try:
                lease = stack.enter_context(store_write_lock(store, hidden))
            except StoreLocked as e:
                refusal = str(e)
        refusal, number = runtime.broadcast((refusal, lease.number))
        if refusal:
            raise StoreLocked(refusal)
        yield lease if runtime.is_main or number is None else _follower_lease(location(store), number)


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
        return _describe(json.loads(os.pread(fd, 4096, 0) or b"null"))
    except (ValueError, TypeError, KeyError):
        return ""


def _holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "command": " ".join(sys.argv),
            "nonce": uuid.uuid4().hex}


def _describe(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
    return f"pid {info['pid']} on host {info['host']} since {since} ({info['command']})"


def _leases(folder: UrlPath) -> list[tuple[int, UrlPath]]:
    """The lease objects g-<number>.json in the lock folder, by number; a stray object is named in one line."""
    found = []
    for lease in folder.glob("g-*.json"):
        number = lease.name[2:-5]
        if not number.isdigit():
            raise StoreLocked(f"{lease}: not a lease of dho's lock (expected g-<number>.json); remove it")
        found.append((int(number), lease))
    return sorted(found, key=lambda item: item[0])


LEASE_FIELDS = ("host", "pid", "since", "command", "heartbeat")


def _read_lease(lease: UrlPath) -> dict:
    try:
        info = json.loads(lease.read_text())
    except ValueError:
        info = None
    if not isinstance(info, dict) or any(field not in info for field in LEASE_FIELDS):
        raise StoreLocked(f"{lease}: an unreadable lease in the store's lock; remove it if no writer is running")
    return info


class _Heartbeat(threading.Thread):
    """Rewrites the holder's lease every HEARTBEAT_S seconds and watches for a lease numbered above it.

    The holder fences itself: `Lease.check` fails once a newer lease exists, its own lease is gone or was
    overwritten by another writer (a server that ignores If-None-Match), or no heartbeat has landed for
    LEASE_S / 2 seconds (a failing or stalled connection), before anyone may take the lock over.
    """

    def __init__(self, store: UrlPath, number: int, mine: UrlPath, info: dict, lease: Lease):
        super().__init__(name="store-lock-heartbeat", daemon=True)
        self.store, self.number, self.mine, self.info, self.lease = store, number, mine, info, lease
        self.stop = threading.Event()
        self.last_beat = time.monotonic()
        lease.fenced = self.fenced

    def run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.beat()
            except StoreLocked as e:
                self.lease.lost_to = str(e)
                return
            except Exception as e:  # a failed write is retried next time; too many and the holder fences itself
                warn(f"{self.store}: lock heartbeat failed ({type(e).__name__}: {e}); retrying")

    def beat(self) -> None:
        taken = _taken_over(self.store, self.number)
        if taken:
            raise StoreLocked(taken)
        if not self.mine.exists() or _read_lease(self.mine)["nonce"] != self.info["nonce"]:
            raise StoreLocked(f"{self.store}: this process's lease {self.mine} was removed or overwritten by "
                              "another writer; stopping before the next shard write")
        self.mine.write_text(json.dumps({**self.info, "heartbeat": time.time()}))
        self.last_beat = time.monotonic()

    def fenced(self) -> str | None:
        silent = time.monotonic() - self.last_beat
        if silent > LEASE_S / 2:
            return (f"{self.store}: no lock heartbeat has landed for {silent:.0f} s; stopping before the next "
                    "shard write, as another writer may take the lock over")
        return None


def _taken_over(store: UrlPath, number: int) -> str | None:
    """Why the holder of lease `number` must stop: a newer lease exists (another writer took the lock over)."""
    newer = [lease for above, lease in _leases(lock_path(store)) if above > number]
    if newer:
        return (f"{store}: lost the write lock to {_describe(_read_lease(newer[-1]))}; stopping before the next "
                "shard write")
    return None


def _follower_lease(store: UrlPath, number: int) -> Lease:
    """Another rank's view of rank 0's lease `number`: it fails once a newer lease exists (one listing a check)."""
    lease = Lease(number)

    def taken_over() -> str | None:
        try:
            return _taken_over(store, number)
        except StoreLocked:
            raise
        except Exception:  # the lock folder unreadable for a moment: the shard write will say, the next check looks
            return None

    lease.fenced = taken_over
    return lease


@contextlib.contextmanager
def _object_store_lock(store: UrlPath) -> Iterator[Lease]:
    """The lease lock of a store on an object store (see the module docstring)."""
    if not store.writable:
        raise LocationError(f"{store}: {store.protocol}:// is read-only; stage one and `cache copy` write stores "
                            "to a local folder or an object store")
    folder = lock_path(store)
    leases = _leases(folder)
    number = leases[-1][0] if leases else 0
    if leases:
        latest = _read_lease(leases[-1][1])
        silent = time.time() - latest["heartbeat"]
        if not latest.get("released") and silent < LEASE_S:
            raise StoreLocked(f"{store}: being written by {_describe(latest)}, last heard from {silent:.0f} s ago; "
                              f"wait for it to finish or stop it (a stopped writer's lock is taken over "
                              f"{LEASE_S:.0f} s after its last heartbeat; lock {leases[-1][1]})")
        if not latest.get("released"):
            warn(f"{store}: taking over the lock left by {_describe(latest)} (silent for {silent:.0f} s)")
    mine, info = folder / f"g-{number + 1:06d}.json", _holder_info()
    try:
        with mine.open("xb") as f:
            f.write(json.dumps({**info, "heartbeat": time.time()}).encode())
    except FileExistsError:
        raise StoreLocked(f"{store}: another writer took the lock at the same moment ({mine}); rerun to see "
                          "who holds it") from None
    if _read_lease(mine)["nonce"] != info["nonce"]:  # the server ignored If-None-Match and another write won
        raise StoreLocked(f"{store}: another writer took the lock at the same moment ({mine}), and this server "
                          "does not refuse a second create (S3 If-None-Match); rerun to see who holds it")
    lease = Lease(number + 1)
    beating = _Heartbeat(store, number + 1, mine, info, lease)
    beating.start()
    try:
        yield lease
    finally:
        beating.stop.set()
        beating.join()
        if not lease.lost_to:
            mine.write_text(json.dumps({**info, "heartbeat": time.time(), "released": True}))
            for _, old in leases:  # every earlier lease; this released one stays the latest
                with contextlib.suppress(FileNotFoundError):
                    old.remove()
