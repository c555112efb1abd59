"""A Ray cluster across two hosts: the head on ftnode1, a worker node joining from ftnode2 (1 CPU each, so the
two training workers land one per host). launch/ray_submit.sh runs SFT through Ray Train with a rank on each
host, to the weights of a 2-rank run on one host; killing the worker node's raylet mid-run takes its rank down,
Ray Train restarts the worker group once the node is back and the run resumes from its checkpoint to identical
weights."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
import uuid

import pytest

from tests.helpers import load_weights, max_abs_diff, read_metrics, run_ftdist
from tests.multinode.conftest import on_host
from tests.ray.jobs import (SFT_OVERRIDES, SFT_STEPS, VENV_BIN, client_env, job_client, node_env, submit, train_steps,
                            wait_job, wait_while_running)

pytestmark = pytest.mark.multinode

HEAD = "10.77.0.11"
JOB_TIMEOUT_S = 420


class Cluster:
    def __init__(self, token: str):
        self.ray = f"{VENV_BIN}/ray"
        self.token = token
        self.env = node_env(token)
        self.procs: dict[str, subprocess.Popen] = {}
        self.client_env = client_env(f"http://{HEAD}:8265", token)

    def start(self, host: str) -> None:
        # each node its own temp dir (node-local on a cluster; the hosts here share /tmp): left to default, a
        # worker node takes the head's path and its runtime-env agent, when restarted, cleans the head's
        # unpacked job files out of the shared directory. Short: Ray's socket paths must stay under 108 bytes.
        common = ["--block", "--num-cpus=1", "--num-gpus=0", f"--object-store-memory={200 * 1024 * 1024}",
                  "--disable-usage-stats", f"--temp-dir=/tmp/ftray-{host}-{os.getpid()}"]
        if host == "ftnode1":
            cmd = [self.ray, "start", "--head", f"--node-ip-address={HEAD}", "--port=6379",
                   f"--dashboard-host={HEAD}", "--dashboard-port=8265", *common]
        else:
            cmd = [self.ray, "start", f"--address={HEAD}:6379", "--node-ip-address=10.77.0.12", *common]
        self.procs[host] = on_host(host, cmd, self.env)

    def alive_nodes(self) -> int:
        r = subprocess.run([self.ray, "status", f"--address={HEAD}:6379"], capture_output=True, text=True,
                           timeout=60, env={**os.environ, **self.client_env})
        active = r.stdout.split("Active:")[1].split("Pending:")[0] if "Active:" in r.stdout else ""
        return active.count("node_")

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.alive_nodes() != n:
            for host, p in self.procs.items():
                assert p.poll() is None or host != "ftnode1", f"ray head exited:\n{p.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, f"not {n} Ray nodes in {timeout}s"
            time.sleep(1)

    def kill_worker_node(self) -> None:
        """ftnode2's raylet SIGKILLed: the node is lost with every worker on it."""
        pids = subprocess.run(["ip", "netns", "pids", "ft-ftnode2"], capture_output=True, text=True).stdout.split()
        raylet = [p for p in pids if open(f"/proc/{p}/comm").read().strip() == "raylet"]
        assert len(raylet) == 1, pids
        os.kill(int(raylet[0]), 9)

    def restart_worker_node(self) -> None:
        """ftnode2 back after kill_worker_node: a new `ray start` joins the head again."""
        self.procs["ftnode2"].wait(timeout=120)  # `ray start --block` on the node ends with its raylet
        self.wait_nodes(1)
        self.start("ftnode2")
        self.wait_nodes(2)

    def client(self):
        return job_client(f"http://{HEAD}:8265", self.token)


@pytest.fixture(scope="module")
def ray_hosts(hosts):
    cluster = Cluster(secrets.token_hex(32))
    try:
        cluster.start("ftnode1")
        cluster.wait_nodes(1)
        cluster.start("ftnode2")
        cluster.wait_nodes(2)
        yield cluster
    finally:
        for p in cluster.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in cluster.procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        for host in ("ftnode1", "ftnode2"):
            shutil.rmtree(f"/tmp/ftray-{host}-{os.getpid()}", ignore_errors=True)


