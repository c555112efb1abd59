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
def writing(path, what: str, partial=None, kept: str = ""):
    """Writes of `what` to `path` inside the block. A full device is one line with the space free and needed
    (run/disk.py); any other failure to write (a file system turned read-only, a permission) one line naming
    the path. Either way the half-written `partial` (a file or directory) is removed; `kept` says what is
    unchanged."""
    from ftdist.run.disk import _remove, out_of_space, space_for

    with space_for(path, what, partial=partial, kept=kept):
        try:
            yield
        except OSError as e:
            if out_of_space(e, partial or path):
                raise  # space_for says how much space it needs
            if partial is not None:
                _remove(partial)
            raise RunError(f"{path}: cannot write {what} ({e.strerror or e}){'; ' + kept if kept else ''}") \
                from None


def write_whole(path: Path, text: str) -> None:
    """`text` into `path`, written aside then renamed (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, path.name, partial=tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def dump_config(cfg, path) -> None:
    """The fully resolved recipe as YAML in `path` (a run's config.yaml), written aside then renamed: on a full
    disk the one there before stays whole."""
    import yaml

    write_whole(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
