"""Reward-model training as a Task: Bradley-Terry loss on the scores of chosen and rejected texts."""

from __future__ import annotations

import logging

from ftdist.algos.reward import gather_last, gather_last_per_sequence, pairwise_reward_loss, score_diff_weights
from ftdist.models.adapters import apply_lora, is_peft_model
from ftdist.models.forward import model_inputs
from ftdist.models.heads import export_reward_model, load_reward_model, pad_appears_in_text, token_values
from ftdist.train.pairs import PairTask, pair_sums

log = logging.getLogger("ftdist")


class RewardTask(PairTask):
    name = "rm"

    def prepare_data(self, cache_dir: str, show_progress: bool) -> str:
        summary = super().prepare_data(cache_dir, show_progress)
        rm = self.cfg.rm
        if rm.margin == "column":
            self.require_column("margin", "rm.margin=column")
        if rm.margin == "score_diff" or rm.score_diff_weighting or rm.score_diff_scaling:
            why = ("rm.margin=score_diff" if rm.margin == "score_diff" else
                   "rm.score_diff_weighting" if rm.score_diff_weighting else "rm.score_diff_scaling")
            self.require_column("score_chosen", why)
            self.require_column("score_rejected", why)
        return summary

    def build_model(self):
        if pad_appears_in_text(self.tokenizer):
            log.warning("the tokenizer pads with %r, a token that also occurs in texts; rewards are still taken at "
                        "the last real token (attention mask)", self.tokenizer.pad_token)
        model = load_reward_model(self.cfg.model, self.cfg.rm.head, self.tokenizer.pad_token_id, self.cfg.seed)
        return apply_lora(model, self.cfg.model, task_type="SEQ_CLS")

    def rewards(self, engine, batch):
        """(2B,) float32: the head's value at each sequence's last token."""
        values = token_values(engine.forward, engine.module, model_inputs(batch, self.attn_impl, self.dtype))
        if batch.seq_ids is not None:  # packed: (1, T) -> (2B,)
            return gather_last_per_sequence(values, batch.seq_ids, batch.n_seqs)
        return gather_last(values, batch.attention_mask)  # (2B, T) -> (2B,)

    def loss(self, engine, batch):
        batch = batch.to(engine.device)
        chosen, rejected = self.rewards(engine, batch).chunk(2)  # (B,), (B,)
        rm = self.cfg.rm
        margin = None
        if rm.margin == "column":
            margin = batch.margin * rm.margin_scale
        elif rm.margin == "score_diff":
            margin = (batch.score_chosen - batch.score_rejected) * rm.margin_scale
        weights = score_diff_weights(batch.score_chosen, batch.score_rejected) if rm.score_diff_weighting else None
        scale = (batch.score_chosen - batch.score_rejected) ** 2 if rm.score_diff_scaling else None
        loss, metrics = pairwise_reward_loss(chosen, rejected, margin=margin, weights=weights, scale=scale)
        return pair_sums(loss, metrics, batch.n_pairs)

    def export(self, engine, out_dir: str) -> None:
        if is_peft_model(engine.module):
            engine.export_hf(out_dir, self.tokenizer)
            return
        sd = engine.full_state_dict()  # collective under ZeRO-3
        if self.info.is_main:
            export_reward_model(sd, engine.module, out_dir, self.tokenizer)
