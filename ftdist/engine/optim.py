"""Optimizers by recipe name. Only trainable parameters arrive here (the caller filters them)."""

from __future__ import annotations

import torch

from ftdist.config import ConfigError


def build_optimizer(train_cfg, param_groups: list[dict], offload: bool = False):
    name = train_cfg.optimizer
    lr = train_cfg.lr
    betas = (train_cfg.adam_beta1, train_cfg.adam_beta2)
    if offload:
        if name not in ("adamw_torch", "paged_adamw_32bit"):
            raise ConfigError(f"train.optimizer={name!r} cannot be combined with deepspeed.offload_optimizer=true "
                              f"(use adamw_torch, which becomes DeepSpeed's CPU Adam)")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, lr=lr, betas=betas, eps=train_cfg.adam_eps, adamw_mode=True)
    if name == "adamw_torch":
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=train_cfg.adam_eps)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(param_groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    import bitsandbytes as bnb

    bnb_optimizers = {
        "adamw_8bit": lambda: bnb.optim.AdamW8bit(param_groups, lr=lr, betas=betas, eps=train_cfg.adam_eps),
        "paged_adamw_32bit": lambda: bnb.optim.PagedAdamW32bit(param_groups, lr=lr, betas=betas, eps=train_cfg.adam_eps),
        "paged_adamw_8bit": lambda: bnb.optim.PagedAdamW8bit(param_groups, lr=lr, betas=betas, eps=train_cfg.adam_eps),
        "lion": lambda: bnb.optim.Lion(param_groups, lr=lr, betas=(0.9, 0.99)),
    }
    if name not in bnb_optimizers:
        raise ConfigError(f"train.optimizer: unknown {name!r}")
    return bnb_optimizers[name]()
