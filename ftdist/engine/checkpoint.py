"""Atomic checkpoints: write into a temporary directory, then rename; a manifest marks completion.

Layout of output_dir/checkpoints/step-N/:
  engine/            DeepSpeed model, optimizer and scheduler states (sharded by rank under ZeRO)
  rng/rank{r}.pt     torch, CUDA, Python and NumPy RNG states of each rank
  trainer_state.json counters and data position
  adapter/           LoRA runs only: the adapter in PEFT format with the tokenizer (for users; resume reads engine/)
  manifest.json      written last: files with sizes; a directory without it is incomplete
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ftdist.engine.dist import barrier

log = logging.getLogger("ftdist")
_STEP_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    # plain ints and tensors only, so that loading works with torch.load(weights_only=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": list(py_keys),
        "python_version": py_version,
        "python_gauss": py_gauss,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _manifest(root: Path) -> dict:
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    return {"files": files, "time": time.time()}


def is_complete(path: Path) -> bool:
    m = path / "manifest.json"
    if not m.exists():
        return False
    try:
        files = json.loads(m.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((path / f).exists() and (path / f).stat().st_size == size for f, size in files.items())


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    out = []
    if ckpt_root.exists():
        for p in ckpt_root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(ckpt_root: Path, warn: bool = True) -> Optional[Path]:
    for step, p in reversed(list_checkpoints(ckpt_root)):
        if is_complete(p):
            return p
        if warn:
            log.warning("skipping incomplete checkpoint %s (no valid manifest: it was being written when the run stopped)", p)
    return None


def save_checkpoint(engine, ckpt_root: Path, step: int, trainer_state: dict, rank: int, is_main: bool,
                    keep_last: int, extra_save: Optional[Callable[[Path], None]] = None) -> Path:
    """Collective: every rank calls it, and `extra_save(tmp_dir)` runs on every rank before the manifest."""
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".tmp-step-{step}"
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    engine.save_state(str(tmp), client_state={"ftdist": trainer_state})
    torch.save(rng_state(), tmp / "rng" / f"rank{rank}.pt")
    if extra_save is not None:
        extra_save(tmp)
    barrier()
    if is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        commit_checkpoint(tmp, final, ckpt_root, keep_last)
    barrier()
    return final


def commit_checkpoint(tmp: Path, final: Path, ckpt_root: Path, keep_last: int) -> Path:
    """One process, after every writer has finished: manifest last, rename into place, prune old ones."""
    (tmp / "manifest.json").write_text(json.dumps(_manifest(tmp), indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    prune(ckpt_root, keep_last)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Called right after a complete save: leftovers of interrupted saves go, then all but the newest keep_last."""
    for p in ckpt_root.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)
    complete = []
    for _, p in list_checkpoints(ckpt_root):
        if is_complete(p):
            complete.append(p)
        else:
            shutil.rmtree(p, ignore_errors=True)
    if keep_last > 0:
        for p in complete[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(engine, path: Path, rank: int) -> dict:
    """Restores engine state and this rank's RNG; returns the trainer state (counters, data position)."""
    engine.load_state(str(path))
    state = json.loads((path / "trainer_state.json").read_text())
    rng_file = path / "rng" / f"rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("%s has no RNG state for rank %d (world size changed?); continuing with fresh RNG", path, rank)
    return state


def resolve_resume(spec: str, ckpt_root: Path) -> Optional[Path]:
    if spec == "never":
        return None
    if spec == "auto":
        return find_latest(ckpt_root)
    p = Path(spec)
    if not p.exists():
        from ftdist.config import ConfigError

        raise ConfigError(f"checkpoint.resume: {spec} does not exist (use auto, never, or a checkpoint directory)")
    if not is_complete(p):
        from ftdist.config import ConfigError

        raise ConfigError(f"checkpoint.resume: {spec} is not a complete checkpoint (no valid manifest.json)")
    return p
