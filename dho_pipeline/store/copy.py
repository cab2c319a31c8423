"""`dho cache copy`: a teacher store from one location to another (local, S3, GCS, ...), done shards only.

The destination is created with the source's arrays and attributes, then filled shard by shard through
the same checked write as stage one (rows, checksums, then the done mark), so a copy killed at any point
resumes where it stopped: shards already done and intact at the destination are skipped. At the end the
destination must have the source's fingerprint and its done mask as it was when the copy began (a stage one
may still be filling the source), and every done shard must verify.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from dho_pipeline.errors import human_bytes
from dho_pipeline.locations import Location, location
from dho_pipeline.store.lock import store_write_lock
from dho_pipeline.store.zarr_store import (
    NOT_DONE,
    StoreError,
    StoreShard,
    TeacherStore,
    interrupted_creation,
    thread_pool,
)

COPY_THREADS = 8  # shards in flight: object stores reward concurrency, and shards write disjoint chunks


@dataclass
class CopyReport:
    source: str
    destination: str
    copied: int
    already_there: int
    not_computed: int
    bytes_copied: int  # of the arrays read, before the store's compression
    seconds: float
    fingerprint_hash: str

    def summary(self) -> str:
        return (f"{self.destination}: copied {self.copied} shards ({human_bytes(self.bytes_copied)} uncompressed) in "
                f"{self.seconds:.1f} s, {self.already_there} already there, {self.not_computed} not computed in "
                f"the source; fingerprint {self.fingerprint_hash[:12]} and done mask equal to {self.source}'s when the "
                "copy began")


def copy_store(source_path: Location | str, destination_path: Location | str, progress: bool = True) -> CopyReport:
    """Copy the done shards of the store at `source_path` to `destination_path`; resumable, checked at the end."""
    started = time.perf_counter()
    source, destination_path = TeacherStore.open(source_path), location(destination_path)
    with store_write_lock(destination_path) as lease:
        destination = open_destination(source, destination_path)
        checks = destination.check_shards(progress=progress)
        done = {s: source.shard_done(s) for s in source.shards()}
        todo = [s for s, finished in done.items() if finished and checks[s] is not None]
        not_computed = [s for s, finished in done.items() if not finished]

        def copy_shard(shard: StoreShard) -> int:
            lease.check()
            arrays = source.read_checked_arrays(shard)
            destination.write_shard(shard, **arrays)
            return sum(a.nbytes for a in arrays.values())

        with thread_pool(COPY_THREADS) as pool:  # Ctrl-C: the shards in flight are finished, no other started
            sizes = list(tqdm(pool.map(copy_shard, todo), total=len(todo), desc=f"copy to {destination_path}",
                              unit="shard", disable=not progress))
        check_copy(source, destination, done)
    return CopyReport(str(source.path), str(destination.path), len(todo), len(done) - len(todo) - len(not_computed),
                      len(not_computed), sum(sizes), time.perf_counter() - started, source.attrs["fingerprint_hash"])


def open_destination(source: TeacherStore, path: Location) -> TeacherStore:
    """The store at `path` if it is a copy of `source` (a resumed copy), else a new empty one like it."""
    if not path.exists() or interrupted_creation(path):
        return TeacherStore.create_like(source, path)
    destination = TeacherStore.open(path, mode="a")
    if destination.attrs["fingerprint_hash"] != source.attrs["fingerprint_hash"]:
        raise StoreError(f"{path}: a store with another fingerprint ({destination.attrs['fingerprint_hash'][:12]}, "
                         f"the source's is {source.attrs['fingerprint_hash'][:12]}); copy to another place or "
                         "delete it first")
    return destination


def check_copy(source: TeacherStore, destination: TeacherStore, done: dict[StoreShard, bool]) -> None:
    """Raise StoreError unless the copy has the source's fingerprint, is done where the source was (`done`, read
    when the copy began: a stage one may still be filling the source), and every done shard verifies."""
    if destination.attrs["fingerprint_hash"] != source.attrs["fingerprint_hash"]:
        raise StoreError(f"{destination.path}: fingerprint differs from {source.path} after the copy")
    expected = np.zeros(destination.num_rows, bool)
    for shard in (s for s, finished in done.items() if finished):
        expected[shard.first_row: shard.first_row + shard.count] = True
    differ = np.flatnonzero(expected != destination.group["done"][:])
    if differ.size:
        raise StoreError(f"{destination.path}: done mask differs from {source.path} at {differ.size} rows "
                         f"(first: row {differ[0]}); rerun the copy")
    problems = {s.name: p for s, p in destination.check_shards().items() if p not in (None, NOT_DONE)}
    if problems:
        name, problem = next(iter(problems.items()))
        raise StoreError(f"{destination.path}: shard {name} does not verify after the copy ({problem}); rerun it")
