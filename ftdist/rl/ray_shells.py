"""Ray: thin actor shells around the in-process workers, actor groups in placement groups, connecting.

The only module of ftdist.rl that imports ray. An actor holds one worker
(workers.py) and forwards method calls to it; it knows nothing about PPO.

An ActorGroup is N such actors, one per bundle of a placement group, forming one
process group: rank 0 picks an address and a free port on its node, every member
gets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE before its worker calls
init_distributed, so each group is its own DeepSpeed world. Groups that share
devices (colocation) take fractions of the same bundles: on GPUs each member of
k colocated groups asks for 1/k of its bundle's GPU.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ftdist.config import colocated_sets, ppo_groups
from ftdist.run.lifecycle import RunFailure

log = logging.getLogger("ftdist")

# driver environment the workers need as well (cache of the tiny model, offline hub, thread counts)
_PASS_ENV = ("FTDIST_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
             "TOKENIZERS_PARALLELISM", "PYTHONPATH", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")
PG_TIMEOUT_S = 300
# a launcher's process-group variables that must not reach the groups' own process groups: a driver started
# under torchrun passes TORCHELASTIC_USE_AGENT_STORE on to Ray's workers, and rank 0 of a group would then
# wait for an elastic agent's store that does not exist
_LAUNCHER_ENV_PREFIXES = ("TORCHELASTIC_", "GROUP_", "ROLE_", "LOCAL_WORLD_SIZE", "OMPI_", "PMI_", "SLURM_PROCID",
                          "SLURM_NTASKS", "SLURM_LOCALID")


@ray.remote
class WorkerActor:
    """One rank of a group: builds its worker once the group's rendezvous address is known."""

    def __init__(self):
        self.worker = None

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a port free on it: rank 0 of the group hosts the rendezvous."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def where(self) -> tuple[str, str]:
        """(host name, node address) of this actor."""
        return socket.gethostname(), ray.util.get_node_ip_address()

    def start(self, env: dict, role: str, cfg) -> bool:
        for key in [k for k in os.environ if k.startswith(_LAUNCHER_ENV_PREFIXES)]:
            del os.environ[key]
        os.environ.update(env)
        from ftdist.rl.workers import WORKERS

        self.worker = WORKERS[role](cfg)
        return True

    def call(self, method: str, *args, **kwargs) -> Any:
        return getattr(self.worker, method)(*args, **kwargs)


@dataclass
class Placement:
    """Where a group's actors go: bundle i of `pg` for rank i, with these resources per actor."""

    pg: Any
    num_cpus: float
    num_gpus: float


class ActorGroup:
    """N actors of one role; `run` calls a method on all of them (one shard each, or the same arguments)."""

    def __init__(self, role: str, n: int, placement: Placement, concurrency: int = 1):
        self.role, self.size = role, n
        strategy = [PlacementGroupSchedulingStrategy(placement_group=placement.pg, placement_group_bundle_index=i)
                    for i in range(n)]
        # concurrency 2 (the policy with ppo.async_rollouts): a rollout runs in a second thread beside the update
        self.actors = [WorkerActor.options(num_cpus=placement.num_cpus, num_gpus=placement.num_gpus,
                                           scheduling_strategy=strategy[i], max_concurrency=concurrency).remote()
                       for i in range(n)]
        self._ready: list = []
        self.hosts: list[tuple[str, str]] = []  # (host name, address) of each rank, once group_placement ran

    def start(self, cfg) -> list:
        """Start the workers (returns refs: they finish together once the process group has formed)."""
        addr, port = ray.get(self.actors[0].rendezvous_address.remote())
        base = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
        self._ready = [a.start.remote({**base, "MASTER_ADDR": addr, "MASTER_PORT": str(port), "RANK": str(i),
                                       "WORLD_SIZE": str(self.size), "LOCAL_RANK": "0"}, self.role, cfg)
                       for i, a in enumerate(self.actors)]
        return self._ready

    def run(self, method: str, *args, **kwargs) -> "Calls":
        """The same call on every member."""
        return Calls(self.role, method, [a.call.remote(method, *args, **kwargs) for a in self.actors], self.hosts)

    def map(self, method: str, shards: list, *args, **kwargs) -> "Calls":
        """Member i gets shards[i] as first argument."""
        assert len(shards) == self.size, (self.role, len(shards), self.size)
        return Calls(self.role, method, [a.call.remote(method, shard, *args, **kwargs)
                                         for a, shard in zip(self.actors, shards)], self.hosts)

    def starmap(self, method: str, args: list[tuple]) -> "Calls":
        """Member i is called with *args[i]."""
        assert len(args) == self.size, (self.role, len(args), self.size)
        return Calls(self.role, method, [a.call.remote(method, *a_args) for a, a_args in zip(self.actors, args)],
                     self.hosts)

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a)


