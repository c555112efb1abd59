"""The local cache (`$FTDIST_CACHE`, else `~/.cache/ftdist`) for files ftdist builds once and reuses:
the embedded tiny model and its task data."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable


def cache_dir() -> str:
    """`$FTDIST_CACHE`, else `~/.cache/ftdist`."""
    return os.path.expanduser(os.environ.get("FTDIST_CACHE") or os.path.join("~", ".cache", "ftdist"))


def materialize(subdir: str, build: Callable[[str], None]) -> str:
    """Return `<cache>/<subdir>`, calling `build(tmp_dir)` first if it is missing.

    The build writes into a temporary directory next to the target which is then
    renamed into place; rename is atomic, so a directory that exists is complete.
    When several ranks start at once, each builds its own copy, one rename wins,
    and the others discard theirs and use the winner's.
    """
    root = cache_dir()
    final = os.path.join(root, subdir)
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{subdir}.tmp-", dir=root)
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # another process won the race (ENOTEMPTY / EEXIST); theirs is complete
            if not os.path.isdir(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
