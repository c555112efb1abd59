"""Reading data files through `datasets`, and the errors that name file and row."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Optional

from ftdist.errors import UserError

BUNDLED_PREFIX = "ftdist/tiny-task"
_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class DataError(UserError):
    """A data problem the user can fix: names the file and, for a bad row, the row number (1-based)."""


class RowError(DataError):
    def __init__(self, path: str, row: int, problem: str):
        self.path, self.row, self.problem = path, row, problem
        super().__init__(f"{path}: row {row}: {problem}")

    def __reduce__(self):  # raised in a tokenising worker process, re-raised in the parent
        return RowError, (self.path, self.row, self.problem)


def resolve_data_path(spec: str) -> str:
    """'ftdist/tiny-task' (train split) or 'ftdist/tiny-task/<name>' map to the bundled task files."""
    if spec == BUNDLED_PREFIX or spec.startswith(BUNDLED_PREFIX + "/"):
        from ftdist.data.tiny_task import bundled_task_dir

        name = spec[len(BUNDLED_PREFIX) + 1:] or "train"
        path = Path(bundled_task_dir()) / f"{name}.jsonl"
        if not path.exists():
            known = sorted(p.stem for p in Path(bundled_task_dir()).glob("*.jsonl"))
            raise DataError(f"{spec}: no such bundled split (known: {', '.join(known)})")
        return str(path)
    return spec


def content_digest(path: str, suffixes: tuple[str, ...] = ()) -> str:
    """sha256 over the bytes of a file, or of every file under a directory (with their relative names, optionally
    only those ending in `suffixes`): the same content gives the same digest whatever the paths' times."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        if suffixes and not f.name.endswith(suffixes):
            continue
        st = f.stat()
        name = str(f.relative_to(p)) if p.is_dir() else ""  # a single file is its bytes, wherever it lies
        h.update(f"{name}\0{_file_sha256(str(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)}\0".encode())
    return h.hexdigest()


