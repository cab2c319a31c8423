"""Stop training between steps: the first SIGINT or SIGTERM asks, the training loop ends its step and stops."""

from __future__ import annotations

import signal
import threading
from types import FrameType

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
        return runtime.world_size == 1 and threading.current_thread() is threading.main_thread()

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
