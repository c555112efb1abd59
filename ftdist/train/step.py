"""The optimizer step: the one place that owns loss normalisation.

Every trainer (the loop's Tasks, the PPO policy and critic workers) hands this
function one optimizer step's micro-batches on its rank, the number of units
each one holds (target tokens, pairs, response tokens) and a loss function that
returns SUMS over a micro-batch's units. Then:

  1. count  the units of the whole step over all micro-batches and all ranks
            (one all-reduce, before any backward);
  2. divide each micro-batch's loss sum by that count, so the gradient is the
            true mean over the step however samples are split over micro-batches
            and ranks (the 2024 gradient-accumulation bug is a per-micro-batch mean);
  3. backward and step through DeepSpeed on every micro-batch, the last one marked as
            the accumulation boundary (a step may hold any number of micro-batches, the
            same on every rank); DeepSpeed's own 1/accumulation scaling is off, and it
            AVERAGES gradients over ranks, which the world-size factor undoes;
  4. sum the metrics as tensors and all-reduce them once at the end of the step:
            no host sync per micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ftdist.engine.dist import all_reduce_sum
from ftdist.errors import UserError

LossFn = Callable[[object], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepResult:
    units: float  # units in the step, all ranks
    sums: dict[str, float]  # metric sums over those units, all ranks
    counters: dict[str, float] = field(default_factory=dict)  # the caller's counters, summed over ranks
    grad_norm: Optional[float] = None  # before clipping

    @property
    def means(self) -> dict[str, float]:
        return {k: v / max(self.units, 1.0) for k, v in self.sums.items()}

    def nonfinite(self, fp16: bool) -> Optional[str]:
        """The first non-finite metric or gradient norm, as "name=value", else None. With fp16, an infinite
        gradient norm is DeepSpeed's loss scaler at work (it skips that step and lowers the scale), not a fault."""
        for k, v in self.means.items():
            if not math.isfinite(v):
                return f"{k}={v}"
        if self.grad_norm is not None and not math.isfinite(self.grad_norm) and not fp16:
            return f"grad_norm={self.grad_norm}"
        return None


class NonFiniteError(UserError):
    """A step produced a non-finite loss or gradient norm: training stops before anything of it is saved."""


def optimizer_step(engine, micro_batches: Sequence, units: Sequence[float], loss_fn: LossFn,
                   counters: Optional[dict[str, float]] = None) -> StepResult:
    """One optimizer step over this rank's micro-batches (collective: every rank calls it once per step).

    loss_fn(micro) -> (loss summed over the micro-batch's units, {metric: sum over those units}).
    units[i] is the number of units of micro_batches[i]; counters are host numbers summed over ranks
    with the units (e.g. real and padded tokens).
    """
    keys = sorted(counters or {})
    total, *summed = all_reduce_sum([sum(units), *((counters or {})[k] for k in keys)], engine.device)
    scale = engine.info.world_size / max(total, 1.0)
    sums: dict[str, torch.Tensor] = {}
    for i, micro in enumerate(micro_batches):
        engine.accumulation_boundary(i == len(micro_batches) - 1)
        loss_sum, metrics = loss_fn(micro)
        engine.backward(loss_sum * scale)
        engine.step()
        for k, v in metrics.items():
            v = v.detach()
            sums[k] = sums[k] + v if k in sums else v
    names = sorted(sums)
    reduced = all_reduce_sum([sums[k] for k in names], engine.device)
    return StepResult(units=total, sums=dict(zip(names, reduced)), counters=dict(zip(keys, summed)),
                      grad_norm=engine.grad_norm())