@dataclass
class Calls:
    """One call on every member of a group: its object refs in rank order."""

    role: str
    method: str
    refs: list
    hosts: list = field(default_factory=list)  # (host name, address) per rank, where known


CALL_LIMIT = ("ppo.call_timeout_s", "a reward function that never returns, or a stuck collective?")
# the workers' start: spawning, imports, model loading and the process group, which takes what loading takes (a
# large model from network storage: minutes), not what a call takes; a rank that never joins the process group
# fails in the actors after dist.timeout_s, so the driver waits as long
START_LIMIT = ("dist.timeout_s", "a rank that never joined its process group, or a model load that never ended?")


def get(*calls: Calls, timeout_s: float = 0.0, limit: tuple[str, str] = CALL_LIMIT) -> list:
    """The results of one or more groups' calls, in order, waiting at most timeout_s (0 = no limit) in all;
    `limit`: the key that sets timeout_s and the likely cause, named when it runs out.

    A failure is one line naming the group, the rank, the call and the cause (the actor's traceback is kept
    in the error's details); a problem the user can fix (ConfigError, DataError, ...) is re-raised as itself.
    """
    deadline = time.monotonic() + timeout_s if timeout_s else None
    out = []
    for c in calls:
        for rank, ref in enumerate(c.refs):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            where = f"{c.role} rank {rank}: {c.method}"
            try:
                out.append(ray.get(ref, timeout=left))
            except ray.exceptions.GetTimeoutError:
                raise RunFailure(f"{where} gave no answer within {limit[0]}={timeout_s:g}s ({limit[1]})") from None
            except ray.exceptions.RayTaskError as e:
                cause = unwrap_error(e)
                if cause is not None and type(cause).__name__ in USER_ERRORS:
                    raise cause from None
                first = (str(cause) if cause is not None else str(e)).strip().splitlines() or [""]
                raise RunFailure(f"{where} failed: {type(cause or e).__name__}: {first[0]}", str(e)) from None
            except ray.exceptions.RayActorError as e:
                first = str(e).strip().splitlines() or [""]
                on = f" on {c.hosts[rank][0]} ({c.hosts[rank][1]})" if rank < len(c.hosts) else ""
                raise RunFailure(f"{where}: the actor died{on} ({first[0][:200]}); the newest complete checkpoint "
                                 f"is kept: run the same command again to resume from it", str(e)) from None
    return out


USER_ERRORS = ("ConfigError", "DataError", "ModelError", "UnsafeCheckpointError")


def put_shards(exp, n: int) -> list:
    """n equal row shards of an Experience, each stored once in the object store."""
    return [ray.put(shard) for shard in exp.split(n)]


# ----------------------------------------------------------------------------------- placement

def use_gpus(device: str) -> bool:
    if device != "auto":
        return device == "gpu"
    return ray.cluster_resources().get("GPU", 0) >= 1


