"""A stand-in PPO driver for tests/slurm/test_sbatch_ppo.py: connects to the cluster at RAY_ADDRESS,
runs a task on it, reports what it saw; in the first run of the job it then waits for USR1 and
exits 3 as a driver that checkpointed would, in the requeued run it exits 0."""

import os
import signal
import sys
import time
from pathlib import Path

import ray

ray.init(logging_level="ERROR", log_to_driver=False)


@ray.remote(num_cpus=1)
def where() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"


nodes = [n for n in ray.nodes() if n["Alive"]]
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
print(f"probe: restart={restart} address={os.environ['RAY_ADDRESS']} nodes={len(nodes)} "
      f"node_ip={nodes[0]['NodeManagerAddress']} cpus={int(ray.cluster_resources()['CPU'])} "
      f"task_on={ray.get(where.remote())}", flush=True)
if restart > 0:
    sys.exit(0)
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
Path(sys.argv[1]).write_text(str(os.getpid()))
deadline = time.monotonic() + 300
while not stop and time.monotonic() < deadline:
    time.sleep(0.2)
print(f"probe: stop={bool(stop)}", flush=True)
sys.exit(3 if stop else 1)
