"""Writes that run out of disk space: one line that names the path, the space free and the space needed.

Everything ftdist keeps is written aside and renamed into place once complete (checkpoints, final/, run.json),
so a write that fails leaves what was saved before as it was; the half-written files are removed, which
gives their space back.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import traceback
from pathlib import Path
from typing import Callable, Optional

from ftdist.run.lifecycle import RunFailure


class DiskFullError(RunFailure):
    """No space left on the device while writing; nothing saved before was touched."""


def free_bytes(path) -> int:
    """Free space (for this user) on the file system that holds `path` or would hold it."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def tree_bytes(path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for f in p.rglob("*") if p.is_dir() else ():
        with contextlib.suppress(OSError):
            total += f.stat().st_size if f.is_file() else 0
    return total


def fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def out_of_space(exc: BaseException, path) -> bool:
    """Whether `exc`, raised while writing under `path`, means the device is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left on device" in text or "Disk quota exceeded" in text:  # safetensors, DeepSpeed, wrappers
        return True
    # torch.save's zip writer says only "[enforce fail at inline_container.cc:N] . unexpected pos A vs B" (or
    # "file write failed"): a short write; the device is full when next to nothing is left on it
    if isinstance(exc, RuntimeError) and "inline_container.cc" in text:
        return free_bytes(path) < 1 << 20
    return False


@contextlib.contextmanager
def space_for(path, what: str, needed: Optional[Callable[[], Optional[int]]] = None, partial=None, kept: str = ""):
    """Writes of `what` to `path` inside the block; a full device ends them as a DiskFullError that names the path,
    the space free once the partial files (`partial`, a file or directory) are removed, and the space needed when
    `needed()` knows it; `kept` says what stays as it was. Other errors pass through unchanged."""
    try:
        yield
    except Exception as e:
        if isinstance(e, DiskFullError) or not out_of_space(e, partial or path):
            raise
        written = tree_bytes(partial) if partial is not None else 0
        # the failed write's finished frames still hold its files open (their space would only come back when
        # the process ends): released first, so that the free space said is the space there is
        chained = e
        while chained is not None:
            traceback.clear_frames(chained.__traceback__)
            chained = chained.__context__
        if partial is not None:
            _remove(partial)
    else:
        return
    need = needed() if needed is not None else None
    need_text = (f"about {fmt_bytes(need)} needed" if need else
                 f"more than the {fmt_bytes(written)} written before it filled" if written else "")
    raise DiskFullError(
        f"{path}: no space left on the device while writing {what} ({fmt_bytes(free_bytes(path))} free"
        f"{', ' + need_text if need_text else ''}){'; ' + kept if kept else ''}; free some space and run it "
        f"again") from None


def _remove(path) -> None:
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()