def make_placements(ranks: dict[str, int], colocation: str, cpus_per_actor: float, gpu: bool,
                    needs_gpu: dict[str, bool], resources: Optional[dict] = None) -> tuple[dict[str, Placement], list]:
    """One placement group per set of roles that share devices; returns {role: Placement} and the groups.
    `resources` (ppo.resources): extra Ray resources per actor of a role, added to its bundles."""
    placements, pgs = {}, []
    for roles in colocated_sets(colocation, list(ranks)):
        k = len(roles)
        bundle = {"CPU": cpus_per_actor * k}
        if gpu:
            bundle["GPU"] = 1
        for r in roles:
            for name, amount in (resources or {}).get(r, {}).items():
                bundle[name] = bundle.get(name, 0.0) + float(amount)
        pg = placement_group([dict(bundle) for _ in range(ranks[roles[0]])], strategy="PACK")
        try:
            ray.get(pg.ready(), timeout=PG_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            raise RuntimeError(
                f"Ray could not place {ranks[roles[0]]} bundles of {bundle} for {'+'.join(roles)} within "
                f"{PG_TIMEOUT_S}s; the cluster has {ray.cluster_resources()} (lower ppo.*_ranks or "
                f"ppo.cpus_per_actor, or colocate groups with ppo.colocation)") from None
        pgs.append(pg)
        for r in roles:
            placements[r] = Placement(pg, cpus_per_actor, (1.0 / k) if gpu and needs_gpu[r] else 0.0)
    return placements, pgs


def connect(num_cpus: float) -> bool:
    """Join RAY_ADDRESS when set, else start a local Ray (loopback, no dashboard). True if we started it."""
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": os.environ.get("FTDIST_RAY_LOGS", "1") != "0"}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
        return False
    ray.init(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 1, int(-(-num_cpus // 1))),
             _node_ip_address="127.0.0.1", **quiet)
    return True


def shutdown(groups: list[ActorGroup], pgs: list, started: bool) -> None:
    for g in groups:
        try:
            g.kill()
        except Exception:  # an actor that already died must not hide the error that killed it
            pass
    for pg in pgs:
        try:
            remove_placement_group(pg)
        except Exception:
            pass
    if started:
        ray.shutdown()


def role_requirements(cfg) -> tuple[dict[str, int], dict[str, bool]]:
    """Which groups this recipe starts, with their sizes, and which of them hold a model on a device."""
    ranks = ppo_groups(cfg)
    needs_gpu = {r: not (r == "reward" and cfg.ppo.reward_fn is not None) for r in ranks}
    return ranks, needs_gpu


def logical_cpus(ranks: dict[str, int], cpus_per_actor: float) -> float:
    return sum(ranks.values()) * cpus_per_actor


def started_groups(cfg) -> tuple[dict[str, ActorGroup], list]:
    """Placement groups and actor groups for the recipe, every worker built and every process group formed."""
    ranks, needs_gpu = role_requirements(cfg)
    gpu = use_gpus(cfg.ppo.device)
    placements, pgs = make_placements(ranks, cfg.ppo.colocation, cfg.ppo.cpus_per_actor, gpu, needs_gpu,
                                      cfg.ppo.resources)
    groups = {role: ActorGroup(role, n, placements[role],
                               concurrency=2 if role == "policy" and cfg.ppo.async_rollouts else 1)
              for role, n in ranks.items()}
    log.info("actor groups: %s on %s", ", ".join(f"{r} x{n}" for r, n in ranks.items()), "GPUs" if gpu else "CPUs")
    try:
        get(*[Calls(g.role, "start", g.start(cfg)) for g in groups.values()], timeout_s=cfg.dist.timeout_s,
            limit=START_LIMIT)
    except Exception:
        shutdown(list(groups.values()), pgs, started=False)
        raise
    return groups, pgs


def group_placement(groups: dict[str, ActorGroup]) -> dict[str, str]:
    """{"placement/ROLE": "host (address) ranks 0-1; ..."}: where each group's actors run, as they report it."""
    from ftdist.engine.dist import placement_summary

    out = {}
    for role, g in groups.items():
        g.hosts = ray.get([a.where.remote() for a in g.actors])
        out[f"placement/{role}"] = placement_summary(g.hosts).split(": ", 1)[1]
    return out


def unwrap_error(e: BaseException) -> Optional[BaseException]:
    """The exception an actor raised, from inside the RayTaskError that carried it to the driver."""
    cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
    return cause if isinstance(cause, BaseException) else None
