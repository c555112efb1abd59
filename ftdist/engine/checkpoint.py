"""Atomic checkpoints: write into a temporary directory, then rename; a manifest marks completion.

Layout of output_dir/checkpoints/step-N/:
  engine/            DeepSpeed model, optimizer and scheduler states (sharded by rank under ZeRO)
  rng/rank{r}.pt     torch, CUDA, Python and NumPy RNG states of each rank
  trainer_state.json counters and data position
  adapter/           LoRA runs only: the adapter in PEFT format with the tokenizer (for users; resume reads engine/)
  manifest.json      written last: files with sizes; a directory without it is incomplete
A PPO checkpoint holds one engine state per trained group instead (policy/engine, policy/rng, critic/...).

The API, used by the training loop and by the PPO driver and workers alike:
  begin_checkpoint    one process: a fresh temporary directory for step N
  save_engine_state   every rank of an engine's group: its engine shards and RNG state into a directory
  commit_checkpoint   one process, after every writer finished: trainer state, manifest, rename, keep_last
  resolve_resume      checkpoint.resume (auto | never | a path) -> the checkpoint to load, or None
  load_engine_state / read_trainer_state   the way back
save_checkpoint / load_checkpoint compose them for the loop, where every rank holds one engine.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ftdist.config import ConfigError
from ftdist.engine.dist import barrier
from ftdist.run.seeding import rng_state, set_rng_state

log = logging.getLogger("ftdist")
_STEP_RE = re.compile(r"^step-(\d+)$")


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


def _tmp_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f".tmp-step-{step}"


def begin_checkpoint(ckpt_root: Path, step: int) -> Path:
    """One process: an empty temporary directory for the step-N checkpoint (a leftover is cleared)."""
    tmp = _tmp_dir(ckpt_root, step)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_engine_state(engine, state_dir: Path, client_state: Optional[dict] = None) -> None:
    """Every rank of the engine's group (collective): DeepSpeed shards into state_dir/engine, RNG into state_dir/rng."""
    (Path(state_dir) / "rng").mkdir(parents=True, exist_ok=True)
    engine.save_state(str(state_dir), client_state=client_state or {})
    torch.save(rng_state(), Path(state_dir) / "rng" / f"rank{engine.info.rank}.pt")


def load_engine_state(engine, state_dir: Path) -> dict:
    """Every rank of the engine's group: engine shards and this rank's RNG; returns DeepSpeed's client state."""
    client_state = engine.load_state(str(state_dir))
    rng_file = Path(state_dir) / "rng" / f"rank{engine.info.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("%s has no RNG state for rank %d (world size changed?); continuing with fresh RNG", state_dir,
                    engine.info.rank)
    return client_state


def commit_checkpoint(tmp: Path, ckpt_root: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """One process, after every writer has finished: trainer state, manifest last, rename into place, prune."""
    final = ckpt_root / f"step-{step}"
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    (tmp / "manifest.json").write_text(json.dumps(_manifest(tmp), indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    prune(ckpt_root, keep_last)
    return final


def read_trainer_state(path: Path) -> dict:
    return json.loads((Path(path) / "trainer_state.json").read_text())


def save_checkpoint(engine, ckpt_root: Path, step: int, trainer_state: dict, keep_last: int,
                    extra_save: Optional[Callable[[Path], None]] = None) -> Path:
    """Collective over all ranks of one engine; `extra_save(tmp_dir)` runs on every rank before the commit."""
    tmp = _tmp_dir(ckpt_root, step)
    if engine.info.is_main:
        begin_checkpoint(ckpt_root, step)
    barrier()
    save_engine_state(engine, tmp, client_state={"ftdist": trainer_state})
    if extra_save is not None:
        extra_save(tmp)
    barrier()
    if engine.info.is_main:
        commit_checkpoint(tmp, ckpt_root, step, trainer_state, keep_last)
    barrier()
    return ckpt_root / f"step-{step}"


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


def load_checkpoint(engine, path: Path) -> dict:
    """Every rank: engine state and this rank's RNG; returns the trainer state (counters, data position)."""
    load_engine_state(engine, path)
    return read_trainer_state(path)


def resolve_resume(spec: str, ckpt_root: Path) -> Optional[Path]:
    if spec == "never":
        return None
    if spec == "auto":
        return find_latest(ckpt_root)
    p = Path(spec)
    if not p.exists():
        raise ConfigError(f"checkpoint.resume: {spec} does not exist (use auto, never, or a checkpoint directory)")
    if not is_complete(p):
        raise ConfigError(f"checkpoint.resume: {spec} is not a complete checkpoint (no valid manifest.json)")
    return p
