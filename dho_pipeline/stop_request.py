"""Stopping on a signal: training ends its step on the first SIGINT or SIGTERM (StopRequest); a job that keeps
its finished work on Ctrl-C stops the same way on SIGTERM (terminate_as_interrupt)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module before it imports torch, if it does
    from dho_pipeline.runtime import Runtime


class StopRequest:
    """While training: the first SIGINT (Ctrl-C) or SIGTERM (Slurm's preemption) asks to stop after the current
    step, with a checkpoint; a second one acts as usual.

    One process only: under torchrun the ranks would have to agree on the step to stop at, so there a signal
    still stops the run at once and --resume continues from the last periodic checkpoint.
    """

    def __init__(self, runtime: Runtime):
        self.enabled = self.possible(runtime)
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    @staticmethod
    def possible(runtime: Runtime) -> bool:
        """Whether this process can take the signals itself: one process, in the main thread."""
        return takes_signals(runtime.world_size)

    def __enter__(self) -> StopRequest:
        if self.enabled:
            self._previous = {number: signal.signal(number, self._request)
                              for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *_) -> None:
        self._restore()

    def _request(self, number: int, _frame: FrameType | None) -> None:
        self.signal_number = number
        self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's time limit or preemption) raised where Ctrl-C would raise KeyboardInterrupt."""


def stop_signal(stop: KeyboardInterrupt) -> int:
    """The signal behind a KeyboardInterrupt: SIGTERM for Terminated, else SIGINT."""
    return signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT


def takes_signals(world_size: int) -> bool:
    """Whether a process of a job of `world_size` processes takes the stop signals itself: one process (under
    torchrun the ranks would have to agree), in the main thread (the only one Python gives signals)."""
    return world_size == 1 and threading.current_thread() is threading.main_thread()


@contextmanager
def terminate_as_interrupt(world_size: int = 1) -> Iterator[None]:
    """While the block runs, SIGTERM raises Terminated, so a job whose Ctrl-C path keeps its finished work (and
    says how to continue) takes that path on SIGTERM too. Only where the process takes_signals."""
    if not takes_signals(world_size):
        yield
        return

    def terminate(_number: int, _frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, previous)  # a second SIGTERM acts as usual
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