FULL_HASH_BYTES = 1 << 30  # files up to 1 GiB are hashed whole (~1 s); larger ones by SAMPLES spread chunks
SAMPLES, CHUNK = 256, 1 << 20


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """Hashed once per process per version of the file (the tokenised cache and the resume check both ask): any
    write changes its ctime, which no tool sets back, so a file rewritten with its old size and mtime is read again.
    A file above FULL_HASH_BYTES is read in SAMPLES chunks of CHUNK bytes spread evenly, first and last
    included (256 MiB of it), with its size: an edit elsewhere that keeps the size goes unseen."""
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256(str(size).encode())
        for k in range(SAMPLES):
            f.seek((size - CHUNK) * k // (SAMPLES - 1))
            h.update(f.read(CHUNK))
        return h.hexdigest()


def data_fingerprint(spec: str, data_cfg=None) -> str:
    """The content digest of a data source as the recipe names it (bundled names resolved; dataset names by
    their split's fingerprint)."""
    path = resolve_data_path(spec)
    try:
        return source_digest(spec, data_cfg)
    except DataError:
        return f"missing:{path}"


def _check_text(path: str, kind: str) -> None:
    """A JSON/JSONL/CSV file must be UTF-8 text with at least one row; say where it is not (line and column)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line, rows, pending = 1, 0, ""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if b"\0" in chunk:
                at = line + chunk[:chunk.index(b"\0")].count(b"\n")
                raise DataError(f"{path}: line {at}: binary content (a NUL byte): not a {kind.upper()} text file")
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as e:
                before = chunk[:e.start]
                newline = before.rfind(b"\n")
                col = e.start - newline if newline >= 0 else len(pending.encode()) + e.start + 1
                at = line + before.count(b"\n")
                raise DataError(f"{path}: line {at}, column {col}: not UTF-8 text (byte 0x{chunk[e.start]:02x}); "
                                f"save the file as UTF-8") from None
            lines = (pending + text).split("\n")
            pending = lines.pop()
            line += len(lines)
            rows += sum(1 for ln in lines if ln.strip())
    rows += bool(pending.strip())
    if rows == 0 or (kind == "csv" and rows == 1):
        raise DataError(f"{path}: no rows" + (" (only a header line)" if kind == "csv" and rows == 1 else ""))


_FILE_LIKE = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".tsv", ".arrow")


def is_hub_name(path: str) -> bool:
    """A data spec that is no local path: a `datasets.load_dataset` name (e.g. HuggingFaceH4/ultrachat_200k).
    Something that looks like a file (its extension) stays a local path, so a typo says 'not found'."""
    return not os.path.exists(path) and not path.lower().endswith(_FILE_LIKE) and not path.startswith((".", "/", "~"))


def source_key(spec: str, data_cfg) -> str:
    """The recipe key a source was given as (data.train or data.eval), for errors."""
    return "data.eval" if data_cfg is not None and spec == data_cfg.eval and spec != data_cfg.train else "data.train"


def check_local_source(spec: str, data_cfg, key: Optional[str] = None) -> None:
    """What can be told of a source before reading it: a local path must exist, and has no revisions to pick
    (data.revision applies to Hub datasets only). `key` names it in the error (default: data.train or data.eval)."""
    path = resolve_data_path(spec)
    if is_hub_name(path):
        return
    key = key or source_key(spec, data_cfg)
    if not os.path.exists(path):
        raise DataError(f"{key}: {path}: data file not found")
    revision = getattr(data_cfg, "revision", None)
    if revision is not None:
        raise DataError(f"{key}: {path} is a local path, which has no revisions: data.revision={revision!r} would be "
                        f"ignored; remove it (it picks a branch, tag or commit of a Hub dataset)")


def split_of(spec: str, data_cfg) -> str:
    """The split a source is read with: data.split for data.train, data.eval_split for data.eval."""
    if data_cfg is None:
        return "train"
    return data_cfg.split if spec == data_cfg.train else data_cfg.eval_split


def load_rows(spec: str, data_cfg=None, scratch: Optional[str] = None):
    """A `datasets.Dataset` from a JSON/JSONL/CSV/Parquet file, a saved datasets directory, a dataset repository
    directory or a `datasets.load_dataset` name (with data.split / data.eval_split, data.subset, data.revision);
    then data.shuffle_seed and data.max_samples. A file's rows are read into memory, or with `scratch` (a directory
    the caller removes after use) into Arrow files there, memory-mapped: large files stay on disk."""
    ds = _load_source(spec, data_cfg, scratch)
    if data_cfg is not None and data_cfg.shuffle_seed is not None:
        ds = ds.shuffle(seed=data_cfg.shuffle_seed)
    if data_cfg is not None and data_cfg.max_samples > 0 and len(ds) > data_cfg.max_samples:
        ds = ds.select(range(data_cfg.max_samples))
    return ds


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def _is_repository(path: str) -> bool:
    """Read through datasets.load_dataset: a dataset name, or a directory laid out as a Hub repository."""
    return is_hub_name(path) or (os.path.isdir(path) and not _is_saved_dataset(path))


def _load_source(spec: str, data_cfg, scratch: Optional[str] = None):
    import datasets

    path = resolve_data_path(spec)
    datasets.disable_progress_bars()
    if _is_repository(path) and is_hub_name(path):
        return _load_repository(path, data_cfg)
    check_local_source(spec, data_cfg)
    if _is_repository(path):
        return _load_repository(path, data_cfg)
    kind = None
    try:
        if os.path.isdir(path):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                split = split_of(spec, data_cfg)
                if split not in ds:
                    raise DataError(f"{path}: no split {split!r} (splits: {', '.join(ds)}); set data.split or "
                                    f"data.eval_split")
                ds = ds[split]
            return ds
        kind = _EXTENSIONS.get(Path(path).suffix.lower())
        if kind is None:
            raise DataError(f"{path}: unknown data file type (use {', '.join(sorted(_EXTENSIONS))} or a datasets directory)")
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: the file is empty (0 bytes)")
        if kind in ("json", "csv"):
            _check_text(path, kind)
        # built in a throw-away cache: datasets' own cache is keyed on the file's path and time, so a file
        # rewritten in place could come back stale (ftdist caches the tokenised form under a content hash)
        if scratch is not None:
            return datasets.load_dataset(kind, data_files=path, split="train", cache_dir=scratch)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ftdist-rows-") as tmp:
            return datasets.load_dataset(kind, data_files=path, split="train", keep_in_memory=True, cache_dir=tmp)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for a malformed file
        where = _json_error(path) if kind == "json" else None
        raise DataError(f"{path}: {where}" if where else
                        f"{path}: cannot be read as a dataset: {type(e).__name__}: {e}") from None


def _load_repository(name: str, data_cfg):
    """datasets.load_dataset(name, subset, split, revision): a Hub dataset, or a local directory laid out as one."""
    import datasets

    split = split_of(name, data_cfg)
    subset = data_cfg.subset if data_cfg is not None else None
    revision = data_cfg.revision if data_cfg is not None else None
    what = f"{name}" + (f" (subset {subset!r})" if subset else "")
    try:
        return datasets.load_dataset(name, subset, split=split, revision=revision)
    except Exception as e:
        msg = " ".join(str(e).split())[:400]
        if isinstance(e, (FileNotFoundError, datasets.exceptions.DatasetNotFoundError)) or "doesn't exist" in msg \
                or "Couldn't find" in msg:
            raise DataError(f"{what}: no such data file or dataset (not a local path; as a dataset name: {msg})") \
                from None
        if isinstance(e, ConnectionError) or "Couldn't reach" in msg:
            raise DataError(f"{what}: not a local path, and as a dataset name it needs the Hub, which cannot be "
                            f"reached ({msg}); a local file needs its path with the extension") from None
        if "split" in msg.lower():
            raise DataError(f"{what}: split {split!r}: {msg} (set data.split / data.eval_split)") from None
        if "config" in msg.lower():
            raise DataError(f"{what}: {msg} (set data.subset)") from None
        raise DataError(f"{what}: cannot be loaded as a dataset: {type(e).__name__}: {msg}") from None


def source_digest(spec: str, data_cfg=None) -> str:
    """What the tokenised cache and a resume compare: a local source's content digest; for a dataset name, the
    loaded split's fingerprint (which datasets derives from the files and revision) with the subset and split."""
    path = resolve_data_path(spec)
    check_local_source(spec, data_cfg)
    if not _is_repository(path):
        return content_digest(path)
    ds = _load_repository(path, data_cfg)
    subset = data_cfg.subset if data_cfg is not None else None
    return f"dataset:{path}:{subset}:{split_of(spec, data_cfg)}:{ds._fingerprint}"


