"""What a training recipe asks of this machine and of the files it names, checked before the tokenizer, the data
or the model loads: each would otherwise fail only after the slow part (a model load, a tokenisation), or as a
traceback from inside a library.

`preflight(cfg)` runs on rank 0 at the start of training (train/loop.py), and may run in PPO's driver before its
actors start; the recipe's own rules were checked when it loaded (config/validate.py).
"""

from __future__ import annotations

import logging

import torch

from ftdist.config import Config, ConfigError
from ftdist.data.mixture import check_sources
from ftdist.models.loading import check_model_source, resolve_max_length
from ftdist.run.metrics import wandb_problem

log = logging.getLogger("ftdist")


def check_precision(model_cfg) -> None:
    """fp16 training is DeepSpeed's fp16 mode with loss scaling, which needs a GPU."""
    if model_cfg.dtype == "fp16" and not torch.cuda.is_available():
        raise ConfigError("model.dtype=fp16 needs a GPU (DeepSpeed's fp16 mode with loss scaling does not run on "
                          "the CPU); use model.dtype=bf16 or fp32 here")


def preflight(cfg: Config) -> Config:
    """The recipe with data.max_length resolved, once everything below holds (else one error naming the key):
    the precision runs on this machine (not for ppo: its actors' devices decide); model.name_or_path (and
    dpo.reference_model, ppo.reward_model) is a model, not a LoRA adapter; every local data source exists;
    logging.wandb has its package and a key; data.max_length fits the model's positions. Logs what loading the
    recipe decided on the user's behalf (cfg.notes)."""
    for note in cfg.notes:
        log.info("%s", note)
    if cfg.stage != "ppo":
        check_precision(cfg.model)
    check_model_source(cfg.model.name_or_path, "model.name_or_path")
    for key, other in (("dpo.reference_model", cfg.dpo.reference_model if cfg.stage == "dpo" else None),
                       ("ppo.reward_model", cfg.ppo.reward_model if cfg.stage == "ppo" else None)):
        if other is not None:
            check_model_source(other, key)
    check_sources(cfg.data)
    if cfg.logging.wandb:
        problem = wandb_problem()
        if problem is not None:
            raise ConfigError(problem)
    resolved = resolve_max_length(cfg)
    resolved.notes = cfg.notes  # a replaced recipe (data.max_length: null) keeps them
    return resolved
