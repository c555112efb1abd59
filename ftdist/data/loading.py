"""Reading data files through `datasets`, and the errors that name file and row."""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_PREFIX = "ftdist/tiny-task"
_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class DataError(ValueError):
    """A data problem the user can fix: names the file and, for a bad row, the row number (1-based)."""


class RowError(DataError):
    def __init__(self, path: str, row: int, problem: str):
        self.path, self.row, self.problem = path, row, problem
        super().__init__(f"{path}: row {row}: {problem}")


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


def load_rows(spec: str):
    """A `datasets.Dataset` from a JSON/JSONL/CSV/Parquet file or a saved datasets directory."""
    import datasets

    path = resolve_data_path(spec)
    if not os.path.exists(path):
        raise DataError(f"{path}: data file not found")
    datasets.disable_progress_bars()
    try:
        if os.path.isdir(path):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{path}: dataset dict has splits {list(ds)}; point at one split's directory")
                ds = ds["train"]
            return ds
        kind = _EXTENSIONS.get(Path(path).suffix.lower())
        if kind is None:
            raise DataError(f"{path}: unknown data file type (use {', '.join(sorted(_EXTENSIONS))} or a datasets directory)")
        # keep_in_memory and no cache: files are small next to their tokenised form, which we cache ourselves
        return datasets.load_dataset(kind, data_files=path, split="train", keep_in_memory=True)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for a malformed file
        raise DataError(f"{path}: cannot be read as a dataset: {type(e).__name__}: {e}") from None
