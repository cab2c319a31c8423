"""Loader worker processes that no path leaves behind: started deaf to the stop signals when the main process
takes them (StopRequest in stage two, terminate_as_interrupt in stage one), ended (killed if stuck) when the
job's loop ends, and killed at exit whatever path got there."""

from __future__ import annotations

import atexit
import multiprocessing.util  # its exit handler is registered before the backstop below
import signal
from collections.abc import Iterator

from torch.utils.data import DataLoader, IterableDataset

from dho_pipeline.locations import drop_simplecache_copies

WORKER_KILL_WAIT_S = 10  # how long a killed loader worker is waited for


def start_loader(dataset: IterableDataset, num_workers: int, pin_memory: bool, deaf: bool) -> Iterator[dict]:
    """An iterator over `dataset`'s batches from `num_workers` worker processes. `deaf` workers ignore the stop
    signals (ignore_stop_signals) and are remembered for the exit backstop."""
    batches = iter(DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                              persistent_workers=False, worker_init_fn=ignore_stop_signals if deaf else None))
    if deaf:
        _DEAF_WORKERS[:] = [w for w in _DEAF_WORKERS if w.is_alive()] + list(getattr(batches, "_workers", []))
    return batches


def ignore_stop_signals(_worker_id: int) -> None:
    """In a loader worker: let Ctrl-C or a SIGTERM to the whole process group stop the main process alone, which
    ends its step (or shard) and keeps it before it shuts the workers down (end_workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def end_workers(batches: Iterator[dict] | None) -> None:
    """Shut down the worker processes of a DataLoader iterator now; kill those that do not stop."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's iterator over worker processes
    if shutdown is not None:
        shutdown()  # asks each worker to stop and waits a while; then SIGTERM, which these ignore
        kill_workers(batches._workers)
        drop_simplecache_copies(worker.pid for worker in batches._workers)


def kill_workers(workers: list[multiprocessing.Process]) -> None:
    """SIGKILL, the signal a worker cannot ignore, to each worker still alive (one stuck in a read)."""
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(WORKER_KILL_WAIT_S)  # a read stuck in the kernel (a hung mount) delays even SIGKILL


# The loader workers of this process that ignore SIGTERM, and the backstop that ends them at exit whatever
# path got there: multiprocessing's exit handler sends its children SIGTERM and then joins them, so one alive
# at exit would hold the process forever. Registered after that handler (imported above), it runs first.
_DEAF_WORKERS: list[multiprocessing.Process] = []
atexit.register(kill_workers, _DEAF_WORKERS)
