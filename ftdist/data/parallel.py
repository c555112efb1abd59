"""Row-by-row encoding of a dataset in parallel processes, streamed to Arrow files.

`encode_dataset` runs an encoder over every row with `datasets.map` (batches of rows, `num_proc` worker
processes, results written batch by batch to Arrow files in a scratch directory, never held as Python
objects), and returns the encoded dataset with two more columns: `drop` (why a row is left out: "" for a
kept row, else e.g. "filtered", "skipped") and `note` (the message of a skipped row). The caller turns those
into its counts and keeps the rows whose `drop` is "".
"""

from __future__ import annotations

import os
from typing import Optional

MIN_ROWS_PER_PROCESS = 5000  # a worker process costs ~1 s to start and feed; fewer rows are faster in one


class Dropped(Exception):
    """A row an encoder leaves out (counted by kind), not an error."""

    def __init__(self, kind: str, message: str = ""):
        super().__init__(kind, message)
        self.kind, self.message = kind, message


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def process_count(num_proc: Optional[int], rows: int) -> int:
    """data.num_proc, or by default the CPUs this process may use, one per MIN_ROWS_PER_PROCESS rows at most;
    never more than there are rows."""
    n = num_proc if num_proc is not None else min(available_cpus(), rows // MIN_ROWS_PER_PROCESS)
    return max(1, min(n, rows))


def _encode_batch(batch: dict, indices: list[int], encoder) -> dict:
    out: dict[str, list] = {k: [] for k in (*encoder.empty, "drop", "note")}
    names = list(batch)
    rows = [{k: batch[k][j] for k in names} for j in range(len(indices))]
    for result in encoder.encode_many(rows, indices):
        values, drop, note = ((encoder.empty, result.kind, result.message) if isinstance(result, Dropped)
                              else (result, "", ""))
        for k, v in values.items():
            out[k].append(v)
        out["drop"].append(drop)
        out["note"].append(note)
    return out


def encode_dataset(rows, encoder, *, features, num_proc: Optional[int], scratch: str, fingerprint: str,
                   desc: Optional[str] = None):
    """rows (datasets.Dataset) -> datasets.Dataset of the encoder's columns per row, plus drop/note.

    encoder: a picklable object with `empty` (the output columns' values for a left-out row) and
    `encode_many(rows, indices) -> [{column: value} or Dropped per row]` (a batch at a time, so that it can
    tokenise many rows in one call); features: the output columns' types (datasets.Features, with drop and
    note as strings). desc: a
    progress bar (rows/s and time left) with this title. Errors an encoder raises in a worker process are
    re-raised here (they must pickle: DataError and RowError do)."""
    import datasets

    n = process_count(num_proc, len(rows))
    if desc:
        datasets.enable_progress_bars()
    try:
        return rows.map(_encode_batch, batched=True, batch_size=500, with_indices=True, num_proc=n if n > 1 else None,
                        fn_kwargs={"encoder": encoder}, remove_columns=rows.column_names, features=features,
                        cache_file_name=os.path.join(scratch, "encoded.arrow"), new_fingerprint=fingerprint,
                        writer_batch_size=500, desc=desc)
    finally:
        datasets.disable_progress_bars()


def drop_summary(encoded) -> tuple[list[int], dict[str, int], list[tuple[int, str]]]:
    """(indices of the kept rows, {drop kind: count}, [(row index, note)] of the rows with a note, in order)."""
    kept, counts, notes = [], {}, []
    for i, (drop, note) in enumerate(zip(encoded["drop"], encoded["note"])):
        if not drop:
            kept.append(i)
            continue
        counts[drop] = counts.get(drop, 0) + 1
        if note:
            notes.append((i, note))
    return kept, counts, notes
