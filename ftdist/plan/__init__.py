"""Per-GPU memory planner behind `ftdist plan`: the arithmetic (estimate.py, no torch) and the command (cli.py)."""

from ftdist.plan.cli import build_parser, describe, emit_recipe, format_table, main, run
from ftdist.plan.estimate import (DTYPE_BYTES, GB, LINEAR_TARGETS, METHODS, OFFLOADS, OPTIMIZER_ALIASES,
                                  OPTIMIZER_STATE_BYTES, PRESETS, ZERO3_MAX_LIVE_PARAMETERS, ZERO3_MAX_REUSE_DISTANCE,
                                  ZERO3_PREFETCH_BUCKET, Candidate, MemoryEstimate, ModelShape, Recommendation,
                                  activation_bytes, activation_parts, estimate, recommend, speed_rank,
                                  weights_bytes, zero3_gathered_params)

__all__ = [
    "build_parser", "describe", "emit_recipe", "format_table", "main", "run", "DTYPE_BYTES", "GB", "LINEAR_TARGETS",
    "METHODS", "OFFLOADS", "OPTIMIZER_ALIASES", "OPTIMIZER_STATE_BYTES", "PRESETS", "ZERO3_MAX_LIVE_PARAMETERS",
    "ZERO3_MAX_REUSE_DISTANCE", "ZERO3_PREFETCH_BUCKET", "Candidate", "MemoryEstimate", "ModelShape",
    "Recommendation", "activation_bytes", "activation_parts", "estimate", "recommend", "speed_rank", "weights_bytes",
    "zero3_gathered_params",
]
