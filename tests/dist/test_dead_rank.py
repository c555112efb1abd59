"""A rank that dies or hangs mid-run makes the others fail within dist.timeout_s, with one line
that names it, instead of waiting forever.

The two ranks are started by hand with srun-style RANK/WORLD_SIZE/MASTER_* variables: torchrun
would kill the survivor itself as soon as one worker exits, hiding the path under test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import read_metrics, start_ranks

pytestmark = pytest.mark.dist

TIMEOUT_S = 15
SLACK_S = 25  # the survivors' check-in through the store (10 s) plus exit


def _start_ranks(run_dir: Path, log_dir: Path) -> list[subprocess.Popen]:
    return start_ranks(2, ["sft_tiny", f"output_dir={run_dir}", "data.eval=null", "train.max_steps=1000",
                           "train.log_every=1", "train.progress_bar=false", "checkpoint.every_steps=0",
                           f"dist.timeout_s={TIMEOUT_S}", "dist.backend=gloo"], log_dir)


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_survivor_fails_within_timeout_naming_the_rank(tmp_path, fault):
    run_dir = tmp_path / "run"
    procs = _start_ranks(run_dir, tmp_path)
    survivor, victim = procs
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").exists() or not any("loss" in r for r in read_metrics(run_dir)):
            assert survivor.poll() is None and victim.poll() is None, (tmp_path / "rank0.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.2)
        # SIGKILL: the peer's sockets close at once; SIGSTOP: they stay open and nothing arrives,
        # as when a node hangs or drops off the network
        os.kill(victim.pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        t0 = time.monotonic()
        rc = survivor.wait(timeout=TIMEOUT_S + SLACK_S + 30)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    log = (tmp_path / "rank0.log").read_text()
    assert rc == 1, log[-4000:]
    assert elapsed < TIMEOUT_S + SLACK_S, (elapsed, log[-4000:])
    line = [ln for ln in log.splitlines() if ln.startswith("ftdist: error (rank 0):")]
    assert line, log[-4000:]
    # the lost rank, and the host it ran on (this machine: the survivor shares it, so no "node down")
    assert line[0].endswith(f"(rank 1 ({socket.gethostname()}) died?)"), line
    if fault == "hung":
        assert f"a collective timed out after {TIMEOUT_S}s waiting for other ranks" in line[0]
        assert elapsed > TIMEOUT_S - 2
    else:
        assert "lost the connection to another rank" in line[0]
    assert "Traceback" not in log
