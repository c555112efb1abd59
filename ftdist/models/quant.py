"""bitsandbytes quantisation for QLoRA: the BitsAndBytesConfig of a recipe and k-bit preparation.

Under ZeRO-3 the packed 4-bit weights are ordinary parameters to DeepSpeed, so
their storage dtype must equal the dtype ZeRO partitions in (the training
dtype); `quant_storage_dtype` picks it and config.validate() rejects a mismatch.
"""

from __future__ import annotations

import logging

import torch

from ftdist.models.loading import DTYPES

log = logging.getLogger("ftdist")



def wants_quantization(model_cfg) -> bool:
    q = model_cfg.quantization
    return q is not None and (q.load_in_4bit or q.load_in_8bit)


def quant_storage_dtype(model_cfg, zero_stage: int) -> torch.dtype:
    """uint8 is bitsandbytes' own default; ZeRO-3 needs the packed bytes viewed as the training dtype."""
    q = model_cfg.quantization
    if q.quant_storage is not None:
        return {**DTYPES, "uint8": torch.uint8}[q.quant_storage]
    return DTYPES[model_cfg.dtype] if zero_stage == 3 else torch.uint8


def bnb_config(model_cfg, zero_stage: int = 0):
    """transformers' BitsAndBytesConfig for `model.quantization`, or None when the recipe loads full weights."""
    if not wants_quantization(model_cfg):
        return None
    from transformers import BitsAndBytesConfig

    q = model_cfg.quantization
    if q.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if q.compute_dtype == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        from ftdist.config import ConfigError

        raise ConfigError(f"model.quantization.compute_dtype='bf16': {torch.cuda.get_device_name()} has no bf16 "
                          "support; use compute_dtype='fp16' with model.dtype='fp16'")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage=quant_storage_dtype(model_cfg, zero_stage),
    )


def zero3_enabled() -> bool:
    """True inside the engine's model-init context under ZeRO-3 (transformers holds the DeepSpeed config)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def quantization_kwargs(model_cfg) -> dict:
    """Extra from_pretrained arguments for `model.quantization` ({} for full-precision loads)."""
    qc = bnb_config(model_cfg, zero_stage=3 if zero3_enabled() else 0)
    if qc is None:
        return {}
    kw = {"quantization_config": qc}
    if torch.cuda.is_available():
        # bitsandbytes quantises while moving weights to their device: each rank loads onto its own GPU
        kw["device_map"] = {"": torch.cuda.current_device()}
    return kw


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def keep_trainable_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On AVX512-BF16 CPUs, Linear4bit rewrites its weight into a CPU-only layout
    the first time it runs in eval mode without grad (our eval passes, the DPO
    reference pass). From then on the training forward takes a kernel without
    autograd, so no gradient reaches the layer's input and every LoRA below it
    trains on a wrong gradient; under ZeRO-3 the rewrite would also replace a
    partitioned parameter's storage behind DeepSpeed's back.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_kbit(model, model_cfg):
    """Norms and non-quantised weights to fp32, input grads on, checkpointing without reentrancy."""
    from peft import prepare_model_for_kbit_training

    keep_trainable_layout(model)
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=model_cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
