"""slurm/ppo_7b.sh submitted unchanged to the local Slurm with a stand-in driver
(tests/slurm/ray_probe.py): the Ray cluster comes up on loopback and is reported ready, the driver
reaches it through RAY_ADDRESS, USR1 stops the driver, the cluster is torn down and the job
requeues itself, comes up again and completes; no Ray process of the job is left behind."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 300


def _free_port_block(n: int = 9) -> int:
    for base in range(31000, 40000, 10):
        try:
            socks = []
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def _job_info(job_id: str) -> dict[str, str] | None:
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 or "JobId=" not in r.stdout:
        return None
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", r.stdout))


def _procs_with_arg(needle: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle.encode() in cmdline and state != b"Z":
            found.append(int(entry))
    return found


def test_ray_cluster_up_driver_preempted_down_and_requeued(tmp_path):
    log_path, ready = tmp_path / "job.out", tmp_path / "driver.pid"
    env = {**os.environ, "FTDIST_DRIVER": f"python tests/slurm/ray_probe.py {ready}",
           "FTDIST_RAY_HEAD_IP": "127.0.0.1", "FTDIST_RAY_PORT": str(_free_port_block()), "FTDIST_RAY_WAIT": "120"}
    r = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2",
                        "--gpus-per-node=0", "--time=20", f"--output={log_path}", "slurm/ppo_7b.sh"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    ray_tmp = f"/tmp/ray-ftdist-{job_id}"
    last: dict[str, str] = {}
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not ready.exists():
            assert time.monotonic() < deadline, log_path.read_text()[-4000:] if log_path.exists() else "no output"
            info = _job_info(job_id)
            assert info is None or info["JobState"] in ("PENDING", "RUNNING"), (info, log_path.read_text()[-4000:])
            time.sleep(0.3)
        assert _procs_with_arg(ray_tmp), "no Ray processes while the driver runs"
        sig = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], capture_output=True, text=True)
        assert sig.returncode == 0, sig.stderr
        while True:
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            info = _job_info(job_id)
            if info is None:
                break
            last = info
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                break
            time.sleep(0.25)
    finally:
        if _job_info(job_id) is not None and last.get("JobState") != "COMPLETED":
            subprocess.run(["scancel", job_id])

    log = log_path.read_text()
    assert last.get("JobState") == "COMPLETED" and last.get("Restarts") == "1", (last, log[-6000:])
    probes = re.findall(r"probe: restart=(\d) address=(\S+) nodes=(\d+) node_ip=(\S+) cpus=(\d+)", log)
    assert [p[0] for p in probes] == ["0", "1"], log[-6000:]
    for _, address, nodes, node_ip, cpus in probes:
        assert address.startswith("127.0.0.1:") and nodes == "1" and node_ip == "127.0.0.1" and cpus == "2"
    assert log.count("ray_wait: 1 node(s) up") == 2
    assert "probe: stop=True" in log and "requeueing job" in log
    assert log.count("stopping the Ray cluster") == 2
    time.sleep(2)
    leftovers = _procs_with_arg(ray_tmp)
    for pid in leftovers:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert not leftovers, f"Ray processes of job {job_id} still alive after it ended: {leftovers}"
