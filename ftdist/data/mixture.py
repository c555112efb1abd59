"""Data mixtures: data.train (or data.eval) as a list of sources, each with its own settings and share.

Every source is read and tokenised on its own, exactly as a single source is (so each is cached under its own
fingerprint), as data.* with the source's keys in place (`source_configs`). Then each source gives the rows its
weight or samples ask for (`select_rows`, seeded by the run's seed and the source's place in the list), and the
selections are concatenated in list order (the epoch's order is shuffled by the step planner anyway).

A plain string is a mixture of one source that takes all its rows: the same config, the same cache key, the
same rows as without this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np

from ftdist.config.schema import DataConfig, DataSource
from ftdist.data.loading import DataError, check_local_source, data_fingerprint, resolve_data_path

# the keys of a source that replace data.* (split is placed by side: data.split or data.eval_split)
OVERRIDES = ("subset", "revision", "format", "columns", "filter", "max_samples", "shuffle_seed")


@dataclass(frozen=True)
class Source:
    which: str  # train or eval
    index: Optional[int]  # its place in the mixture's list; None: data.train / data.eval is a plain string
    spec: str  # the path or dataset name, as the readers take it
    cfg: DataConfig  # data.* with the source's own keys in place
    weight: Optional[float] = None
    samples: Optional[int] = None

    @property
    def label(self) -> str:
        """The recipe key and the path, with the split where the source has splits (not a plain file)."""
        split = self.cfg.split if self.which == "train" else self.cfg.eval_split
        shown = self.spec if os.path.isfile(resolve_data_path(self.spec)) else f"{self.spec} (split {split})"
        return f"data.{self.which}" + ("" if self.index is None else f"[{self.index}]") + f" {shown}"

    @property
    def share(self) -> str:
        """How many rows the recipe asks for, as it says it ('' = all of them, once)."""
        if self.weight is not None:
            return f"weight {self.weight:g}"
        return f"samples {self.samples}" if self.samples is not None else ""


def is_mixture(value) -> bool:
    return isinstance(value, list)


def single_source(sources: list[Source]) -> bool:
    """A single source given as a string: read as before mixtures, all its rows once, in file order."""
    return len(sources) == 1 and sources[0].index is None


def source_configs(data_cfg: DataConfig, which: str = "train") -> list[Source]:
    """The sources of data.train or data.eval (none when it is null), each with its own DataConfig."""
    value = getattr(data_cfg, which)
    if value is None:
        return []
    if not is_mixture(value):
        return [Source(which, None, value, data_cfg)]
    out = []
    for i, item in enumerate(value):
        src = item if isinstance(item, DataSource) else DataSource(path=item)
        given = {k: getattr(src, k) for k in OVERRIDES if getattr(src, k) is not None}
        if which == "train":
            cfg = replace(data_cfg, train=src.path, split=src.split or data_cfg.split, **given)
        else:  # data.train cleared: an eval source that is also a train source still reads its eval split
            cfg = replace(data_cfg, train=None, eval=src.path, eval_split=src.split or data_cfg.eval_split, **given)
        out.append(Source(which, i, src.path, cfg, src.weight, src.samples))
    return out


def check_sources(data_cfg: DataConfig) -> None:
    """Before anything loads: every local source of data.train and data.eval exists and asks for no revision (a
    DataError naming its key, e.g. data.train[1], and its path)."""
    for which in ("train", "eval"):
        for src in source_configs(data_cfg, which):
            check_local_source(src.spec, src.cfg, f"data.{which}" + ("" if src.index is None else f"[{src.index}]"))


def select_rows(n_rows: int, weight: Optional[float] = None, samples: Optional[int] = None,
                seed: Sequence[int] | int = 0) -> np.ndarray:
    """Row indices (int64, ascending) taken from a source of n_rows usable rows.

    Neither weight nor samples: every row once. Otherwise k = weight x n_rows rounded (halves up), or k = samples:
    k // n_rows whole copies of every row, plus k % n_rows distinct rows drawn without replacement by a
    generator seeded with `seed` (the same seed, the same rows)."""
    if weight is not None and samples is not None:
        raise ValueError("give weight or samples, not both")
    if n_rows <= 0:
        return np.zeros(0, dtype=np.int64)
    if weight is None and samples is None:
        return np.arange(n_rows, dtype=np.int64)
    k = math.floor(weight * n_rows + 0.5) if weight is not None else int(samples)
    repeats, rest = divmod(k, n_rows)
    drawn = np.sort(np.random.default_rng(seed).permutation(n_rows)[:rest])
    return np.sort(np.concatenate([np.tile(np.arange(n_rows, dtype=np.int64), repeats), drawn.astype(np.int64)]))


def source_rows(source: Source, n_rows: int, seed: int) -> np.ndarray:
    """select_rows for a source, seeded by the run's seed and its place in the list; a share that rounds to no
    rows is an error."""
    if source.index is None:
        return np.arange(n_rows, dtype=np.int64)
    rows = select_rows(n_rows, source.weight, source.samples, seed=[seed, source.index])
    if len(rows) == 0:
        raise DataError(f"{source.label}: {source.share} of its {n_rows} usable rows takes no rows; raise the "
                        f"weight or give samples")
    return rows


def mixture_fingerprint(data_cfg: DataConfig) -> str:
    """The training data's content as a resume compares it: a single source's digest (as before mixtures), or,
    for a mixture, one digest over every source's digest, its own settings and its share."""
    if not is_mixture(data_cfg.train):
        return data_fingerprint(data_cfg.train, data_cfg)
    parts = []
    for src in source_configs(data_cfg, "train"):
        c = src.cfg
        parts.append([data_fingerprint(src.spec, c), c.split, *(getattr(c, k) for k in OVERRIDES), src.weight,
                      src.samples])
    return "mixture:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass
