"""What the preference Tasks (reward model, DPO, ORPO) share: pair data, batches, units, task accuracy.

Units are pairs: `train.micro_batch_size` and `train.global_batch_size` count
pairs, a micro-batch of B pairs is one forward over 2B rows, and every loss and
metric is returned as a sum over the micro-batch's pairs for the loop to divide
by the pairs in the whole step.

With data.packing the pairs of a step stay the same (and so does the update);
each rank's pairs of the step run as micro-batches of whole pairs holding up to
`micro_tokens` tokens (2 x micro_batch_size sequences of data.max_length: never
more than a padded micro-batch can hold), each micro-batch one row of its
sequences end to end (data/preference.py), with no padding.
"""

from __future__ import annotations

import logging

from ftdist.algos.sft import sequence_logprobs
from ftdist.data.loading import DataError
from ftdist.data.mixture import (mix_lists, mix_tokenized, mixture_fingerprint, mixture_summary,
                                 source_configs)
from ftdist.data.preference import (PreferenceData, collate_pairs, load_preference_pairs, pair_tokens,
                                   tokenize_preference)
from ftdist.data.templates import template_label
from ftdist.models.loading import DTYPES, attn_implementation

log = logging.getLogger("ftdist")


def sequence_logps(logits, batch, average: bool = False):
    """(2B,) float32 summed (or per-token mean) response log-probs of each sequence of a pair batch (either
    layout), with the logits' gradient."""
    return sequence_logprobs(logits, batch.labels, average=average, seq_ids=batch.seq_ids, n_seqs=batch.n_seqs)


def pair_sums(loss, metrics: dict, n_pairs: int) -> tuple:
    """The algos' batch means -> sums over the batch's pairs (the Task loss convention), as tensors."""
    return loss * n_pairs, {"loss": loss.detach() * n_pairs, **{k: v.detach() * n_pairs for k, v in metrics.items()}}


class PairTask:
    name = "pairs"
    packing = False  # the planner never packs pairs into rows across the epoch: see micro_tokens

    def __init__(self, cfg, tokenizer, info):
        self.cfg, self.tokenizer, self.info = cfg, tokenizer, info
        self.capacity = cfg.data.max_length
        self.packed = cfg.data.packing
        self.micro_tokens = 2 * cfg.train.micro_batch_size * cfg.data.max_length if self.packed else None
        self.attn_impl = attn_implementation(cfg.model)
        self.dtype = DTYPES[cfg.model.dtype]
        self.train = self.eval = None
        self.cache_dir = None

    def prepare_data(self, cache_dir: str, show_progress: bool) -> str:
        """Tokenise data.train and data.eval, each source on its own (a mixture's pairs then taken by weight)."""
        self.cache_dir = cache_dir
        d = self.cfg.data

        def tokenize(src):
            return tokenize_preference(src.spec, self.tokenizer, src.cfg, cache_dir, show_progress)

        ds, parts, key = mix_tokenized(source_configs(d, "train"), tokenize, pair_tokens, self.cfg.seed)
        self.train = PreferenceData(ds, key)  # the key names these pairs (precomputed reference log-probs)
        summary = mixture_summary("train", parts, unit="pairs")
        if d.eval:
            eds, eparts, ekey = mix_tokenized(source_configs(d, "eval"), tokenize, pair_tokens, self.cfg.seed)
            self.eval = PreferenceData(eds, ekey)
            summary += "\n" + mixture_summary("eval", eparts, unit="pairs")
        return summary

    def data_fingerprint(self) -> str:
        return mixture_fingerprint(self.cfg.data)

    def require_column(self, column: str, why: str) -> None:
        for split, data in (("data.train", self.train), ("data.eval", self.eval)):
            if data is not None and not data.has(column):
                raise DataError(f"{why} needs a '{column}' value on every pair, and {split} has pairs without one "
                                f"(map the column with data.columns, e.g. {{{column}: your_column}})")

    def train_lengths(self):
        return self.train.pair_tokens if self.packed else self.train.lengths

    def eval_rows(self):
        return [] if self.eval is None else [[i] for i in range(len(self.eval))]

    def collate(self, rows, split: str):
        data = self.train if split == "train" else self.eval
        return collate_pairs([row[0] for row in rows], data, self.tokenizer.pad_token_id, split, packed=self.packed)

    def units(self, batch) -> int:
        return batch.n_pairs

    def tokens(self, batch) -> tuple[int, int]:
        return batch.n_tokens, batch.n_padded

    def extra_eval(self, engine, means: dict) -> dict:
        return {}

    def export(self, engine, out_dir: str) -> None:
        engine.export_hf(out_dir, self.tokenizer)

    def task_accuracy(self, engine) -> dict:
        """Exact match of greedy answers against the chosen responses of the eval pairs (chats with one reply)."""
        if not (self.cfg.train.eval_accuracy and self.cfg.data.eval):
            return {}
        from ftdist.train.generation import exact_match_accuracy

        limit = self.cfg.train.eval_max_samples

        def chats(src) -> list:
            convs = []
            for _, pair in load_preference_pairs(src.spec, src.cfg, on_row=lambda *skipped: None):
                if pair.conversational and len(pair.chosen) == 1:
                    convs.append((pair.prompt, pair.chosen[0]["content"]))
                if len(convs) >= limit:
                    break
            return convs

        convs = mix_lists(source_configs(self.cfg.data, "eval"), chats, self.cfg.seed, limit)
        if not convs:
            return {}
        acc = exact_match_accuracy(engine, self.tokenizer, convs, self.cfg.train.eval_max_new_tokens,
                                   self.cfg.train.micro_batch_size * 4,
                                   template_label(self.cfg.data.chat_template, self.tokenizer))
        return {"eval/accuracy": acc}
