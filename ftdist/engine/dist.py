"""Process group from the launcher's environment: torchrun, the deepspeed launcher,
srun (Slurm), Ray, or nothing (one plain process)."""

from __future__ import annotations

import datetime
import os
import pickle
import re
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ftdist.errors import RunError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """'gpu[003-005,009],cpu1' -> 'gpu003' (what `scontrol show hostnames` would print first)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_from_launcher() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from whichever launcher started us."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return  # torchrun, the deepspeed launcher, Ray Train or an ftdist actor group
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_ADDR", first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "localhost")))
        # a port derived from the job id: every task computes the same one, concurrent jobs differ
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


class RendezvousError(RunError):
    """The ranks did not all meet within dist.timeout_s: the message says how many did, where, and what to check."""


def init_distributed(backend: str = "auto", timeout_s: int = 1800) -> DistInfo:
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        env_from_launcher()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:  # DistStoreError, DistNetworkError
            raise RendezvousError(_rendezvous_failure(e, timeout_s)) from None
    _timeout_for_new_groups(datetime.timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
    if info.world_size > 1:
        _publish_host(info.rank)
    return info


def _rendezvous_failure(exc: BaseException, timeout_s: int) -> str:
    """One line for a process group that did not form: how many ranks joined (torch's store says), this rank's
    host and the address every rank must reach."""
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    world, rank = os.environ.get("WORLD_SIZE", "?"), os.environ.get("RANK", "?")
    text = " ".join(str(exc).split())
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    if joined:
        what = (f"only {joined.group(1)} of {joined.group(2)} ranks reached the rendezvous at {where} within "
                f"dist.timeout_s={timeout_s}s; the others never started or cannot reach {where} (is their "
                f"node's launcher running, and does MASTER_ADDR resolve to an address they can reach?)")
    elif "timed out" in text.lower() or "timeout" in text.lower() or "connect" in text.lower():
        what = (f"rank {rank} of {world} on {socket.gethostname()} could not reach the rendezvous at {where} within "
                f"dist.timeout_s={timeout_s}s (rank 0's node not started, or {os.environ.get('MASTER_ADDR')} is "
                f"not reachable from here)")
    else:
        return f"the process group did not form (rank {rank} of {world}, rendezvous {where}): {text[:300]}"
    return what


def _source_address() -> str:
    """The local address this host's traffic to MASTER_ADDR leaves from (the route the kernel picks; no packet
    is sent): loopback on one host, the node's own interface across hosts."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))))
            return s.getsockname()[0]
    except OSError:
        return "?"


def _publish_host(rank: int) -> None:
    """This rank's host name and address in the rendezvous store, for rank_hosts() and failure messages."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"ftdist/host/{rank}", f"{socket.gethostname()} {_source_address()}")
    except Exception:  # informational only
        pass


def rank_hosts() -> list[tuple[str, str]]:
    """(host name, address) of every rank, as each rank published it at start-up ([] where unknown)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [(socket.gethostname(), "local")]
    try:
        store = dist.distributed_c10d._get_default_store()
        out = []
        for r in range(dist.get_world_size()):
            name, _, addr = store.get(f"ftdist/host/{r}").decode().partition(" ")
            out.append((name, addr))
        return out
    except Exception:
        return []


def placement_summary(hosts: list[tuple[str, str]]) -> str:
    """'2 hosts: ftnode1 (10.77.0.11) ranks 0-1; ftnode2 (10.77.0.12) ranks 2-3'."""
    by: dict[tuple[str, str], list[int]] = {}
    for r, h in enumerate(hosts):
        by.setdefault(h, []).append(r)

    def ranks(rs: list[int]) -> str:
        return f"{rs[0]}-{rs[-1]}" if len(rs) > 1 and rs == list(range(rs[0], rs[-1] + 1)) else ",".join(map(str, rs))

    parts = [f"{name} ({addr}) rank{'s' if len(rs) > 1 else ''} {ranks(rs)}" for (name, addr), rs in by.items()]
    return f"{len(by)} host{'s' if len(by) > 1 else ''}: " + "; ".join(parts)


def _timeout_for_new_groups(timeout: datetime.timedelta) -> None:
    # DeepSpeed builds its own groups (ZeRO reduces over a clone of the world group) with
    # dist.new_group(), which takes torch's 30-minute default rather than the default group's
    # timeout: a dead peer would still stall a ZeRO collective for 30 minutes without this
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if c10d.default_pg_nccl_timeout is not None:
        c10d.default_pg_nccl_timeout = timeout


