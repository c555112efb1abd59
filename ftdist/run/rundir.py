"""Ownership of output_dir: whose run directory it is, and the lock that keeps a second run out.

A run directory holds `run.json` (run id, created, host, pid) from its first start on. ftdist
writes into a directory only if it is empty, missing, already one of its run directories, or the
user consented with `overwrite_output_dir=true`; anything else is refused before a file is touched.

`.lock` names the run that holds the directory (host, pid, job). A second run is refused while
the holder is alive: on this host by its pid, on another host (a shared disk) by the lock's
heartbeat, which the holder refreshes every HEARTBEAT_S seconds; a lock older than STALE_S is
stale. A new process of the same job (a Slurm requeue, a torchrun or Ray Train restart, possibly
on another node) takes its job's lock over at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ftdist.config import ConfigError
from ftdist.run.disk import space_for

log = logging.getLogger("ftdist")

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


def job_id() -> Optional[str]:
    """The launcher's id of this job, shared by every restart of it (None for a plain process)."""
    for var in ("FTDIST_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(var)
        if value and value != "none":
            return f"{var}={value}"
    return None


@dataclass
class Lock:
    path: Path
    host: str
    pid: int
    job: Optional[str]
    run_id: str

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        self._thread = threading.Thread(target=beat, name="ftdist-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        try:
            held = json.loads(self.path.read_text())
            if held.get("host") == self.host and held.get("pid") == self.pid:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_is_gone(held: dict, age_s: float) -> Optional[str]:
    """Why the recorded holder no longer holds the directory, or None when it may still be running."""
    job = job_id()
    if job is not None and held.get("job") == job:
        return f"it is an earlier process of this job ({job})"
    if held.get("host") == socket.gethostname():
        pid = held.get("pid")
        return None if isinstance(pid, int) and _pid_alive(pid) else f"process {pid} on this host is gone"
    if age_s > STALE_S:
        return f"its heartbeat stopped {age_s:.0f}s ago"
    return None


def claim(output_dir: str, overwrite: bool, fresh: bool = False) -> str:
    """One process (rank 0), before anything is written: make output_dir this run's, or refuse. Returns the run id.

    fresh (checkpoint.resume=never): a new run in an existing run directory gets a new id, so that it neither
    resumes nor prunes the checkpoints of the run before it.
    """
    out = Path(output_dir)
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            run_id = json.loads(run_file.read_text())["run_id"]
            if not fresh:
                return run_id
        except (OSError, ValueError, KeyError, TypeError):
            if not overwrite:
                raise ConfigError(f"output_dir={output_dir}: {RUN_FILE} is unreadable; set overwrite_output_dir=true "
                                  f"to make the directory a new run's") from None
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output_dir={output_dir} is not empty and is not an ftdist run directory (no {RUN_FILE}); "
                          f"choose an empty or new directory, or set overwrite_output_dir=true to write there anyway "
                          f"(ftdist then replaces config.yaml, metrics.jsonl and final/, and leaves other checkpoints "
                          f"alone)")
    run_id = uuid.uuid4().hex
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RUN_FILE}.tmp"
    with space_for(run_file, f"the run's identity ({RUN_FILE})", partial=tmp,
                   kept="nothing in output_dir was changed"):
        tmp.write_text(json.dumps({"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                   "host": socket.gethostname(), "pid": os.getpid()}, indent=1))
        os.replace(tmp, run_file)
    return run_id


def lock(output_dir: str, run_id: str) -> Lock:
    """One process (rank 0): take the directory's lock, or refuse naming the run that holds it."""
    path = Path(output_dir) / LOCK_FILE
    me = Lock(path, socket.gethostname(), os.getpid(), job_id(), run_id)
    record = json.dumps({k: v for k, v in asdict(me).items() if k != "path"} | {"started": time.time()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held, age = json.loads(path.read_text()), time.time() - path.stat().st_mtime
            except (OSError, ValueError):
                held, age = {}, STALE_S + 1  # unreadable: a lock that was being written when its holder died
            why = _holder_is_gone(held, age)
            if why is None:
                raise ConfigError(
                    f"output_dir={output_dir} is in use by another run (host {held.get('host')}, pid {held.get('pid')}"
                    f"{', job ' + held['job'] if held.get('job') else ''}; lock refreshed {age:.0f}s ago); wait for it "
                    f"to end or use another output_dir") from None
            log.warning("taking over the lock of output_dir=%s: %s", output_dir, why)
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            continue
        # a lock left empty by a full disk would be taken for a dead holder's: it goes
        with space_for(path, "the run's lock", partial=path, kept="nothing in output_dir was changed"):
            with os.fdopen(fd, "w") as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
        me.start_heartbeat()
        return me
    raise ConfigError(f"output_dir={output_dir}: could not take the lock {path} (another run is starting?)")
