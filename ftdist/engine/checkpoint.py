"""Atomic checkpoints: write into a temporary directory, then rename; a manifest marks completion.

Layout of output_dir/checkpoints/step-N/:
  engine/            DeepSpeed model, optimizer and scheduler states (sharded by rank under ZeRO)
  rng/rank{r}.pt     torch, CUDA, Python and NumPy RNG states of each rank
  trainer_state.json counters and data position
  adapter/           LoRA runs only: the adapter in PEFT format with the tokenizer (for users; resume reads engine/)
  manifest.json      written last, after every file is on disk (fsync): each file's size and sha256; a
                     directory without it is incomplete, one whose files do not match it is damaged
A PPO checkpoint holds one engine state per trained group instead (policy/engine, policy/rng, critic/...).

The API, used by the training loop and by the PPO driver and workers alike:
  begin_checkpoint    one process: a fresh temporary directory for step N
  save_engine_state   every rank of an engine's group: its engine shards and RNG state into a directory
  commit_checkpoint   one process, after every writer finished: trainer state, manifest, rename, keep_last
  resolve_resume      checkpoint.resume (auto | never | a path) -> the checkpoint to load, or None
  (engine/universal.py converts a checkpoint for another number of ranks)
  load_engine_state / read_trainer_state   the way back
save_checkpoint / load_checkpoint compose them for the loop, where every rank holds one engine.
"""

from __future__ import annotations

import hashlib
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
from ftdist.engine.dist import barrier, gather_to_main
from ftdist.engine.engine import CheckpointError, UnsafeCheckpointError, safe_checkpoint_load
from ftdist.run.disk import space_for, tree_bytes
from ftdist.run.seeding import rng_state, set_rng_state

log = logging.getLogger("ftdist")
_STEP_RE = re.compile(r"^step-(\d+)$")
OWNER_FILE = ".run_id"  # in a checkpoint being written: the run it belongs to


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")


