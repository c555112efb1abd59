"""slurm/ppo_7b.sh submitted unchanged to the local Slurm with a stand-in driver
(tests/slurm/ray_probe.py): the Ray cluster comes up on loopback and is reported ready, the driver
reaches it through RAY_ADDRESS, USR1 stops the driver, the cluster is torn down and the job
requeues itself, comes up again and completes; no Ray process of the job is left behind."""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.helpers import procs_with_arg
from tests.slurm.jobs import (assert_none_alive, cancelled_unless_completed, job_id_of, preempt, sbatch, wait_ended,
                              wait_running)

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


def test_ray_cluster_up_driver_preempted_down_and_requeued(tmp_path):
    """Alone proves: slurm/ppo_7b.sh stops its driver and Ray cluster on USR1, requeues, and leaves no Ray behind."""
    log_path, ready = tmp_path / "job.out", tmp_path / "driver.pid"
    env = {"FTDIST_DRIVER": f"python tests/slurm/ray_probe.py {ready}",
           "FTDIST_RAY_HEAD_IP": "127.0.0.1", "FTDIST_RAY_PORT": str(_free_port_block()), "FTDIST_RAY_WAIT": "120"}
    job_id = job_id_of(sbatch(["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--gpus-per-node=0",
                               "--time=20", f"--output={log_path}"], env, script="slurm/ppo_7b.sh"))
    ray_tmp = f"/tmp/ray-ftdist-{job_id}"

    def context() -> str:
        return log_path.read_text()[-4000:] if log_path.exists() else "no output"

    with cancelled_unless_completed(job_id) as last:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        wait_running(job_id, ready.exists, deadline, context)
        assert procs_with_arg(ray_tmp), "no Ray processes while the driver runs"
        preempt(job_id)
        wait_ended(job_id, deadline, context, last)

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
    assert_none_alive(procs_with_arg(ray_tmp), f"Ray processes of job {job_id} after it ended")
