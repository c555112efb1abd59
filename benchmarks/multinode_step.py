"""What crossing hosts costs: the step time of 2 hosts x 1 rank against 1 host x 2 ranks, same recipe.

    sudo .venv/bin/python benchmarks/multinode_step.py [--rounds 3] [--steps 40] [key=value ...]

Hosts are launch/local_cluster.sh's network namespaces on this machine (brought up if needed, and taken down
again if this script brought them up): both arms run on the same cores, so the difference is the path between
the ranks (veth pair and bridge between hosts, loopback within one) and the rendezvous over it. Both arms run
under torchrun in the namespaces (one host: ftnode1 with 2 ranks; two hosts: one rank each, c10d rendezvous at
ftnode1), alternating, `--rounds` times; each reports the median time per optimizer step after the first 5 steps
(from metrics.jsonl's elapsed_s). Prints a Markdown table (median and spread over rounds, ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "launch" / "local_cluster.sh"
WARMUP = 5


def _torchrun(hosts: list[str], nproc: int, out: Path, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)), "--nproc_per_node",
           str(nproc), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{hosts[0]}:29400", "--rdzv_id", out.name,
           "-m", "ftdist", "train", "sft_tiny", f"output_dir={out}", *overrides]
    env = [f"PYTHONPATH={ROOT}", "OMP_NUM_THREADS=1"]
    procs = [subprocess.Popen(["bash", str(CLUSTER), "run", h, "env", *env, *cmd], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for h in hosts]
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"run failed ({out}):\n{err[-3000:]}")
    elapsed = [r["elapsed_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "loss" in r]
    steps = [b - a for a, b in zip(elapsed[WARMUP:], elapsed[WARMUP + 1:])]
    return statistics.median(steps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("overrides", nargs="*", help="recipe overrides for both arms (sft_tiny)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: the hosts are network namespaces (launch/local_cluster.sh)")
    made = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode != 0
    subprocess.run(["bash", str(CLUSTER), "up", "2"], check=True)
    overrides = ["data.eval=null", f"train.max_steps={args.steps}", "train.log_every=1", "train.progress_bar=false",
                 "checkpoint.every_steps=0", "train.save_final=false", "dist.backend=gloo", *args.overrides]
    work = Path(tempfile.mkdtemp(prefix="ftdist-multinode-"))
    times: dict[str, list[float]] = {"1 host x 2 ranks": [], "2 hosts x 1 rank": []}
    try:
        for r in range(args.rounds):
            arms = list(times) if r % 2 == 0 else list(times)[::-1]
            for arm in arms:
                hosts, nproc = (["ftnode1"], 2) if arm.startswith("1 host") else (["ftnode1", "ftnode2"], 1)
                t = _torchrun(hosts, nproc, work / f"r{r}-{len(hosts)}", overrides)
                times[arm].append(t)
                print(f"round {r + 1}: {arm}: {t * 1000:.1f} ms/step", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made:
            subprocess.run(["bash", str(CLUSTER), "down"])
    base = statistics.median(times["1 host x 2 ranks"])
    print("| layout | ms/step (median of rounds) | rounds (ms/step) | vs 1 host |")
    print("|---|---:|---|---:|")
    for arm, ts in times.items():
        med = statistics.median(ts)
        print(f"| {arm} | {med * 1000:.1f} | {', '.join(f'{t * 1000:.1f}' for t in ts)} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