def _json_error(path: str) -> Optional[str]:
    """Where a JSON or JSON Lines file stops being valid JSON ("line N, column C: ..."), or None if it parses
    (then the problem is elsewhere, e.g. rows whose fields disagree)."""
    import json

    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip()[:1] == "[":  # one JSON document (a list of rows)
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as e:
            return f"line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})"
    for n, line in enumerate(text.split("\n"), 1):  # JSON Lines: one object per line
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n}, column {e.colno}: not valid JSON ({e.msg}); each line must be one JSON object"
        if not isinstance(row, dict):
            return f"line {n}: a JSON {type(row).__name__}, not an object; each line must be one JSON object"
    return None


# -- data.filter: keep rows where a column compares to a value (parsed by ftdist.config.filters) ----------------
def row_filter(filters: list[str], columns: list[str], path: str):
    """A predicate row -> keep? for data.filter (all conditions must hold), or None without filters. A column
    the file lacks is a DataError naming it; a value that cannot be compared names the row (see keep)."""
    if not filters:
        return None
    from ftdist.config.filters import FILTER_OPS, parse_filter

    parsed = []
    for text in filters:
        col, op, value = parse_filter(text)
        if col not in columns:
            raise DataError(f"{path}: data.filter {text!r}: no column {col!r} (columns: {', '.join(columns)})")
        parsed.append((text, col, FILTER_OPS[op], value))

    def keep(row: dict, index: int) -> bool:
        for text, col, fn, value in parsed:
            try:
                if not fn(row[col], value):
                    return False
            except TypeError:
                raise RowError(path, index + 1, f"data.filter {text!r}: cannot compare {row[col]!r} with "
                                                f"{value!r}") from None
        return True

    return keep