@pytest.fixture(scope="module")
def straight(ray_hosts, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ray_hosts") / "run"
    sid = f"ftdist-hosts-{uuid.uuid4().hex[:8]}"
    r = submit(ray_hosts.client_env, run_dir, sid, wait=True, timeout=JOB_TIMEOUT_S)
    status = wait_job(ray_hosts.client(), sid, JOB_TIMEOUT_S)
    logs = ray_hosts.client().get_job_logs(sid)
    assert r.returncode == 0 and status == "SUCCEEDED", f"{status}\n{r.stderr[-3000:]}\n{logs[-6000:]}"
    return run_dir, logs


def test_ray_train_ranks_on_both_hosts(straight, tmp_path):
    """Alone proves: Ray Train places SFT's ranks on two hosts and trains the weights of 2 ranks on one host."""
    run_dir, logs = straight
    assert "sft on Ray: 2 worker(s) (CPU)" in logs
    assert re.search(r"process group: 2 ranks \(gloo\) on 2 hosts: ftnode\d \(10\.77\.0\.1\d\) rank 0; "
                     r"ftnode\d \(10\.77\.0\.1\d\) rank 1", logs), logs[-4000:]
    assert train_steps(run_dir) == list(range(1, SFT_STEPS + 1))
    one = tmp_path / "one_host"
    run_ftdist(2, "sft_tiny", [f"output_dir={one}", *SFT_OVERRIDES])
    # the same 2 ranks and the same fp32 operations, whichever host each runs on: within the 1e-5 asked for
    assert max_abs_diff(load_weights(run_dir / "final"), load_weights(one / "final")) <= 1e-5


def test_lost_worker_node_restarts_the_group_from_the_checkpoint(ray_hosts, straight, tmp_path):
    """Alone proves: a Ray Train worker lost mid-run (here with its node) restarts the group from the checkpoint.

    Ray Train starts a new worker group once the node is back, the loop resumes from the step-2 checkpoint and
    the job ends with the weights of the uninterrupted job, bit for bit."""
    run_dir, pid_dir = tmp_path / "run", tmp_path / "pids"
    sid = f"ftdist-nodekill-{uuid.uuid4().hex[:8]}"
    # every rank waits after the step-2 checkpoint, so the node is lost at a known point
    r = submit(ray_hosts.client_env, run_dir, sid, wait=False, timeout=JOB_TIMEOUT_S,
               env={"FTDIST_HANG_AFTER_CHECKPOINT": "2", "FTDIST_PID_DIR": str(pid_dir)})
    assert r.returncode == 0, r.stderr
    client = ray_hosts.client()
    manifest = run_dir / "checkpoints" / "step-2" / "manifest.json"
    wait_while_running(client, sid, lambda: manifest.exists() and len(list(pid_dir.glob("rank*.pid"))) == 2,
                       JOB_TIMEOUT_S)
    time.sleep(1.0)  # past the checkpoint's last barrier, waiting
    on_node2 = set(subprocess.run(["ip", "netns", "pids", "ft-ftnode2"], capture_output=True, text=True).stdout.split())
    victims = {f.name: f.read_text().strip() for f in pid_dir.glob("rank*.pid") if f.read_text().strip() in on_node2}
    assert len(victims) == 1, (victims, on_node2)  # one worker per host
    ray_hosts.kill_worker_node()
    # the group cannot fit on the head alone (1 CPU for 2 workers): it waits until the node is back
    ray_hosts.restart_worker_node()
    status = wait_job(client, sid, JOB_TIMEOUT_S)
    logs = client.get_job_logs(sid)
    assert status == "SUCCEEDED", logs[-6000:]
    [(rank_file, victim)] = victims.items()
    assert (pid_dir / rank_file).read_text().strip() != victim  # a new worker group ran
    assert re.search(r"resumed from \S*step-2 at step 2\b", logs), logs[-6000:]
    # steps 1-2 from the first group, 3-6 after the restart, each once
    assert train_steps(run_dir) == list(range(1, SFT_STEPS + 1))
    # restored state, then the same fp32 operations in the same order as the straight run: bit-identical
    assert max_abs_diff(load_weights(run_dir / "final"), load_weights(straight[0] / "final")) == 0.0


def test_grpo_groups_on_both_hosts_lose_a_node_and_resume(ray_hosts, ppo_warm, tmp_path):
    """Alone proves: GRPO's groups placed on two hosts by ppo.resources; a lost node stops the driver, which resumes.

    GRPO submitted to the cluster with the policy's 2 ranks pinned to ftnode1 and the reference and reward
    actors to ftnode2 (ppo.resources with Ray's node:IP resources): the run log and metrics.jsonl show that
    placement. The worker node is then lost mid-run: the driver stops with one line naming the group, rank and
    host of the dead actor (it does not restart groups itself) and keeps the newest complete checkpoint; with
    the node back, the same submission resumes from it, and over the whole run the reward of the SFT-warmed
    policy rises as on one host (the threshold of tests/ray/test_ppo.py)."""
    import json

    from tests.ray.test_ppo import COMMON, ITERATIONS

    pin = {"policy": {f"node:{HEAD}": 0.01}, "ref": {"node:10.77.0.12": 0.01}, "reward": {"node:10.77.0.12": 0.01}}
    out = tmp_path / "grpo"
    overrides = [f"model.name_or_path={ppo_warm['policy']}", f"data.train={ppo_warm['pool']}", *COMMON,
                 "ppo.kl_estimator=k3", "checkpoint.every_steps=2", "dist.backend=gloo",
                 f"ppo.resources={json.dumps(pin)}"]

    def submit_grpo(sid: str, env: dict):
        r = submit(ray_hosts.client_env, out, sid, wait=False, env=env, recipe="grpo_tiny", overrides=overrides,
                   workers=None, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]

    client = ray_hosts.client()
    sid = f"ftdist-grpo-{uuid.uuid4().hex[:8]}"
    submit_grpo(sid, {"FTDIST_STEP_DELAY_S": "1"})  # iterations of at least 1 s: the node goes between two of them
    wait_while_running(client, sid, (out / "checkpoints" / "step-4" / "manifest.json").exists, JOB_TIMEOUT_S)
    ray_hosts.kill_worker_node()
    status = wait_job(client, sid, JOB_TIMEOUT_S)
    logs = client.get_job_logs(sid)
    assert status == "FAILED", logs[-6000:]
    assert ("placement: policy on ftnode1 (10.77.0.11) ranks 0-1; ref on ftnode2 (10.77.0.12) rank 0; "
            "reward on ftnode2 (10.77.0.12) rank 0") in logs, logs[-6000:]
    placement = {"placement/policy": "ftnode1 (10.77.0.11) ranks 0-1", "placement/ref": "ftnode2 (10.77.0.12) rank 0",
                 "placement/reward": "ftnode2 (10.77.0.12) rank 0"}
    assert {k: v for k, v in read_metrics(out)[0].items() if k.startswith("placement/")} == placement
    assert re.search(r"ftdist: error: (ref|reward) rank 0: \w+: the actor died on ftnode2 \(10\.77\.0\.12\) .*"
                     r"run the same command again to resume from it", logs), logs[-6000:]
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")
                   if (p / "manifest.json").exists())
    assert 4 <= saved[-1] < ITERATIONS

    ray_hosts.restart_worker_node()
    sid = f"ftdist-grpo-again-{uuid.uuid4().hex[:8]}"
    submit_grpo(sid, {})
    status = wait_job(client, sid, JOB_TIMEOUT_S)
    logs = client.get_job_logs(sid)
    assert status == "SUCCEEDED", logs[-6000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{saved[-1]}'} at iteration {saved[-1]}" in logs, logs[-4000:]
    rewards = [r["reward_mean"] for r in read_metrics(out) if "reward_mean" in r]
    assert len(rewards) == ITERATIONS  # each iteration once: the first run's, then the resumed run's
    assert sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3 > 0.08, [round(x, 3) for x in rewards]
