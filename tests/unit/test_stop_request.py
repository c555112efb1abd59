"""A run's stop handlers (Ctrl-C, SIGTERM, SIGUSR1) last as long as the run: the process gets its own back."""

import signal

import pytest

from ftdist.run.lifecycle import StopRequest

pytestmark = pytest.mark.unit


def test_the_handlers_from_before_the_run_come_back():
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    before = {sig: signal.getsignal(sig) for sig in sigs}
    with StopRequest() as stop:
        assert all(signal.getsignal(sig) == stop._handler for sig in sigs)
        signal.raise_signal(signal.SIGUSR1)
        assert stop.requested
    assert {sig: signal.getsignal(sig) for sig in sigs} == before
