"""LoRA adapters through peft: wrapping a loaded model, and switching the adapter off.

The reference model of LoRA/QLoRA DPO and PPO is the policy with its adapter
disabled (DESIGN.md), so `adapter_disabled` is the one way the Tasks get it.
"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger("ftdist")


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def lora_config(model_cfg, task_type: str = "CAUSAL_LM"):
    """peft LoraConfig for the recipe's `model.lora` section."""
    from peft import LoraConfig

    lc = model_cfg.lora
    targets = lc.target_modules
    return LoraConfig(
        task_type=task_type,
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        modules_to_save=list(lc.modules_to_save) or None,
        bias=lc.bias,
    )


def apply_lora(model, model_cfg, task_type: str = "CAUSAL_LM"):
    """Wrap `model` in a peft LoRA model when the recipe has `model.lora`; otherwise return it unchanged.

    Quantised models are first prepared for k-bit training (fp32 norms, input
    grads for checkpointing). `task_type` is "SEQ_CLS" for reward/value models,
    whose scalar head must then be listed in model.lora.modules_to_save.
    """
    if model_cfg.lora is None or is_peft_model(model):
        return model
    from peft import get_peft_model

    from ftdist.models.loading import count_parameters
    from ftdist.models.quant import is_quantized, prepare_kbit

    if is_quantized(model):
        prepare_kbit(model, model_cfg)
    elif model_cfg.gradient_checkpointing:
        # with reentrant checkpointing, blocks whose inputs come from frozen embeddings get no grads at all
        model.enable_input_require_grads()
    try:
        peft_model = get_peft_model(model, lora_config(model_cfg, task_type))
    except ValueError as e:
        from ftdist.models.loading import ModelError

        raise ModelError(f"model.lora: {e}") from None
    # the recipe's name, not this machine's cache path, so the adapter names its base portably
    for pc in peft_model.peft_config.values():
        pc.base_model_name_or_path = model_cfg.name_or_path
    n_trainable, n_total = count_parameters(peft_model)
    log.info("LoRA r=%d alpha=%g on %s: %s trainable of %s parameters (%.3f%%)", model_cfg.lora.r,
             model_cfg.lora.alpha, _targets(peft_model), f"{n_trainable:,}", f"{n_total:,}",
             100 * n_trainable / max(n_total, 1))
    return peft_model


def _targets(peft_model) -> str:
    targets = next(iter(peft_model.peft_config.values())).target_modules
    return ",".join(sorted(targets)) if not isinstance(targets, str) else targets


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model inside: every LoRA layer bypassed while the block runs (reference model)."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the PeftModel
    if not is_peft_model(inner):
        raise TypeError(f"adapter_disabled needs a peft model, got {type(inner).__name__} (is model.lora set?)")
    with inner.disable_adapter():
        yield model
