"""Supervised fine-tuning as a Task: token cross-entropy on assistant turns."""

from __future__ import annotations

import logging
import math

import torch

from ftdist.algos.sft import sft_loss_sum
from ftdist.data.batching import TokenData, collate_rows
from ftdist.data.tokenize import tokenize_sft
from ftdist.models.adapters import apply_lora
from ftdist.models.forward import causal_logits
from ftdist.models.loading import DTYPES, attn_implementation, enable_neftune, load_causal_lm
from ftdist.train.generation import exact_match_accuracy, load_eval_conversations

log = logging.getLogger("ftdist")


class SFTTask:
    name = "sft"

    def __init__(self, cfg, tokenizer, info):
        self.cfg, self.tokenizer, self.info = cfg, tokenizer, info
        self.packing = cfg.data.packing
        self.capacity = cfg.data.max_length
        self.attn_impl = attn_implementation(cfg.model)
        self.dtype = DTYPES[cfg.model.dtype]
        self.train = self.eval = None

    def prepare_data(self, cache_dir: str, show_progress: bool) -> str:
        ds, stats = tokenize_sft(self.cfg.data.train, self.tokenizer, self.cfg.data, cache_dir, show_progress)
        self.train = TokenData(ds)
        summary = f"train: {stats.summary()}"
        if stats.skipped_examples:
            summary += " (e.g. " + "; ".join(stats.skipped_examples[:3]) + ")"
        if self.cfg.data.eval:
            eds, estats = tokenize_sft(self.cfg.data.eval, self.tokenizer, self.cfg.data, cache_dir, show_progress)
            self.eval = TokenData(eds)
            summary += f"\neval: {estats.summary()}"
        return summary

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
            convs = load_eval_conversations(self.cfg.data.eval, self.cfg.data, self.cfg.train.eval_max_samples)
            out["eval/accuracy"] = exact_match_accuracy(engine, self.tokenizer, convs,
                                                        self.cfg.train.eval_max_new_tokens,
                                                        self.cfg.train.micro_batch_size * 4)
        return out

    def export(self, engine, out_dir: str) -> None:
        engine.export_hf(out_dir, self.tokenizer)
