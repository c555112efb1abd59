"""Supervised fine-tuning as a Task: token cross-entropy on assistant turns."""

from __future__ import annotations

import logging
import math

import torch

from ftdist.algos.sft import sft_loss_sum
from ftdist.data.batching import TokenData, collate_rows
from ftdist.data.mixture import (list_lengths, mix_lists, mix_tokenized, mixture_fingerprint, mixture_summary,
                                 source_configs)
from ftdist.data.templates import template_label
from ftdist.data.tokenize import tokenize_sft
from ftdist.models.adapters import apply_lora
from ftdist.models.forward import causal_logits
from ftdist.models.loading import DTYPES, attn_implementation, enable_neftune, load_causal_lm
from ftdist.train.generation import exact_match_accuracy, load_eval_conversations

log = logging.getLogger("ftdist")


class SFTTask:
    name = "sft"
    micro_tokens = None  # packing is across the epoch, into rows of `capacity` (plan_epoch)

    def __init__(self, cfg, tokenizer, info):
        self.cfg, self.tokenizer, self.info = cfg, tokenizer, info
        self.packing = cfg.data.packing
        self.capacity = cfg.data.max_length
        self.attn_impl = attn_implementation(cfg.model)
        self.dtype = DTYPES[cfg.model.dtype]
        self.train = self.eval = None

    def prepare_data(self, cache_dir: str, show_progress: bool) -> str:
        """Tokenise data.train and data.eval, each source on its own (a mixture's rows then taken by weight)."""
        def tokenize(src):
            return tokenize_sft(src.spec, self.tokenizer, src.cfg, cache_dir, show_progress)

        def with_examples(stats) -> str:
            examples = " (e.g. " + "; ".join(stats.skipped_examples[:3]) + ")" if stats.skipped_examples else ""
            return stats.summary() + examples

        def tokens(ds):
            return list_lengths(ds, "input_ids")

        ds, parts, _ = mix_tokenized(source_configs(self.cfg.data, "train"), tokenize, tokens, self.cfg.seed)
        self.train = TokenData(ds)
        summary = mixture_summary("train", parts, with_examples)
        if self.cfg.data.eval:
            eds, eparts, _ = mix_tokenized(source_configs(self.cfg.data, "eval"), tokenize, tokens, self.cfg.seed)
            self.eval = TokenData(eds)
            summary += "\n" + mixture_summary("eval", eparts)
        return summary

    def data_fingerprint(self) -> str:
        return mixture_fingerprint(self.cfg.data)

    def train_lengths(self):
        return self.train.lengths

    def eval_rows(self):
        return [] if self.eval is None else [[i] for i in range(len(self.eval))]

    def collate(self, rows, split: str):
        data = self.train if split == "train" else self.eval
        packed = self.packing and split == "train"
        return collate_rows(rows, data, self.tokenizer.pad_token_id, self.capacity, packed)

    def units(self, batch) -> int:
        return batch.n_target_tokens

    def tokens(self, batch) -> tuple[int, int]:
        return batch.n_tokens, batch.n_padded

    def build_model(self):
        model = apply_lora(load_causal_lm(self.cfg.model), self.cfg.model)
        enable_neftune(model, self.cfg.train.neftune_alpha)
        return model

    def loss(self, engine, batch):
        batch = batch.to(engine.device)
        logits = causal_logits(engine.forward, batch, self.attn_impl, self.dtype)  # (B, T, V)
        eps = self.cfg.train.label_smoothing
        loss_sum, _ = sft_loss_sum(logits, batch.labels, label_smoothing=eps)
        metrics = {"loss": loss_sum.detach()}
        if eps > 0:  # the loss is smoothed; perplexity comes from the plain negative log-likelihood
            with torch.no_grad():
                metrics["nll"] = sft_loss_sum(logits, batch.labels)[0]
        return loss_sum, metrics

    def extra_eval(self, engine, means: dict) -> dict:
        nll = means.get("eval/nll", means["eval/loss"])
        out = {"eval/perplexity": math.exp(min(nll, 50.0))}  # exp(50) ~ 5e21: no overflow
        if self.cfg.train.eval_accuracy and self.cfg.data.eval:
            limit = self.cfg.train.eval_max_samples
            convs = mix_lists(source_configs(self.cfg.data, "eval"),
                              lambda src: load_eval_conversations(src.spec, src.cfg, limit), self.cfg.seed, limit)
            out["eval/accuracy"] = exact_match_accuracy(engine, self.tokenizer, convs,
                                                        self.cfg.train.eval_max_new_tokens,
                                                        self.cfg.train.micro_batch_size * 4,
                                                        template_label(self.cfg.data.chat_template, self.tokenizer))
        return out

    def export(self, engine, out_dir: str) -> None:
        engine.export_hf(out_dir, self.tokenizer)
