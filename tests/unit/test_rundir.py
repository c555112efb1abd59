"""Who may write into output_dir: run identity and the lock (host, pid, job, heartbeat)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ftdist.config import ConfigError
from ftdist.engine.checkpoint import export_final
from ftdist.run import rundir

pytestmark = pytest.mark.unit


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(out, **held):
    (out / rundir.LOCK_FILE).write_text(json.dumps(held))


def test_a_new_or_empty_directory_becomes_a_run_and_keeps_its_id(tmp_path):
    run_id = rundir.claim(str(tmp_path / "new"), overwrite=False)
    assert rundir.claim(str(tmp_path / "new"), overwrite=False) == run_id  # the same run on restart
    assert rundir.claim(str(tmp_path / "new"), overwrite=False, fresh=True) != run_id  # resume=never: a new one
    (tmp_path / "empty").mkdir()
    assert rundir.claim(str(tmp_path / "empty"), overwrite=False)


def test_a_held_lock_refuses_and_names_the_holder(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("FTDIST_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    # a live process on this host (this one's parent), and a fresh heartbeat from another host
    for held in ({"host": socket.gethostname(), "pid": os.getppid()}, {"host": "node-7", "pid": 1}):
        _write_lock(tmp_path, **held)
        with pytest.raises(ConfigError, match=rf"in use by another run \(host {held['host']}, pid {held['pid']}"):
            rundir.lock(str(tmp_path), "r1")


@pytest.mark.parametrize("case", ["dead pid here", "stale heartbeat elsewhere", "same job", "unreadable"])
def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path, monkeypatch, case):
    monkeypatch.delenv("FTDIST_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    if case == "dead pid here":
        _write_lock(tmp_path, host=socket.gethostname(), pid=_dead_pid(), job=None)
    elif case == "stale heartbeat elsewhere":
        _write_lock(tmp_path, host="node-7", pid=1, job=None)
        old = time.time() - rundir.STALE_S - 1
        os.utime(tmp_path / rundir.LOCK_FILE, (old, old))
    elif case == "same job":  # a Slurm requeue on another node
        _write_lock(tmp_path, host="node-7", pid=1, job="SLURM_JOB_ID=4242")
    else:
        (tmp_path / rundir.LOCK_FILE).write_text("{not json")
    held = rundir.lock(str(tmp_path), "r2")
    try:
        record = json.loads((tmp_path / rundir.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["run_id"] == "r2"
    finally:
        held.release()
    assert not (tmp_path / rundir.LOCK_FILE).exists()


class _OneRank:
    class info:
        is_main, rank, world_size = True, 0, 1


def test_final_is_replaced_whole_or_not_at_all(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "model.safetensors").write_text("the previous model")

    def dies_half_way(d):
        os.makedirs(d)
        open(os.path.join(d, "config.json"), "w").write("{}")
        raise OSError(28, "No space left on device")

    from ftdist.run.disk import DiskFullError

    with pytest.raises(DiskFullError, match=f"{final}: no space left on the device while writing the final model"):
        export_final(_OneRank(), dies_half_way, final)
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors"]  # untouched

    def writes(d):
        os.makedirs(d)
        open(os.path.join(d, "model.safetensors"), "w").write("the new model")

    export_final(_OneRank(), writes, final)
    assert (final / "model.safetensors").read_text() == "the new model"
    assert not list(tmp_path.glob(".*final"))  # no temporary or old copy left
