"""PPO prompts: the `prompt` data format, rendering, and the seeded order in which they are drawn.

A row is {"prompt": "text"} or {"prompt": [{"role": "user", "content": ...}, ...]}
(column name mappable with `data.columns`). Message lists are rendered with the
tokenizer's chat template and a generation prompt; plain text is used as is.
Every other column (e.g. "answer") travels with the prompt to the reward
function as a keyword argument and to the evaluation (exact match on "answer").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ftdist.data.formats import RowProblem, normalize_messages
from ftdist.data.loading import DataError, RowError, load_rows, resolve_data_path, row_filter
from ftdist.data.templates import render_chat, template_label


@dataclass
class PromptSet:
    texts: list[str]  # rendered prompts
    extras: dict[str, list]  # other columns, one value per prompt

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index: list[int]) -> "PromptSet":
        return PromptSet([self.texts[i] for i in index], {k: [v[i] for i in index] for k, v in self.extras.items()})

    @staticmethod
    def concat(sets: list["PromptSet"]) -> "PromptSet":
        """The prompts of every set in turn; a column some sets lack is None on their prompts."""
        names = list(dict.fromkeys(k for s in sets for k in s.extras))
        return PromptSet([t for s in sets for t in s.texts],
                         {k: [v for s in sets for v in s.extras.get(k, [None] * len(s))] for k in names})


def render_prompt(value, tokenizer, template: str | None = None) -> str:
    """A row's prompt as the policy continues it; `template` names the chat template in errors (template_label)."""
    if isinstance(value, str):
        if not value:
            raise RowProblem("prompt is empty")
        return value
    messages = normalize_messages(value, "prompt")
    if messages[-1]["role"] == "assistant":
        raise RowProblem("prompt ends with an assistant turn; the policy writes that turn")
    return render_chat(tokenizer, messages, template, tokenize=False, add_generation_prompt=True)


def load_prompts(spec: str, data_cfg, tokenizer, max_rows: int = 0) -> PromptSet:
    """Every row of `spec` rendered; a bad row stops with file and row number (or is skipped with on_error=skip)."""
    rows = load_rows(spec, data_cfg)
    path = resolve_data_path(spec)
    col = data_cfg.columns.get("prompt", "prompt")
    if col not in rows.column_names:
        raise DataError(f"{path}: no '{col}' column for PPO prompts (columns: {', '.join(rows.column_names)}; "
                        f"map one with data.columns={{prompt: your_column}})")
    others = [c for c in rows.column_names if c != col]
    texts, extras = [], {c: [] for c in others}
    keep = row_filter(data_cfg.filter, rows.column_names, path)
    template = template_label(data_cfg.chat_template, tokenizer)
    for i, row in enumerate(rows):
        if keep is not None and not keep(row, i):
            continue
        try:
            text = render_prompt(row[col], tokenizer, template)
        except RowProblem as e:
            if data_cfg.on_error == "skip":
                continue
            raise RowError(path, i + 1, str(e)) from None
        texts.append(text)
        for c in others:
            extras[c].append(row[c])
        if max_rows and len(texts) >= max_rows:
            break
    if not texts:
        raise DataError(f"{path}: no usable prompts")
    return PromptSet(texts, extras)


def load_prompt_sources(data_cfg, which: str, tokenizer, seed: int, max_rows: int = 0) -> tuple[PromptSet, str]:
    """data.train or data.eval as prompts: one source as load_prompts reads it, or a mixture whose sources each
    give the prompts their weight or samples ask for (seeded), concatenated. -> (prompts, one line per source)."""
    from ftdist.data.mixture import capped, single_source, source_configs, source_rows

    sources = source_configs(data_cfg, which)
    if single_source(sources):
        return load_prompts(sources[0].spec, data_cfg, tokenizer, max_rows), ""
    sets, lines = [], []
    for src in sources:
        read = load_prompts(src.spec, src.cfg, tokenizer)
        sets.append(read.take(source_rows(src, len(read), seed).tolist()))
        share = f" ({src.share})" if src.share else ""
        lines.append(f"{src.label}: read {len(read)} prompts; took {len(sets[-1])}{share}")
    mixed = PromptSet.concat(sets)
    return mixed.take(capped(len(mixed), max_rows, seed).tolist()), "\n".join(lines)


class PromptSampler:
    """Prompts in a fresh seeded order each epoch; the position is all a checkpoint needs to resume it."""

    def __init__(self, prompts: PromptSet, seed: int, epoch: int = 0, position: int = 0):
        self.prompts, self.seed = prompts, seed
        self.epoch, self.position = epoch, position

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))

    def next_batch(self, n: int) -> PromptSet:
        """n prompts; an epoch boundary inside the batch continues with the next epoch's order."""
        index: list[int] = []
        while len(index) < n:
            order = self._order()
            take = order[self.position:self.position + n - len(index)]
            index += take.tolist()
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return self.prompts.take(index)

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}
