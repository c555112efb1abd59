"""Stop requests: Slurm preemption (SIGUSR1 ahead of the time limit, SIGTERM on scancel/requeue)."""

from __future__ import annotations

import signal


class StopRequest:
    """SIGUSR1/SIGTERM: finish the step, checkpoint, exit. Install it first, before any slow start-up."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside some Ray workers)
                pass

    def _handler(self, signum, frame):
        self.requested = True