def device_for(info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_sum(values, device) -> list[float]:
    """Sums over all ranks of numbers or 0-d tensors (left where they are until here: this is the one host
    sync), as float64."""
    if all(isinstance(v, (int, float)) for v in values):
        t = torch.tensor(values, dtype=torch.float64, device=device)
    else:
        t = torch.stack([torch.as_tensor(v).detach().to(device, torch.float64).reshape(()) for v in values])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def rank_batches(n: int, batch_size: int, info: DistInfo) -> list[list[int]]:
    """This rank's share of n items (every world_size-th), in batches of batch_size.

    Every rank gets the same number of batches, because a ZeRO-3 forward or generate call is collective
    (each one gathers weights from all ranks); a rank with fewer items gets empty batches at the end, for
    which the caller runs a throw-away forward on any item.
    """
    mine = list(range(info.rank, n, info.world_size))
    per_rank = -(-n // info.world_size)
    return [mine[k * batch_size:(k + 1) * batch_size] for k in range(-(-per_rank // batch_size))]


def gather_to_main(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on rank 0; [] on the other ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def from_main(obj):
    """Rank 0's `obj` on every rank (rank 0 decides, e.g. which checkpoint to resume)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_main_results = 0


def run_on_main_then_others(main_fn, others_fn=None, poll_s: float = 0.5, ack_timeout_s: float = 60.0):
    """main_fn() on rank 0 while the other ranks wait, then others_fn() on them (e.g. tokenise and cache, then
    read the cache); returns this rank's result. The others wait through the rendezvous store, not a collective,
    so no process-group timeout limits how long rank 0 may take; an exception on rank 0 is re-raised on every
    rank as the same type and message (no rank is left waiting; rank 0 keeps the store, which lives in its
    process, until every rank has read the error or ack_timeout_s passed), a dead rank 0 ends the wait when the
    store goes with it (or the launcher stops the job)."""
    global _main_results
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return main_fn()
    _main_results += 1
    key = f"ftdist/main/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_main_results}"
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 0:
        try:
            out = main_fn()
        except Exception as e:
            try:
                store.set(key, pickle.dumps(e))
            except Exception:  # an exception that does not pickle: its type and message
                store.set(key, pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}")))
            _wait_until_read(store, key, dist.get_world_size() - 1, ack_timeout_s)
            raise
        store.set(key, b"ok")
        return out
    import time

    while not store.check([key]):
        time.sleep(poll_s)
    answer = store.get(key)
    if answer != b"ok":
        store.add(f"{key}/read", 1)  # rank 0 holds the store (and so its own exit) until every rank has read it
        raise pickle.loads(answer)
    return others_fn() if others_fn is not None else None


def _wait_until_read(store, key: str, readers: int, timeout_s: float, poll_s: float = 0.05) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while store.add(f"{key}/read", 0) < readers and time.monotonic() < deadline:
        time.sleep(poll_s)


def destroy_process_group() -> None:
    """End this process's process group, and DeepSpeed's references to its groups with it when DeepSpeed used
    it (a later run in the same process, e.g. a notebook's second `train`, would otherwise find DeepSpeed holding
    the destroyed group)."""
    import sys

    if not (dist.is_available() and dist.is_initialized()):
        return
    comm = sys.modules.get("deepspeed.comm.comm")
    try:
        if comm is not None and comm.cdb is not None:
            comm.destroy_process_group()
        else:
            dist.destroy_process_group()
    except Exception:
        pass


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def collective_failure(exc: BaseException, timeout_s: int) -> str | None:
    """A readable message when `exc` is a collective that timed out or lost a peer, else None.

    Gloo raises plain RuntimeErrors ("Connection closed by peer ...", "Timed out waiting
    15000ms for recv ..."), NCCL a DistBackendError; neither says which rank is missing, so the
    surviving ranks check in through the rendezvous store and name the ones that do not.
    """
    if not (dist.is_available() and dist.is_initialized()) or not isinstance(exc, RuntimeError):
        return None
    text = str(exc).lower()
    if not (isinstance(exc, dist.DistError) or "gloo" in text or "nccl" in text or "connection" in text):
        return None
    missing = unresponsive_ranks(wait_s=min(10.0, float(timeout_s)))
    if missing is None:
        who = "the rendezvous store is unreachable: rank 0 died?"
    elif missing:
        hosts = rank_hosts()
        named = [f"{r} ({hosts[r][0]})" if r < len(hosts) else str(r) for r in missing]
        who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(named)} died?"
        lost = {hosts[r][0] for r in missing if r < len(hosts)}
        alive = {h for r, (h, _) in enumerate(hosts) if r not in missing}
        if lost and not lost & alive:  # whole hosts gone: a node down, not a crashed rank
            who = f"{who[:-1]}: every rank on {', '.join(sorted(lost))} is gone (node down?)"
    else:
        who = "every rank is alive: one may be far slower; raise dist.timeout_s?"
    if "timed out" in text or "timeout" in text:
        return f"a collective timed out after {timeout_s}s waiting for other ranks ({who})"
    return f"a collective failed: lost the connection to another rank ({who})"


def unresponsive_ranks(wait_s: float) -> list[int] | None:
    """Ranks that do not check in through the store within wait_s (dead or hung); None when the
    store itself is unreachable (it lives in rank 0, or in the torchrun agent)."""
    import time

    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=wait_s))
        # torchrun restarts reuse the agent's store: keep one attempt's check-ins apart
        prefix = f"ftdist/alive/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        store.set(prefix + str(dist.get_rank()), "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(dist.get_world_size()) if not store.check([prefix + str(r)])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.5)
    except Exception:  # the store went away with its host
        return None
