"""torchrun across two hosts (network namespaces with their own address, hostname and TMPDIR): SFT under ZeRO-3
on 2 hosts x 2 ranks trains the weights of 4 ranks on one host, the ranks talk over the hosts' addresses (not
loopback), and a host that never joins ends the run within dist.timeout_s with a message saying so. ZeRO-2 across
hosts (the default stage) is trained by every other multi-host test (tests/multinode/test_ray.py against one
host, test_slurm.py, the deepspeed launcher below); that the stages train the same weights is proven on one host
by tests/dist/test_sft_equivalence.py."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import load_weights, max_abs_diff, run_ftdist
from tests.multinode.conftest import on_host

pytestmark = pytest.mark.multinode

RECIPE = ["train.max_steps=4", "train.micro_batch_size=8", "train.progress_bar=false", "data.eval=null", "checkpoint.every_steps=2",
          "checkpoint.keep_last=0", "dist.backend=gloo", "dist.timeout_s=120"]
PLACEMENT_2 = "process group: 2 ranks (gloo) on 2 hosts: ftnode1 (10.77.0.11) rank 0; ftnode2 (10.77.0.12) rank 1"
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


def test_two_hosts_train_the_weights_of_one(hosts, tmp_path):
    """Alone proves: torchrun's c10d rendezvous over 2 hosts x 2 ranks under ZeRO-3 trains the weights of one host.

    ZeRO-3: every forward and backward gathers each layer's partitions from all 4 ranks over the hosts' addresses,
    and final/ is gathered from the partitions of both hosts."""
    overrides = [*RECIPE, "deepspeed.zero_stage=3"]
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
    """Alone proves: a host that never joins ends the run within dist.timeout_s, the message naming the rendezvous.

    Ranks started as srun starts them (RANK, WORLD_SIZE, MASTER_ADDR given), the second host's never: rank 0
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


def test_deepspeed_launcher_with_a_hostfile(hosts, tmp_path):
    """Alone proves: the deepspeed launcher forms one process group over two hosts, by pdsh/ssh and by --no_ssh.

    The deepspeed launcher across the two hosts from a hostfile, both ways it can start remote ranks: pdsh over
    ssh from one command on the first host (an sshd per host, launch/local_cluster.sh sshd), and --no_ssh with
    the same command on each host (--node_rank). Both form one process group over the hosts' addresses and do
    the same fp32 operations in the same order on the same 2 ranks: identical weights."""
    from tests.multinode.conftest import cluster

    up = cluster("sshd", timeout=300)  # installs openssh-server and pdsh the first time
    assert up.returncode == 0, up.stderr[-3000:]
    ssh_args = re.search(r'PDSH_SSH_ARGS_APPEND="([^"]+)"', up.stdout).group(1)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("ftnode1 slots=1\nftnode2 slots=1\n")
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    train = ["--module", "ftdist", "train", "sft_tiny", *RECIPE, "train.micro_batch_size=16"]

    # what pdsh's remote shells get besides the launcher's own exports: the suite's one thread and MKL path
    env_file = tmp_path / "deepspeed_env"
    env_file.write_text(f"OMP_NUM_THREADS=1\nMKL_CBWR={os.environ.get('MKL_CBWR', 'AUTO,STRICT')}\n")
    pdsh = on_host("ftnode1", [deepspeed, "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "ftnode1",
                               "--master_port", "29602", *train, f"output_dir={tmp_path / 'pdsh'}"],
                   {**ENV, "PATH": path, "PDSH_SSH_ARGS_APPEND": ssh_args, "DS_ENV_FILE": str(env_file)})
    out, err = pdsh.communicate(timeout=300)
    assert pdsh.returncode == 0, (out + err)[-6000:]
    assert "cmd = pdsh -S -f 1024 -w ftnode1,ftnode2" in out + err
    assert PLACEMENT_2 in out + err, (out + err)[-3000:]

    procs = [on_host(h, [deepspeed, "--hostfile", str(hostfile), "--no_ssh", f"--node_rank={k}", "--master_addr",
                         "ftnode1", "--master_port", "29603", *train, f"output_dir={tmp_path / 'no_ssh'}"],
                     {**ENV, "PATH": path}) for k, h in enumerate(["ftnode1", "ftnode2"])]
    logs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [(o + e)[-3000:] for o, e in logs]
    assert PLACEMENT_2 in logs[0][1]
    assert max_abs_diff(load_weights(tmp_path / "pdsh" / "final"), load_weights(tmp_path / "no_ssh" / "final")) == 0.0
