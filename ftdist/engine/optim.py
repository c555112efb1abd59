"""Optimizers by recipe name. Only trainable parameters arrive here (the caller filters them).

The k-bit and paged optimizers come from bitsandbytes. Paging moves optimizer
state between GPU and host memory through CUDA unified memory, so on a machine
without CUDA the paged names run their non-paged twin (same update rule).
"""

from __future__ import annotations

import logging

import torch

from ftdist.config import OFFLOAD_OPTIMIZERS, ConfigError

log = logging.getLogger("ftdist")

# recipe name -> (bitsandbytes class, its non-paged twin)
BNB_OPTIMIZERS = {
    "adamw_8bit": ("AdamW8bit", "AdamW8bit"),
    "paged_adamw_32bit": ("PagedAdamW32bit", "AdamW32bit"),
    "paged_adamw_8bit": ("PagedAdamW8bit", "AdamW8bit"),
    "lion": ("Lion", "Lion"),
}


def bnb_optimizer_class(name: str, cuda: bool | None = None):
    import bitsandbytes as bnb

    paged, plain = BNB_OPTIMIZERS[name]
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if paged != plain and not cuda:
        log.warning("train.optimizer=%s: paged optimizers need CUDA; using bitsandbytes %s on this machine", name, plain)
        return getattr(bnb.optim, plain)
    return getattr(bnb.optim, paged)


def build_optimizer(train_cfg, param_groups: list[dict], offload: bool = False):
    """The optimizer of train.optimizer with ftdist's defaults, overridden by train.optimizer_kwargs."""
    name = train_cfg.optimizer
    lr = train_cfg.lr
    betas = (train_cfg.adam_beta1, train_cfg.adam_beta2)
    if offload:
        if name not in OFFLOAD_OPTIMIZERS:
            raise ConfigError(f"train.optimizer={name!r} cannot be combined with deepspeed.offload_optimizer=true "
                              f"(use adamw_torch, which becomes DeepSpeed's CPU Adam)")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return _make(DeepSpeedCPUAdam, param_groups, train_cfg, lr=lr, betas=betas, eps=train_cfg.adam_eps,
                     adamw_mode=True)
    if name == "adamw_torch":
        return _make(torch.optim.AdamW, param_groups, train_cfg, lr=lr, betas=betas, eps=train_cfg.adam_eps)
    if name == "sgd":
        return _make(torch.optim.SGD, param_groups, train_cfg, lr=lr, momentum=0.9)
    if name == "rmsprop":
        return _make(torch.optim.RMSprop, param_groups, train_cfg, lr=lr, eps=train_cfg.adam_eps)
    if name == "adagrad":
        return _make(torch.optim.Adagrad, param_groups, train_cfg, lr=lr, eps=train_cfg.adam_eps)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return _make(Adafactor, param_groups, train_cfg, lr=lr, scale_parameter=False, relative_step=False,
                     warmup_init=False)
    if name not in BNB_OPTIMIZERS:
        raise ConfigError(f"train.optimizer: unknown {name!r}")
    cls = bnb_optimizer_class(name)
    if name == "lion":
        # Lion's usual betas; its update is a sign, so Adam's betas/eps do not carry over
        return _make(cls, param_groups, train_cfg, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    return _make(cls, param_groups, train_cfg, lr=lr, betas=betas, eps=train_cfg.adam_eps, weight_decay=0.0)


def _make(cls, param_groups: list[dict], train_cfg, **defaults):
    """cls(param_groups, **defaults) with train.optimizer_kwargs on top, each key checked against cls."""
    import inspect

    extra = dict(getattr(train_cfg, "optimizer_kwargs", None) or {})
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params", "args", "kwargs")]
    for key, value in extra.items():
        if key not in allowed or key == "lr":
            why = "use train.lr" if key == "lr" else f"{cls.__name__} takes: {', '.join(allowed)}"
            raise ConfigError(f"train.optimizer_kwargs.{key}: not an argument of train.optimizer="
                              f"{train_cfg.optimizer} ({why})")
        if isinstance(value, list):
            extra[key] = tuple(value)  # betas: [0.9, 0.95] in YAML
    return cls(param_groups, **{**defaults, **extra})
