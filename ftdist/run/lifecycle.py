"""How a run ends: stop requests (Slurm preemption) and the exit of a finished multi-rank process."""

from __future__ import annotations

import logging
import os
import signal
import sys


class StopRequest:
    """SIGUSR1/SIGTERM (SIGUSR1 ahead of Slurm's time limit, SIGTERM on scancel/requeue): finish the step,
    checkpoint, exit. Install it first, before any slow start-up."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside some Ray workers)
                pass

    def _handler(self, signum, frame):
        self.requested = True


def end_process(code: int) -> None:
    """End a finished rank at once, from inside the training function.

    Every rank is past its last collective and everything the run writes is written and closed. What is
    left is freeing the engine (DeepSpeed, gloo/NCCL process groups) and tearing down the interpreter and
    the library threads; destroying a C++ object whose thread is still joinable aborts the process
    ("terminate called without an active exception") and turns a completed run into a failed job. Called
    while the caller still holds the engine, nothing is freed: the process ends here with `code`.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
