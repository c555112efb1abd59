"""How a run ends: stop requests (Slurm preemption) and the exit of a finished multi-rank process."""

from __future__ import annotations

import logging
import os
import signal
import sys

from ftdist.errors import RunError


class StopRequest:
    """SIGUSR1/SIGTERM/SIGINT (SIGUSR1 ahead of Slurm's time limit, SIGTERM on scancel/requeue, Ctrl-C): finish
    the step, checkpoint, exit with 3. A second Ctrl-C stops at once. Install it first, before any slow start-up,
    as a context manager (`with StopRequest() as stop:`) around the whole run."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside some Ray workers)
                pass

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        """The handlers from before the run come back: a run inside a longer-lived process (a notebook, a
        benchmark, a test) leaves that process's Ctrl-C as it found it."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: no checkpoint
        if not self.requested and signum == signal.SIGINT:
            print("ftdist: Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        self.requested = True


class RunFailure(RunError):
    """A failure of the run itself (not of the user's input), reported as one line; `details` (a full traceback)
    goes to output_dir/error.log."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


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
