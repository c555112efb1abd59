"""torchrun across two hosts (network namespaces with their own address, hostname and TMPDIR): SFT under ZeRO-2
and ZeRO-3 on 2 hosts x 2 ranks trains the weights of 4 ranks on one host, the ranks talk over the hosts'
addresses (not loopback), and a host that never joins ends the run within dist.timeout_s with a message
saying so."""

from __future__ import annotations

import re
import sys
import time

import pytest

from tests.helpers import load_weights, max_abs_diff, run_ftdist
from tests.multinode.conftest import on_host

pytestmark = pytest.mark.multinode

RECIPE = ["train.max_steps=4", "train.micro_batch_size=8", "train.progress_bar=false", "data.eval=null", "checkpoint.every_steps=2",
          "checkpoint.keep_last=0", "dist.backend=gloo", "dist.timeout_s=120"]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(__import__("tests.helpers").helpers.ROOT)}


def _torchrun_on_hosts(hosts: dict, run_dir, overrides: list[str], nproc: int = 2, timeout: float = 300):
    """The same torchrun command on every host (c10d rendezvous at the first host), as a user starts it."""
    first = next(iter(hosts))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)), "--nproc_per_node",
           str(nproc), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{first}:29400",
           "--rdzv_id", f"ftdist-{run_dir.name}", "-m", "ftdist", "train", "sft_tiny", f"output_dir={run_dir}",
           *overrides]
    procs = {h: on_host(h, cmd, ENV) for h in hosts}
    out = {}
    for h, p in procs.items():
        stdout, stderr = p.communicate(timeout=timeout)
        out[h] = (p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("zero", [2, 3])
def test_two_hosts_train_the_weights_of_one(hosts, tmp_path, zero):
    overrides = [*RECIPE, f"deepspeed.zero_stage={zero}"]
    run = tmp_path / "two_hosts"
    result = _torchrun_on_hosts(hosts, run, overrides)
    for h, (rc, _, err) in result.items():
        assert rc == 0, f"{h} exited {rc}\n{err[-6000:]}"
    log = result["ftnode1"][2]
    # the process group's own view: each rank published its host and the address its traffic leaves from
    assert ("process group: 4 ranks (gloo) on 2 hosts: ftnode1 (10.77.0.11) ranks 0-1; "
            "ftnode2 (10.77.0.12) ranks 2-3") in log, log[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]

    one = tmp_path / "one_host"
    run_ftdist(4, "sft_tiny", [f"output_dir={one}", *overrides])
    # the same 4 ranks with the same partitions, micro-batches and gloo reductions (whose order follows the
    # ranks, not the hosts): identical fp32 arithmetic, so the weights agree far inside the 1e-5 asked for
    assert max_abs_diff(load_weights(run / "final"), load_weights(one / "final")) <= 1e-5


def test_a_host_that_never_joins_times_out_naming_it(hosts, tmp_path):
    """Ranks started as srun starts them (RANK, WORLD_SIZE, MASTER_ADDR given), the second host's never: rank 0
    stops after dist.timeout_s saying how many ranks came and where; a rank whose master never came says it
    could not reach it."""
    timeout_s = 10
    env = {**ENV, "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "ftnode1", "MASTER_PORT": "29511"}
    args = [sys.executable, "-m", "ftdist", "train", "sft_tiny", f"output_dir={tmp_path / 'run'}",
            f"dist.timeout_s={timeout_s}"]
    t0 = time.monotonic()
    p = on_host("ftnode1", args, {**env, "RANK": "0"})
    _, err = p.communicate(timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 1, err[-3000:]
    assert re.search(r"ftdist: error: only 1 of 2 ranks reached the rendezvous at ftnode1:29511 within "
                     r"dist.timeout_s=10s", err), err[-3000:]
    assert "Traceback" not in err
    # python and torch start in a few seconds; the wait itself is the 10 s timeout
    assert took < timeout_s + 60

    p = on_host("ftnode2", args, {**env, "RANK": "1"})
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "rank 1 of 2 on ftnode2 could not reach the rendezvous at ftnode1:29511" in err, \
        err[-3000:]
