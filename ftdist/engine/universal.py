"""Resuming on another number of ranks: DeepSpeed's universal checkpoint.

ZeRO splits the optimizer state (ZeRO-1/2) and the weights (ZeRO-3) into one shard per rank, so a checkpoint
saved by N ranks cannot be loaded by M as it is. DeepSpeed's `ds_to_universal` merges the shards into one file
per parameter (fp32 weight, Adam's exp_avg and exp_avg_sq), which any number of ranks can load and slice again.
ftdist runs that conversion on the fly when a resume finds another number of ranks (rank 0, into
output_dir/cache/universal, removed once every rank has loaded it); the checkpoint itself is never changed.

What carries over: weights, Adam(W) moments and step counts, the scheduler, the data position. What does not:
optimizer state other than Adam's two moments (SGD momentum, Lion, Adafactor, 8-bit states: refused before
anything is loaded), and each rank's RNG stream (a new rank starts fresh; a warning says so).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
from pathlib import Path

import torch

from ftdist.config import ConfigError

log = logging.getLogger("ftdist")

# optimizers whose whole state is Adam's exp_avg / exp_avg_sq (what the universal format carries); with
# optimizer offload these become DeepSpeed's CPU Adam, whose state is the same
RESHARDABLE_OPTIMIZERS = ("adamw_torch", "paged_adamw_32bit")


def reshard_refusal(cfg) -> str | None:
    """Why a checkpoint of this recipe cannot be resumed on another number of ranks, or None if it can."""
    if cfg.train.optimizer not in RESHARDABLE_OPTIMIZERS:
        return (f"train.optimizer={cfg.train.optimizer} keeps state that DeepSpeed's universal checkpoint does not "
                f"carry (it holds Adam's two moments only: {', '.join(RESHARDABLE_OPTIMIZERS)})")
    return None


@contextlib.contextmanager
def weights_only_torch_load():
    """DeepSpeed's converter and universal loader read with torch.load(weights_only=False); inside this block
    every torch.load is weights-only with DeepSpeed's own types allowed (see engine.safe_checkpoint_load)."""
    from ftdist.engine.engine import safe_checkpoint_load

    original = torch.load

    def load(f, map_location=None, *args, **kwargs):
        return safe_checkpoint_load(f, map_location)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def to_universal(engine_dir: Path, out_dir: Path) -> Path:
    """One process: the universal form of a DeepSpeed checkpoint tag directory (`engine_dir`, e.g.
    checkpoints/step-N/engine) in out_dir/engine; returns out_dir, the directory to load it from."""
    from deepspeed.checkpoint import ds_to_universal

    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    args = argparse.Namespace(input_folder=str(engine_dir), output_folder=str(out_dir / "engine"),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    printed = io.StringIO()  # its progress report goes to the log at debug level, not the terminal
    try:
        with weights_only_torch_load(), contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise ConfigError(f"{engine_dir}: DeepSpeed's universal checkpoint conversion (needed to resume on "
                          f"another number of ranks) failed: {type(e).__name__}: {e}") from e
    log.debug("ds_to_universal: %s", printed.getvalue())
    return out_dir
