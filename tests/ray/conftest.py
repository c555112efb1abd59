"""A real local Ray head for the tests in tests/ray/: 127.0.0.1 only, dashboard on loopback. One per session:
the jobs of tests/ray/test_ray_submit.py run on it and the PPO/GRPO drivers of tests/ray/test_ppo.py join it (one
starts a local Ray of its own, as a driver without RAY_ADDRESS does).

Each session gets its own temp dir, free ports and authentication token, so that it can run
next to other Ray clusters on the same machine (Ray enables token authentication when
~/.ray/auth_token exists; a shared token file could change under the tests). `ray stop` would kill every Ray on the machine, so the head runs
as `ray start --block` and is stopped with SIGTERM (it then stops the processes it started);
whatever still runs with this session's temp dir on its command line is killed after that.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, procs_with_arg
from tests.ray.jobs import VENV_BIN, client_env, job_client, node_env

START_TIMEOUT_S = 120


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def listening_sockets(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds."""
    import ipaddress

    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(raw)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            out.append((str(addr), int(hex_port, 16)))
    return out


class RayHead:
    def __init__(self, temp_dir: str, dashboard: str, gcs: str, token: str, proc: subprocess.Popen, log: Path):
        self.temp_dir, self.dashboard, self.proc, self.log = temp_dir, dashboard, proc, log
        self._token = token
        # what a shell that talks to this cluster needs (ray job submit, launch/ray_submit.sh)
        self.env = client_env(dashboard, token)
        # what a driver that joins this cluster needs (`ftdist train` of PPO/GRPO: ray.init(RAY_ADDRESS)); without
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray swaps 127.0.0.1 for the machine's address, where the head is not
        self.driver_env = {**self.env, "RAY_ADDRESS": gcs, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def listening_sockets(self) -> list[tuple[str, int]]:
        return listening_sockets(procs_with_arg(self.temp_dir))

    def client(self):
        return job_client(self.dashboard, self._token)


@pytest.fixture(scope="session")
def ray_head():
    # short: Ray's unix socket paths under the temp dir must stay below 108 characters
    temp_dir = tempfile.mkdtemp(prefix="ftray-", dir="/tmp")
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = _free_ports(9)
    # the job entrypoint's `python` comes from the PATH that the head was started with
    token = secrets.token_hex(32)
    env = {**os.environ, **node_env(token),
           # a one-node cluster: without this Ray swaps 127.0.0.1 for the machine's address and
           # listens on every interface
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log = Path(temp_dir) / "ray-start.log"
    cmd = [f"{VENV_BIN}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
           f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", "--num-cpus=4", "--num-gpus=0",
           f"--object-store-memory={200 * 1024 * 1024}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    head = RayHead(temp_dir, f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", token, proc, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"Ray head not up in {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}"
            try:
                head.client().list_jobs()
                break
            except Exception:
                time.sleep(1)
        yield head
    finally:
        _stop(head)


def _stop(head: RayHead) -> None:
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
        try:
            head.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.proc.kill()
            head.proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while procs_with_arg(head.temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in procs_with_arg(head.temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(head.temp_dir, ignore_errors=True)