class Part:
    """One source's contribution: its tokenised rows, how they were read (stats), the rows taken."""
    source: Source
    ds: object  # datasets.Dataset
    stats: object  # EncodeStats or PreferenceStats (.summary())
    rows: np.ndarray  # row indices taken
    token_counts: np.ndarray  # tokens of each of the source's rows
    key: str = ""  # the tokenised cache's key, where the tokeniser names it


def mix_tokenized(sources: list[Source], tokenize: Callable, token_counts: Callable, seed: int):
    """Tokenise every source (tokenize(source) -> (ds, stats) or (ds, stats, cache key)), take its rows and
    concatenate them.

    -> (datasets.Dataset, parts, key). One plain source comes back untouched (no copy, no reordering) with its
    own key; a mixture's key covers every source's key, share and place, and the seed."""
    import datasets

    parts = []
    for src in sources:
        ds, stats, *key = tokenize(src)
        parts.append(Part(src, ds, stats, source_rows(src, len(ds), seed), token_counts(ds), *key))
    if single_source(sources):
        return parts[0].ds, parts, parts[0].key
    # an index mapping over each source's (memory-mapped) rows, held in memory: nothing is written beside the cache
    mixed = datasets.concatenate_datasets([p.ds.select(p.rows, keep_in_memory=True) for p in parts])
    what = [[p.key, p.source.index, p.source.weight, p.source.samples] for p in parts]
    return mixed, parts, "mix-" + hashlib.sha256(json.dumps([seed, what]).encode()).hexdigest()[:16]


def list_lengths(ds, column: str) -> np.ndarray:
    """len() of every list in a column of a datasets.Dataset (its rows as they are indexed), through Arrow: no
    Python lists built."""
    import pyarrow.compute as pc

    lists = ds.with_format("arrow")[column]
    return pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)


def mixture_summary(side: str, parts: list[Part], describe: Callable = lambda stats: stats.summary(),
                    unit: str = "rows") -> str:
    """`side: <describe(stats)>` for one plain source (as before mixtures); for a mixture its total, then one line
    per source: what was read (its stats) and what was taken."""
    if single_source([p.source for p in parts]):
        return f"{side}: {describe(parts[0].stats)}"
    taken_rows = sum(len(p.rows) for p in parts)
    taken_tokens = sum(int(p.token_counts[p.rows].sum()) for p in parts)
    lines = [f"{side}: mixture of {len(parts)} sources, {taken_rows} {unit}, {taken_tokens} tokens"]
    for p in parts:
        share = f" ({p.source.share})" if p.source.share else ""
        lines.append(f"  {p.source.label}: read {describe(p.stats)}; took {len(p.rows)} {unit}, "
                     f"{int(p.token_counts[p.rows].sum())} tokens{share}")
    return "\n".join(lines)


def mix_lists(sources: list[Source], load: Callable, seed: int, limit: int = 0) -> list:
    """Rows held as Python lists (evaluation prompts, conversations): load(source) -> list per source, the
    source's rows taken, concatenated; at most `limit` (0 = all), a seeded subsample kept in order."""
    if single_source(sources):
        return load(sources[0])
    out = []
    for src in sources:
        items = load(src)
        out += [items[j] for j in source_rows(src, len(items), seed)] if items else []
    return [out[j] for j in capped(len(out), limit, seed)]


def capped(n_rows: int, limit: int, seed: int) -> np.ndarray:
    """At most `limit` of n_rows rows (0 = all): a seeded subsample, kept in order."""
    if not limit or n_rows <= limit:
        return np.arange(n_rows, dtype=np.int64)
    return np.sort(np.random.default_rng([seed, 0x636170]).permutation(n_rows)[:limit])