def digest_files(root: Path, names: list[str]) -> dict[str, dict]:
    """{name: {size, sha256}} of files under root, each flushed to disk first (the manifest comes after them)."""
    out = {}
    for name in names:
        path = root / name
        with open(path, "rb") as f:
            os.fsync(f.fileno())
            out[name] = {"size": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    return out


def _manifest_files(path: Path) -> Optional[dict]:
    try:
        files = json.loads((path / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def is_complete(path: Path) -> bool:
    """A manifest, and every file it lists present with its size (quick: no hashing)."""
    files = _manifest_files(path)
    if files is None:
        return False
    for name, rec in files.items():
        size = rec["size"] if isinstance(rec, dict) else rec  # manifests before sha256 recorded sizes only
        if not ((path / name).is_file() and (path / name).stat().st_size == size):
            return False
    return True


def damaged_file(path: Path) -> Optional[str]:
    """The first file of a checkpoint that is missing or differs from its manifest (size or sha256), else None."""
    files = _manifest_files(path)
    if files is None:
        return "manifest.json"
    for name, rec in files.items():
        p = path / name
        if not p.is_file():
            return name
        size, sha = (rec["size"], rec.get("sha256")) if isinstance(rec, dict) else (rec, None)
        if p.stat().st_size != size:
            return name
        if sha is not None:
            with open(p, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != sha:
                    return name
    return None


def checkpoint_problem(path: Path, verify: bool = True) -> Optional[str]:
    """What keeps a checkpoint from being resumed, in words, or None: no manifest (it was being written when the
    run stopped), or a file missing or not what its manifest records (size; with verify, sha256 too)."""
    if _manifest_files(path) is None:
        return "incomplete: no valid manifest.json (it was being written when the run stopped)"
    if not is_complete(path):  # the manifest is there: a file that is missing or of another size
        bad = damaged_file(path)
        where = path / bad
        return f"damaged: {bad} " + ("is missing" if not where.is_file() else
                                    f"is {where.stat().st_size} bytes, its manifest records "
                                    f"{_size_of(_manifest_files(path)[bad])}")
    bad = damaged_file(path) if verify else None
    return f"damaged: {bad} does not match its manifest (sha256)" if bad is not None else None


def _size_of(rec) -> int:
    return rec["size"] if isinstance(rec, dict) else rec


def checkpoint_bytes(path: Path) -> int:
    """A complete checkpoint's size from its manifest (0 when it has none)."""
    return sum(_size_of(r) for r in (_manifest_files(path) or {}).values())


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    out = []
    if ckpt_root.exists():
        for p in ckpt_root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(ckpt_root: Path, run_id: str, warn: bool = True, verify: bool = False) -> Optional[Path]:
    """This run's newest complete checkpoint; with verify, the newest whose files all match their sha256."""
    for step, p in reversed(list_checkpoints(ckpt_root)):
        if _manifest_files(p) is not None and run_of(p) != run_id:
            continue  # another run's (e.g. before checkpoint.resume=never): never resumed by auto
        problem = checkpoint_problem(p, verify)
        if problem is None:
            return p
        if warn:
            log.warning("skipping %s checkpoint %s: %s; falling back to the one before", problem.split(":")[0], p,
                        problem.split(": ", 1)[1])
    return None


def _tmp_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f".tmp-step-{step}"


def begin_checkpoint(ckpt_root: Path, step: int, run_id: str) -> Path:
    """One process: an empty temporary directory for the step-N checkpoint, marked as this run's (a leftover of
    this run is cleared; another run's is refused)."""
    tmp = _tmp_dir(ckpt_root, step)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        if _owner(tmp) != run_id:
            raise RuntimeError(f"{tmp} exists and is not this run's (another run writing into {ckpt_root}?)")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / OWNER_FILE).write_text(run_id)
    return tmp


def _owner(tmp: Path) -> Optional[str]:
    try:
        return (tmp / OWNER_FILE).read_text().strip()
    except OSError:
        return None


def save_engine_state(engine, state_dir: Path, client_state: Optional[dict] = None) -> None:
    """Every rank of the engine's group (collective): DeepSpeed shards into state_dir/engine, RNG into state_dir/rng."""
    (Path(state_dir) / "rng").mkdir(parents=True, exist_ok=True)
    engine.save_state(str(state_dir), client_state=client_state or {})
    torch.save(rng_state(), Path(state_dir) / "rng" / f"rank{engine.info.rank}.pt")


def load_engine_state(engine, state_dir: Path, universal_dir: Optional[Path] = None) -> dict:
    """Every rank of the engine's group: engine shards and this rank's RNG; returns DeepSpeed's client state.
    universal_dir: the engine state converted for another number of ranks (engine/universal.py) to load
    instead of state_dir/engine."""
    if universal_dir is not None:
        client_state = engine.load_state(str(universal_dir), universal=True)
    else:
        client_state = engine.load_state(str(state_dir))
    rng_file = Path(state_dir) / "rng" / f"rank{engine.info.rank}.pt"
    if rng_file.exists():
        restore_rng(rng_file)
    else:
        log.warning("%s has no RNG state for rank %d (world size changed?); continuing with fresh RNG", state_dir,
                    engine.info.rank)
    return client_state


def restore_rng(rng_file: Path) -> None:
    """This rank's RNG state from a checkpoint file; a file that would run code is refused, one that holds no RNG
    state is named as damaged."""
    try:
        set_rng_state(safe_checkpoint_load(str(rng_file)))
    except (UnsafeCheckpointError, CheckpointError):
        raise
    except Exception as e:  # a truncated zip, another object's pickle, missing keys: all end the same way
        raise CheckpointError(f"{rng_file}: damaged: not an RNG state ftdist wrote ({_first_line(e)}); resume from "
                              f"another checkpoint (checkpoint.resume=PATH)") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def commit_checkpoint(tmp: Path, ckpt_root: Path, step: int, trainer_state: dict, keep_last: int, run_id: str,
                      digests: Optional[dict] = None) -> Path:
    """One process, after every writer has finished: trainer state, manifest last, rename into place, prune.

    digests: {file: {size, sha256}} already computed by the writers; files not in it are hashed here.
    """
    final = ckpt_root / f"step-{step}"
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    digests = dict(digests or {})
    digests.update(digest_files(tmp, [f for f in _files(tmp) if f not in digests]))
    manifest = tmp / "manifest.json"
    manifest.write_text(json.dumps({"files": digests, "run_id": run_id, "time": time.time()}, indent=1))
    with open(manifest, "rb") as f:
        os.fsync(f.fileno())
    if final.exists() and run_of(final) != run_id:
        # another run's step-N (kept when output_dir was taken over with overwrite_output_dir): moved aside, kept
        aside = final.with_name(f"{final.name}.superseded-{int(time.time())}")
        os.rename(final, aside)
        log.warning("%s belonged to another run: moved to %s", final, aside.name)
    publish_dir(tmp, final)
    prune(ckpt_root, keep_last, run_id)
    return final


def publish_dir(tmp: Path, final: Path) -> None:
    """Put a finished directory in place of `final` by renames, so `final` is never half-written."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def checkpoint_space(ckpt_root: Path, step: int):
    """Around writing the step-N checkpoint (begin to commit): a full disk ends it as one line with the space
    needed (the newest complete checkpoint's size: the same model and optimizer), its partial files removed."""
    def needed() -> Optional[int]:
        done = [p for _, p in list_checkpoints(ckpt_root) if is_complete(p)]
        return checkpoint_bytes(done[-1]) if done else None

    return space_for(ckpt_root / f"step-{step}", f"the checkpoint of step {step}", needed,
                     partial=_tmp_dir(ckpt_root, step), kept="the checkpoints before it and final/ are as they were")


def final_space(final: Path, tmp: Path):
    """Around exporting final/ into `tmp`: a full disk ends it as one line, the partial export removed."""
    return space_for(final, "the final model", lambda: tree_bytes(final) or None, partial=tmp,
                     kept=f"the checkpoints{' and the final/ before it' if final.exists() else ''} are as they were")


def export_final(engine, export, final: Path) -> None:
    """Collective: `export(dir)` writes the model into a temporary directory that replaces `final` once complete,
    so a run that dies while exporting (a full disk) leaves the previous final/ or none, never half of one."""
    tmp = final.with_name(f".tmp-{final.name}")
    if engine.info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    with final_space(final, tmp):
        export(str(tmp))
        barrier()
        if engine.info.is_main:
            publish_dir(tmp, final)
    barrier()


def consolidated_weights(engine_dir: Path) -> dict:
    """The model's weights from a checkpoint's DeepSpeed state (checkpoints/step-N/engine), on CPU, for any number
    of ranks: ZeRO-1/2/3 shards gathered by DeepSpeed's zero_to_fp32 (fp32 master weights), a ZeRO-0 state as
    saved; read weights-only."""
    from ftdist.engine.universal import weights_only_torch_load

    with weights_only_torch_load():
        if any(engine_dir.glob("zero_pp_rank_*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(engine_dir.parent), tag=engine_dir.name)
        model_file = engine_dir / "mp_rank_00_model_states.pt"
        if not model_file.exists():
            raise ConfigError(f"{engine_dir}: no DeepSpeed model state (mp_rank_00_model_states.pt)")
        return torch.load(str(model_file), map_location="cpu")["module"]


def read_trainer_state(path: Path) -> dict:
    file = Path(path) / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: damaged: unreadable ({_first_line(e)}); resume from another checkpoint "
                              f"(checkpoint.resume=PATH)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: damaged: holds a JSON {type(state).__name__}, not the trainer state")
    return state


def save_checkpoint(engine, ckpt_root: Path, step: int, trainer_state: dict, keep_last: int, run_id: str,
                    extra_save: Optional[Callable[[Path], None]] = None) -> Path:
    """Collective over all ranks of one engine; `extra_save(tmp_dir)` runs on every rank before the commit."""
    tmp = _tmp_dir(ckpt_root, step)
    info = engine.info
    # a full disk on this rank: one line from it (the others stop at the next collective)
    with checkpoint_space(ckpt_root, step):
        if info.is_main:
            begin_checkpoint(ckpt_root, step, run_id)
        barrier()
        save_engine_state(engine, tmp, client_state={"ftdist": trainer_state})
        if extra_save is not None:
            extra_save(tmp)
        barrier()
        # every rank hashes a share of the files (a large checkpoint is hashed in parallel)
        digests = gather_to_main(digest_files(tmp, _files(tmp)[info.rank::info.world_size]))
        if info.is_main:
            commit_checkpoint(tmp, ckpt_root, step, trainer_state, keep_last, run_id,
                              {k: v for d in digests for k, v in d.items()})
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


def run_of(path: Path) -> Optional[str]:
    """The run a complete checkpoint belongs to (from its manifest)."""
    try:
        return json.loads((path / "manifest.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def refuse_foreign_checkpoints(ckpt_root: Path, run_id: str, overwrite: bool) -> None:
    """A run does not start beside another run's complete checkpoints (e.g. checkpoint.resume=never in a used
    output_dir): their steps would mix with its own. overwrite_output_dir=true allows it; a checkpoint of the
    other run that this one's would replace is then moved aside, not deleted."""
    other = [p.name for _, p in list_checkpoints(ckpt_root) if is_complete(p) and run_of(p) != run_id]
    if other and not overwrite:
        shown = ", ".join(other[:4]) + (", ..." if len(other) > 4 else "")
        raise ConfigError(f"{ckpt_root} holds checkpoints of another run ({shown}): this run would mix its steps with "
                          f"theirs. Use another output_dir, or set overwrite_output_dir=true (they are then kept "
                          f"and never resumed; one of the same step is moved aside as step-N.superseded-TIME)")


def prune(ckpt_root: Path, keep_last: int, run_id: str) -> None:
    """Called right after a complete save: this run's leftovers of interrupted saves go, then all but the newest
    keep_last of this run's checkpoints. Nothing of another run, and nothing without a manifest, is touched."""
    for p in ckpt_root.glob(".tmp-step-*"):
        if _owner(p) == run_id:
            shutil.rmtree(p, ignore_errors=True)
    mine = [p for _, p in list_checkpoints(ckpt_root) if is_complete(p) and run_of(p) == run_id]
    if keep_last > 0:
        for p in mine[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(engine, path: Path, universal_dir: Optional[Path] = None) -> dict:
    """Every rank: engine state and this rank's RNG; returns the trainer state (counters, data position)."""
    load_engine_state(engine, path, universal_dir)
    return read_trainer_state(path)


def resolve_resume(spec: str, ckpt_root: Path, run_id: str) -> Optional[Path]:
    """checkpoint.resume -> the checkpoint to load (verified against its manifest), or None. One process decides
    (the loop broadcasts its answer): every file is hashed."""
    if spec == "never":
        return None
    if spec == "auto":
        return find_latest(ckpt_root, run_id, verify=True)
    p = Path(spec)
    if not p.exists():
        raise ConfigError(f"checkpoint.resume: {spec} does not exist (use auto, never, or a checkpoint directory)")
    problem = checkpoint_problem(p)
    if problem is not None:
        raise ConfigError(f"checkpoint.resume: {spec} is {problem}")
    return p
