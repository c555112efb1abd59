"""Where a command writes its results: checked before the work, written whole or not at all.

A read-only or unwritable location found only when the results are written loses them (an evaluation prints
its table, then fails to save it); so the commands check it first, by writing there as they will.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ftdist.errors import RunError, UserError


def check_writable(path: str, key: str, directory: bool) -> None:
    """Refuse, naming `key` (the option or recipe key), an output `path` (a directory, or a file) that cannot
    be written: the nearest existing directory it would be created in takes a probe file. Nothing is created."""
    target = Path(path).absolute()
    if target.exists() and directory and not target.is_dir():
        raise UserError(f"{key} {path}: a file, not a directory")
    if target.is_dir() and not directory:
        raise UserError(f"{key} {path}: a directory, not a file")
    probe = target if directory else target.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{key} {path}: {probe} is a file, so nothing can be created under it")
    try:
        fd, name = tempfile.mkstemp(prefix=".ftdist-probe-", dir=probe)
    except OSError as e:
        raise UserError(f"{key} {path}: cannot write in {probe} ({e.strerror})") from None
    os.close(fd)
    os.unlink(name)


@contextlib.contextmanager
def writing(path, cleanup=None, note: str = ""):
    """Writes to `path` inside the block: a failure (a full disk, a file system turned read-only) is one line
    naming it, after `cleanup()` removed what was half-written."""
    try:
        yield
    except OSError as e:
        if cleanup is not None:
            try:
                cleanup()
            except OSError:
                pass
        raise RunError(f"{path}: cannot be written ({e.strerror or e}){note}") from None


def write_whole(path: Path, text: str) -> None:
    """`text` into `path`, written aside then renamed (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, cleanup=lambda: tmp.unlink(missing_ok=True)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
