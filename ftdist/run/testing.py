"""Hooks for tests that stop or kill a run at a known point, set through the environment.

These are the only places where ftdist reads test-only settings:
  FTDIST_HANG_AFTER_CHECKPOINT=N  wait (for ever) right after the step-N checkpoint is committed
  FTDIST_PID_DIR=DIR              each Ray Train worker writes DIR/rank{R}.pid
  FTDIST_SLOW_DATA_S=S            rank 0 takes S seconds longer to prepare the data (a large dataset)
  FTDIST_STEP_DELAY_S=S           every optimizer step (PPO: iteration) takes S seconds longer (to kill
                                  a node in the middle of a run)
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("ftdist")


def after_step() -> None:
    delay = float(os.environ.get("FTDIST_STEP_DELAY_S") or 0)
    if delay > 0:
        time.sleep(delay)


def after_checkpoint(step: int) -> None:
    if os.environ.get("FTDIST_HANG_AFTER_CHECKPOINT") == str(step):
        log.warning("FTDIST_HANG_AFTER_CHECKPOINT=%d: waiting to be killed", step)
        while True:
            time.sleep(1)


def record_pid(rank: int) -> None:
    pid_dir = os.environ.get("FTDIST_PID_DIR")
    if pid_dir:
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        Path(pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))


def before_data() -> None:
    delay = float(os.environ.get("FTDIST_SLOW_DATA_S", "0") or 0)
    if delay > 0:
        log.warning("FTDIST_SLOW_DATA_S=%s: preparing the data %ss longer", delay, delay)
        time.sleep(delay)
