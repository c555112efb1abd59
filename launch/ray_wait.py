"""Wait until a Ray cluster reports NODES alive nodes (instead of sleeping and hoping).

    python launch/ray_wait.py GCS_ADDRESS NODES [--timeout S] [--watch-pid PID ...]

Exits 0 once the cluster has NODES alive nodes, 1 on timeout, or at once when a watched process
(the `srun ... ray start` steps of slurm/ppo_7b.sh) has exited: its node will never join.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _gone(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            out.append(pid)
        except PermissionError:
            pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("address")
    p.add_argument("nodes", type=int)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--watch-pid", type=int, nargs="*", default=[])
    args = p.parse_args(argv)

    import ray

    deadline = time.monotonic() + args.timeout
    alive = 0
    connected = False
    while time.monotonic() < deadline:
        gone = _gone(args.watch_pid)
        if gone:
            print(f"ray_wait: process {gone[0]} exited before the cluster was up", file=sys.stderr)
            return 1
        try:
            if not connected:
                ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
                connected = True
            alive = sum(1 for n in ray.nodes() if n["Alive"])
        except Exception:  # the head is still starting
            alive = 0
            if not connected:
                ray.shutdown()
        if alive >= args.nodes:
            print(f"ray_wait: {alive} node(s) up at {args.address}", flush=True)
            return 0
        time.sleep(1.0)
    print(f"ray_wait: {alive} of {args.nodes} node(s) up after {args.timeout:.0f}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
