"""Hugging Face loading: tokenizer, causal LM with dtype and attention kernel, NEFTune.

Returns plain nn.Modules; the engine decides how they are partitioned. Under
ZeRO-3 the engine opens its model-init context first, so that from_pretrained
partitions parameters as they are created.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from pathlib import Path

import torch

from ftdist.errors import UserError

log = logging.getLogger("ftdist")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelError(UserError):
    pass


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path in ("ftdist/tiny", "tiny"):
        from ftdist.models.tiny import resolve_model_path as tiny_path

        return tiny_path(name_or_path)
    return name_or_path


def _check_source(path: str, what: str, key: str = "model.name_or_path") -> None:
    if os.path.isdir(path):
        if (what == "model" and not os.path.exists(os.path.join(path, "config.json"))
                and os.path.exists(os.path.join(path, "adapter_config.json"))):
            raise ModelError(f"{key}: {path} is a LoRA adapter (adapter_config.json, no config.json), not a whole "
                             f"model: merge it into its base first (ftdist merge --adapter {path} --out DIR) and give "
                             f"DIR; DPO (or any stage) from an SFT adapter needs this merge too")
        if not os.path.exists(os.path.join(path, "config.json")) and what == "model":
            raise ModelError(f"{key}: {path} has no config.json (not a Hugging Face model directory)")
        return
    # a hub id is ORG/NAME; anything else, or ORG/NAME whose ORG is a local directory, was meant as a local path
    local = (path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.isdir(path.split("/")[0]))
    if local:
        raise ModelError(f"{key}: {path} does not exist (a local path; hub ids look like org/name)")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(path):
        raise ModelError(f"{key}: {path} is neither a local directory nor in the Hugging Face cache, "
                         f"and HF_HUB_OFFLINE=1 forbids downloading it")


def check_model_source(name_or_path: str, key: str) -> str:
    """The path of a model named by an option or key (`key` in the error): a local directory with config.json,
    or a hub id (available offline when HF_HUB_OFFLINE=1); a local path that does not exist is not taken for a
    hub id."""
    path = resolve_model_path(name_or_path)
    _check_source(path, "model", key)
    return path


def load_failure(path, exc: BaseException) -> str:
    """What went wrong loading the model in `path`, in one line: the damaged weights file where one is, and the
    library's first line."""
    first = (str(exc).strip().splitlines() or [""])[0]
    if type(exc).__name__ == "SafetensorError":
        from safetensors import safe_open

        for f in sorted(Path(path).glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except Exception:
                return f"{f}: damaged (SafetensorError: {first})"
    if "Weights only load failed" in str(exc) or type(exc).__name__ == "UnpicklingError":
        files = sorted(str(f) for f in Path(path).glob("*.bin")) or [str(path)]
        return (f"{', '.join(files)}: refused: it holds objects that are not weights (pickled weights are read "
                f"weights-only: nothing in the file ran); use safetensors weights")
    return f"{type(exc).__name__}: {first[:300]}"


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import scan_cache_dir

        return any(r.repo_id == repo_id for r in scan_cache_dir().repos)
    except Exception:  # no cache directory yet
        return False


def load_tokenizer(model_cfg, chat_template: str | None = None):
    """The tokenizer of model.tokenizer (default: model.name_or_path), with data.chat_template when given."""
    from transformers import AutoTokenizer

    key, source = ("model.tokenizer", model_cfg.tokenizer) if getattr(model_cfg, "tokenizer", None) else \
        ("model.name_or_path", model_cfg.name_or_path)
    path = resolve_model_path(source)
    _check_source(path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as e:
        raise ModelError(f"{key}={source!r}: cannot load the tokenizer: {e}") from None
    if chat_template:
        from ftdist.data.templates import resolve_chat_template

        tok.chat_template = resolve_chat_template(chat_template)
    if tok.pad_token_id is None:
        # a pad id is only needed for batching; its positions are masked out of attention and loss
        tok.pad_token = tok.eos_token
    return tok


def attn_implementation(model_cfg) -> str:
    """The attention family batches are built for: flash_attention_2, flex_attention, sdpa or eager."""
    impl = model_cfg.attn_implementation
    if impl == "auto":
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa"
    return impl


def attention_kernel(model_cfg) -> str:
    """The kernel a model is loaded with: sdpa models get `segment_sdpa` (models/forward.py), which runs plain
    sdpa on unpacked batches and skips the cross-sample work of packed ones."""
    impl = attn_implementation(model_cfg)
    if impl == "sdpa":
        from ftdist.models.forward import segment_sdpa_kernel

        return segment_sdpa_kernel()
    return impl


def load_causal_lm(model_cfg, dtype: torch.dtype | None = None, auto_class=None, **kwargs):
    """A Hugging Face model in the recipe's dtype, quantised when `model.quantization` asks for it.

    LoRA is not applied here: callers wrap the result with models.adapters.apply_lora,
    so that reward/value models can pick their own peft task type.
    """
    from transformers import AutoModelForCausalLM

    from ftdist.models.quant import keep_trainable_layout, quantization_kwargs

    path = resolve_model_path(model_cfg.name_or_path)
    _check_source(path, "model")
    kwargs = {**quantization_kwargs(model_cfg), **kwargs}
    try:
        model = (auto_class or AutoModelForCausalLM).from_pretrained(
            path,
            dtype=dtype or DTYPES[model_cfg.dtype],
            attn_implementation=attention_kernel(model_cfg),
            trust_remote_code=model_cfg.trust_remote_code,
            **kwargs,
        )
    except Exception as e:  # OSError, ValueError, safetensors' SafetensorError for a damaged file, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"model.name_or_path={model_cfg.name_or_path!r}: cannot load the model: "
                         f"{type(e).__name__}: {first}") from None
    if "quantization_config" in kwargs:
        keep_trainable_layout(model)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def side_model_config(model_cfg, name_or_path: str | None = None, *, quantized: bool = True, trained: bool = False,
                      dtype: str | None = None):
    """The ModelConfig of a model loaded beside the policy, derived from the recipe's `model` (dtype, attention
    kernel, trust_remote_code): a reference, a reward model, a critic's starting weights. Never with an adapter.

    quantized: with the policy's `model.quantization`. A reference must start equal to the policy (same base, same
    quantisation: DPO's step 1 then gives ln 2, PPO's first KL 0); a different model (a reward model) or one whose
    every weight trains (a critic: 4-bit weights cannot) is loaded in full precision (quantized=False).
    trained: keeps `model.gradient_checkpointing`; a frozen model runs no backward and never needs it.
    dtype: instead of `model.dtype` (an evaluated model: the eval's own dtype).
    """
    return dataclasses.replace(model_cfg, name_or_path=name_or_path or model_cfg.name_or_path, lora=None,
                               dtype=dtype or model_cfg.dtype,
                               quantization=model_cfg.quantization if quantized else None,
                               gradient_checkpointing=model_cfg.gradient_checkpointing and trained)


def describe_weights(model_cfg) -> str:
    """'NAME' or 'NAME in 4-bit nf4' / 'NAME in 8-bit': how a model's weights are loaded, for the log."""
    q = model_cfg.quantization
    if q is not None and q.load_in_4bit:
        return f"{model_cfg.name_or_path} in 4-bit {q.quant_type}"
    if q is not None and q.load_in_8bit:
        return f"{model_cfg.name_or_path} in 8-bit"
    return model_cfg.name_or_path


def enable_neftune(model, alpha: float):
    """NEFTune (Jain et al. 2023): uniform noise on input embeddings while training, scaled by alpha/sqrt(L*d)."""
    if alpha <= 0:
        return None
    emb = model.get_input_embeddings()

    def hook(module, inputs, output):
        if module.training:
            dims = output.size(1) * output.size(2)
            mag = alpha / dims**0.5
            output = output + torch.zeros_like(output).uniform_(-mag, mag)
        return output

    return emb.register_forward_hook(hook)


def decay_param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: never on biases and norm weights (all 1-D parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 partitions params to 1-D shards; ds_shape keeps the real shape
        shape = getattr(p, "ds_shape", p.shape)
        (no_decay if len(shape) < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _numel(p) -> int:
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        # bitsandbytes packs two 4-bit values per byte; count the weights, not the bytes
        return int(torch.Size(qs.shape).numel())
    return getattr(p, "ds_numel", p.numel())


def count_parameters(model) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def max_length_for(value, key: str, name: str, model_config, unset: str = "null") -> int:
    """The length `key` (data.max_length, eval.max_length, --max-length) stands for on this model: `value`, or the
    model's maximum (max_position_embeddings, or n_positions) where it is None. A value above that maximum is
    refused naming both numbers (a longer row would index past the model's position table: an IndexError deep
    inside the forward). unset: how the user leaves the key out (null in a recipe), named in the advice."""
    from ftdist.config import ConfigError

    n = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if value is None:
        if not n:
            raise ConfigError(f"{key} left out ({unset}): {name} states no maximum length "
                              f"(max_position_embeddings); set {key}")
        return int(n)
    if n and value > n:
        raise ConfigError(f"{key}={value} is above the {n} positions {name} takes (max_position_embeddings in its "
                          f"config); set {key} <= {n}, or {unset} for {n}")
    return value


def resolve_max_length(cfg):
    """The recipe with data.max_length: null replaced by the model's maximum, checked as a recipe value would
    have been; a data.max_length above that maximum is refused (max_length_for)."""
    from transformers import AutoConfig

    from ftdist.config import validate

    path = resolve_model_path(cfg.model.name_or_path)
    try:
        mc = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:
        if cfg.data.max_length is not None:
            return cfg  # loading the model says what is wrong with it
        raise ModelError(f"model.name_or_path={cfg.model.name_or_path!r}: cannot read its config for "
                         f"data.max_length=null: {e}") from None
    n = max_length_for(cfg.data.max_length, "data.max_length", cfg.model.name_or_path, mc)
    if cfg.data.max_length is not None:
        return cfg
    log.info("data.max_length=null: %d, the model's max_position_embeddings", n)
    out = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=n))
    validate(out)
    return out
