"""Running ftdist as real processes (one plain process, or torchrun with gloo ranks) in tests."""

from __future__ import annotations

import contextlib
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
               env: dict | None = None, inprocess: bool | None = None) -> subprocess.CompletedProcess:
    """`ftdist train RECIPE OVERRIDES` on nproc ranks. One rank runs in this process unless inprocess=False (a
    new interpreter and its imports cost ~10 s of a 2-core machine; a test of the process itself, its signals
    or its exit, asks for one); several ranks run under torchrun."""
    if nproc == 1 and inprocess is not False:
        proc = run_inprocess(["train", recipe, *overrides], env=env)
    else:
        # the checkout first; what PYTHONPATH already holds (e.g. packages installed with --target) after it
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
        proc = run_group(ftdist_cmd(nproc, recipe, overrides), timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"ftdist exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-8000:]}")
    return proc


def run_inprocess(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`ftdist ARGV` through ftdist.cli.main in this process, with `env` set for the call: its exit code, and what
    it printed and logged (one stream each, as a subprocess's would be). tests/conftest.py restores the process
    group variables and destroys a leftover group after each test."""
    import io
    import logging

    from ftdist.cli import main
    from ftdist.run.logs import DATE_FORMAT, LOG_FORMAT

    saved = dict(os.environ)  # restored whole: the run sets its process group's variables (MASTER_PORT, ...)
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        root.removeHandler(handler)
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["ftdist", *argv], code, out.getvalue(), err.getvalue())


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


def procs_with_arg(needle: str) -> list[int]:
    """Live (non-zombie) processes, this one aside, whose command line contains `needle`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle.encode() in cmdline and state != b"Z":
            found.append(int(entry))
    return found


def load_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))
    return max(float((a[k].detach().float() - b[k].detach().float()).abs().max()) for k in a)


def max_abs(a: dict) -> float:
    return max(float(v.float().abs().max()) for v in a.values())


# Tolerances for comparing the weights of two runs that do the same training with the same data but group
# the fp32 arithmetic differently (micro-batches, ranks, ZeRO buckets and partitions, BLAS blocking, which
# also differs from one CPU to the next). Derived from fp32 rounding, never read off a machine:
EPS32 = 2.0 ** -23  # spacing of fp32 numbers at 1.0: rounding a weight w moves it by at most EPS32 * |w| / 2
# Two fp32 sums of the same terms grouped differently differ by a few EPS32 of the summed magnitude per level of
# regrouping (tokens in a matmul, micro-batches, ranks): ~1e-6 of the gradient for the few levels here. Allowed:
# 100x that. A real fault (a wrong loss divisor, a dropped or doubled micro-batch, an unsynchronised rank)
# changes the gradient by 10% or more, 1000x this.
GRAD_RTOL = 1e-4


def sgd_tolerance(update: float, weight: float, steps: int) -> float:
    """Largest weight difference fp32 rounding can put between two such runs of `steps` SGD steps.

    SGD (with momentum) is linear in the gradient, so gradients that differ by GRAD_RTOL of their size move
    the weights apart by GRAD_RTOL of the update (`update` = the largest |w_final - w_init|); each step also
    rounds every weight once in each run (`weight` = the largest |w|). Adam is not used for these comparisons:
    its update lr * m / (sqrt(v) + eps) maps a rounding-level gradient near zero to +-lr, so two runs that differ
    only in rounding can differ by ~lr per step in such entries (embedding rows of unused tokens, LoRA entries
    whose gradient is still tiny), whatever the host.
    """
    return GRAD_RTOL * update + steps * EPS32 * weight


def adam_tolerance(lr: float, eps: float, grad: float, weight: float, steps: int) -> float:
    """The same for Adam(W) with an `eps` large against the gradients' rounding.

    d(update)/d(g) is at most about 2 * lr / eps per step (the m and v terms), so a gradient difference of
    GRAD_RTOL * grad (`grad` = the largest gradient entry of the run) moves a weight by at most
    2 * lr * GRAD_RTOL * grad / eps per step, plus the rounding of the weights as for SGD.
    """
    return steps * (2 * lr * GRAD_RTOL * grad / eps + EPS32 * weight)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def start_ranks(n: int, train_args: list[str], log_dir: Path, env: dict | None = None) -> list[subprocess.Popen]:
    """`ftdist train ARGS` as n ranks started by hand with srun-style RANK/WORLD_SIZE/MASTER_* variables (torchrun
    would kill the others as soon as one exits, hiding what they do then); output in log_dir/rank{R}.log."""
    port = _free_port()
    procs = []
    for rank in range(n):
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RANK": str(rank),
                    "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    **(env or {})}
        with open(Path(log_dir) / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "ftdist", "train", *train_args], cwd=ROOT,
                                          env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
    return procs


@contextlib.contextmanager
def small_disk(path: Path, size_bytes: int):
    """A tmpfs of size_bytes (rounded up to KiB) mounted at path for the block: a disk that really fills up, as a
    full disk does (root, as on the CI machines)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={-(-size_bytes // 1024)}k", "tmpfs", str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill_disk(path: Path, leave_bytes: int = 0) -> None:
    """Take the free space of path's file system, leaving about leave_bytes (at most 4 KiB off)."""
    import shutil

    with open(path / "filler", "ab", buffering=0) as f:
        chunk = b"\0" * (1 << 20)
        while shutil.disk_usage(path).free > leave_bytes:
            want = shutil.disk_usage(path).free - leave_bytes
            try:
                f.write(chunk[:max(4096, min(len(chunk), want))])
            except OSError:
                break
