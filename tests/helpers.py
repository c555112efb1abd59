"""Running ftdist as real processes (one plain process, or torchrun with gloo ranks) in tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def write_recipe(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def ftdist_cmd(nproc: int, recipe: str, overrides: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "ftdist", "train", recipe, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port()), "-m", "ftdist", "train", recipe, *overrides]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ftdist(nproc: int, recipe: str, overrides: list[str], timeout: int = 300, check: bool = True,
               env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = run_group(ftdist_cmd(nproc, recipe, overrides), timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"ftdist exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-8000:]}")
    return proc


def run_group(cmd: list[str], timeout: float, env: dict | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group: on timeout the launcher AND its ranks are killed (a rank
    orphaned by a killed torchrun would otherwise keep running, holding ports and CPU, for the rest of the
    suite), and the timeout error carries the output so far."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env if env is not None else dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd[:8])} ... timed out after {timeout}s\n--- stdout\n{out[-3000:]}\n"
                             f"--- stderr\n{err[-6000:]}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # ranks still alive after their launcher exited
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def load_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
