"""The Task protocol: what differs between SFT, reward modelling, DPO and ORPO.

The loop (train/loop.py) owns epochs, step plans, logging, evaluation cadence
and checkpoints; the step function (train/step.py) owns the normalisation. A Task
owns its data, its model and its loss. Loss convention: `loss(engine, batch)`
returns (loss SUMMED over the batch's units, {metric: sum over those units}), all
tensors; the step divides by the number of units in the whole step (target tokens
for SFT, pairs for RM/DPO) over all micro-batches and ranks.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

import torch

from ftdist.data.batching import Row


class Task(Protocol):
    name: str
    packing: bool  # samples packed into rows of `capacity` tokens across the epoch (SFT)
    capacity: int
    micro_tokens: Optional[int]  # pair stages with data.packing: tokens per micro-batch of whole pairs (else None)

    def prepare_data(self, cache_dir: str, show_progress: bool) -> str:
        """Tokenise train/eval data (called on rank 0 first, then the others reuse the cache); returns a summary."""

    def data_fingerprint(self) -> str:
        """The training data's content (every source's, with a mixture's shares), which a resume compares."""

    def train_lengths(self) -> Sequence[int]: ...

    def eval_rows(self) -> list[Row]: ...

    def collate(self, rows: list[Row], split: str) -> Any: ...

    def units(self, batch) -> int:
        """How many units the loss averages over in this batch (target tokens, pairs)."""

    def tokens(self, batch) -> tuple[int, int]:
        """(real tokens, processed tokens including padding)."""

    def build_model(self) -> torch.nn.Module: ...

    def loss(self, engine, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def extra_eval(self, engine, means: dict[str, float]) -> dict[str, float]:
        """Metrics beyond the means of the loss metrics (`means`, keyed eval/...): perplexity, exact-match
        accuracy; collective."""

    def export(self, engine, out_dir: str) -> None: ...


def make_task(cfg, tokenizer, info) -> Task:
    if cfg.stage == "sft":
        from ftdist.train.sft import SFTTask

        return SFTTask(cfg, tokenizer, info)
    if cfg.stage == "rm":
        from ftdist.train.rm import RewardTask

        return RewardTask(cfg, tokenizer, info)
    if cfg.stage in ("dpo", "orpo"):
        from ftdist.train.dpo import DPOTask, ORPOTask

        return (DPOTask if cfg.stage == "dpo" else ORPOTask)(cfg, tokenizer, info)
    raise NotImplementedError(f"stage={cfg.stage!r} is not available in this version")


def maybe(x: Optional[float]) -> Optional[float]:
    return None if x is None else float(x)
