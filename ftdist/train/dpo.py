"""DPO and ORPO as Tasks: one forward over chosen and rejected rows, log-probs of the response tokens."""

from __future__ import annotations

from ftdist.algos.dpo import dpo_loss, orpo_loss
from ftdist.algos.sft import IGNORE_INDEX, sft_loss_sum
from ftdist.models.adapters import apply_lora
from ftdist.models.forward import causal_logits
from ftdist.models.loading import load_causal_lm
from ftdist.train.pairs import PairTask, pair_sums, sequence_logps
from ftdist.train.reference import Reference


class PolicyPairTask(PairTask):
    def build_model(self):
        return apply_lora(load_causal_lm(self.cfg.model), self.cfg.model)

    def policy_logps(self, engine, batch, average: bool = False):
        """(2B,) float32 summed (or per-token mean) response log-probs of the policy, with gradient."""
        logits = causal_logits(engine.forward, batch, self.attn_impl, self.dtype)  # (R, T, V)
        return sequence_logps(logits, batch, average=average)

    def extra_eval(self, engine, means: dict) -> dict:
        return self.task_accuracy(engine)


class DPOTask(PolicyPairTask):
    name = "dpo"

    def __init__(self, cfg, tokenizer, info):
        super().__init__(cfg, tokenizer, info)
        self.reference = Reference(self)

    def prepare_data(self, cache_dir: str, show_progress: bool) -> str:
        return super().prepare_data(cache_dir, show_progress) + f"\nreference: {self.reference.describe()}"

    def loss(self, engine, batch):
        batch = batch.to(engine.device)
        # the reference first: its activations are freed before the policy's are kept for backward
        ref_chosen, ref_rejected = self.reference.logps(engine, batch).chunk(2)  # (B,), (B,)
        chosen, rejected = self.policy_logps(engine, batch).chunk(2)
        chosen_len, rejected_len = batch.response_lengths.chunk(2)
        d = self.cfg.dpo
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=d.beta, loss_type=d.loss_type,
                                 label_smoothing=d.label_smoothing, chosen_lengths=chosen_len,
                                 rejected_lengths=rejected_len)
        return pair_sums(loss, metrics, batch.n_pairs)


class ORPOTask(PolicyPairTask):
    """SFT on the chosen responses plus an odds-ratio preference term; no reference model.

    orpo.nll=trl (default) takes the SFT term as TRL's ORPOTrainer does: the token mean of the cross-entropy
    over every real token of the chosen rows (prompt and response) of the micro-batch. pair_mean takes each
    pair's mean over its response tokens, so a pair weighs the same whatever batch it lands in.
    """

    name = "orpo"

    def loss(self, engine, batch):
        batch = batch.to(engine.device)
        logits = causal_logits(engine.forward, batch, self.attn_impl, self.dtype)  # (R, T, V)
        chosen, rejected = sequence_logps(logits, batch, average=True).chunk(2)  # (B,), (B,)
        if self.cfg.orpo.nll == "trl":
            targets = batch.input_ids.masked_fill(~batch.chosen_text_mask(), IGNORE_INDEX)  # (R, T)
            rows = slice(None) if batch.seq_ids is not None else slice(0, batch.n_pairs)  # padded: the chosen rows
            nll_sum, count = sft_loss_sum(logits[rows], targets[rows])
            nll = nll_sum / count.clamp(min=1)
        else:
            nll = -chosen.mean()
        loss, metrics = orpo_loss(chosen, rejected, nll, beta=self.cfg.orpo.beta)
        return pair_sums(loss, metrics, batch.n_pairs)
