"""Recipe configuration: typed sections, every default in one place.

A recipe is a YAML file (or a built-in name from ftdist/recipes/) plus
``key=value`` overrides with dotted keys. Each field's docstring-like ``help``
becomes ``ftdist train --help``. Unknown keys, wrong types and invalid
combinations are rejected at load time with a message that names the key, the
value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"
DS_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


class ConfigError(ValueError):
    """A recipe problem the user can fix: the message names key, value and what is allowed."""


def _f(default, help: str, **kw):
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        factory = (lambda d=default: type(d)(d)) if not dataclasses.is_dataclass(default) else type(default)
        return field(default_factory=factory, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank.")
    alpha: float = _f(16.0, "LoRA scaling numerator (scale = alpha / r).")
    dropout: float = _f(0.05, "Dropout on the LoRA input.")
    target_modules: Union[str, list[str]] = _f(
        "all-linear", "Modules to adapt: a list of names, or 'all-linear' for every linear layer but the output head.")
    modules_to_save: list[str] = _f([], "Extra modules trained in full and saved with the adapter (e.g. lm_head, score).")
    bias: Literal["none", "all", "lora_only"] = _f("none", "Which biases are trained.")


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = _f(False, "Load linear weights in 4 bits (bitsandbytes); needs model.lora.")
    load_in_8bit: bool = _f(False, "Load linear weights in 8 bits (bitsandbytes); needs model.lora.")
    quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type.")
    double_quant: bool = _f(True, "Quantise the quantisation constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["bf16", "fp16", "fp32"] = _f("bf16", "Dtype of the matmuls on de-quantised weights.")
    quant_storage: Optional[Literal["bf16", "fp16", "fp32", "uint8"]] = _f(
        None, "Storage dtype of packed 4-bit weights; must equal the training dtype under ZeRO-3 (default: chosen for you).")


@dataclass
class ModelConfig:
    name_or_path: str = _f("ftdist/tiny", "Hugging Face model directory or hub id; 'ftdist/tiny' is the embedded tiny Llama.")
    dtype: Literal["bf16", "fp16", "fp32"] = _f("bf16", "Training precision (bf16/fp16 mixed precision, or fp32).")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = _f(
        "auto", "Attention kernel; 'auto' = flash_attention_2 on CUDA when installed, else sdpa.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    trust_remote_code: bool = _f(False, "Allow model code from the model directory to run.")
    lora: Optional[LoraConfig] = _f(None, "LoRA adapter settings (a mapping); absent = full fine-tuning.")
    quantization: Optional[QuantizationConfig] = _f(None, "bitsandbytes quantisation settings (a mapping), for QLoRA.")


@dataclass
class DataConfig:
    train: Optional[str] = _f(None, "Training data: a JSON/JSONL/CSV/Parquet file or a saved datasets directory; 'ftdist/tiny-task' = the bundled task.")
    eval: Optional[str] = _f(None, "Evaluation data, same forms as data.train.")
    format: Literal["auto", "messages", "alpaca", "text", "preference", "prompt"] = _f(
        "auto", "Row format; 'auto' detects it from the columns.")
    columns: dict[str, str] = _f({}, "Column mapping from the format's names to the file's names, e.g. {messages: conversations}.")
    max_length: int = _f(2048, "Maximum tokens per sample; longer samples are truncated (and counted).")
    packing: bool = _f(False, "Pack several samples per row (best fit) with attention kept within each sample.")
    train_on_prompt: bool = _f(False, "Also compute the loss on system/user tokens (default: assistant turns only).")
    on_error: Literal["raise", "skip"] = _f("raise", "Malformed rows: stop with file and row number, or count and skip them.")
    num_workers: int = _f(0, "DataLoader worker processes.")
    cache_dir: Optional[str] = _f(None, "Where tokenised data is cached (default: output_dir/cache).")


@dataclass
class TrainConfig:
    micro_batch_size: int = _f(4, "Rows per forward/backward on one rank.")
    global_batch_size: int = _f(16, "Rows per optimizer step over all ranks; accumulation = global / (micro * world).")
    epochs: float = _f(1.0, "Passes over the training data (ignored when train.max_steps > 0).")
    max_steps: int = _f(-1, "Optimizer steps to run; -1 = derived from train.epochs.")
    lr: float = _f(2e-5, "Peak learning rate.")
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"] = _f(
        "cosine", "Learning-rate schedule (transformers schedulers).")
    warmup_ratio: float = _f(0.03, "Fraction of steps with linear warmup.")
    weight_decay: float = _f(0.0, "Decoupled weight decay; never applied to biases and norm weights.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.")
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "adafactor", "sgd", "lion"] = _f(
        "adamw_torch", "Optimizer (DeepSpeed CPU Adam is used automatically with optimizer offload).")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_eps: float = _f(1e-8, "Adam epsilon.")
    label_smoothing: float = _f(0.0, "Label smoothing of the token cross-entropy.")
    neftune_alpha: float = _f(0.0, "NEFTune noise scale on input embeddings during training; 0 disables.")
    log_every: int = _f(1, "Log metrics every N optimizer steps.")
    eval_every: int = _f(0, "Evaluate every N optimizer steps; 0 = only before and after training.")
    eval_accuracy: bool = _f(False, "Also measure exact-match accuracy of greedy answers to the eval prompts.")
    eval_max_new_tokens: int = _f(32, "Tokens generated per eval prompt for accuracy.")
    eval_max_samples: int = _f(200, "At most this many eval rows are used for accuracy.")
    progress_bar: bool = _f(True, "Show a progress bar on rank 0.")


@dataclass
class DeepSpeedConfig:
    config: str = _f("auto", "A JSON in ds_configs/ (name or path); 'auto' = zero{stage}[_offload].json.")
    zero_stage: int = _f(2, "ZeRO stage 0-3.")
    offload_optimizer: bool = _f(False, "Keep optimizer state on CPU (DeepSpeed CPU Adam); ZeRO 1-3.")
    offload_params: bool = _f(False, "Keep parameters on CPU; ZeRO-3 only.")


@dataclass
class CheckpointConfig:
    every_steps: int = _f(0, "Save a checkpoint every N optimizer steps (and always at the end); 0 = only at the end.")
    keep_last: int = _f(2, "Keep the newest N checkpoints; 0 keeps all.")
    resume: str = _f("auto", "'auto' = newest complete checkpoint in output_dir, 'never', or a checkpoint path.")


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(True, "Write TensorBoard events to output_dir/tensorboard.")
    wandb: bool = _f(False, "Log to Weights & Biases (needs WANDB_API_KEY in the environment).")
    wandb_project: str = _f("ftdist", "W&B project name.")


@dataclass
class DistConfig:
    timeout_s: int = _f(1800, "Process-group timeout: a collective waiting longer fails instead of hanging.")
    backend: Literal["auto", "nccl", "gloo"] = _f("auto", "'auto' = nccl on CUDA, gloo on CPU.")


@dataclass
class Config:
    stage: Literal["sft", "rm", "dpo", "orpo", "ppo"] = _f("sft", "Training stage.")
    output_dir: str = _f("runs/ftdist", "Run directory: config.yaml, metrics.jsonl, checkpoints/, final/.")
    seed: int = _f(42, "Random seed (model init of new heads, data order, dropout).")
    model: ModelConfig = _f(ModelConfig(), "Model section.")
    data: DataConfig = _f(DataConfig(), "Data section.")
    train: TrainConfig = _f(TrainConfig(), "Training section.")
    deepspeed: DeepSpeedConfig = _f(DeepSpeedConfig(), "DeepSpeed section.")
    checkpoint: CheckpointConfig = _f(CheckpointConfig(), "Checkpoint section.")
    logging: LoggingConfig = _f(LoggingConfig(), "Logging section.")
    dist: DistConfig = _f(DistConfig(), "Distributed section.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# loading


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Check `value` against annotation `tp`, converting what YAML cannot express (int -> float)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: got {value!r}, allowed: {', '.join(repr(a) for a in typing.get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else str(bad))
    if dataclasses.is_dataclass(tp):
        if value is True:  # `model.lora: true` = defaults
            value = {}
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, f"{key}.{k}"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        (et,) = typing.get_args(tp)
        return [_coerce(v, et, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad
        return str(value)
    return value


def _unknown_key(cls, name: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown key '{prefix}{name}'{hint} (known keys in this section: {', '.join(names)})")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    pre = f"{prefix}." if prefix else ""
    for k, v in data.items():
        if k not in names:
            raise _unknown_key(cls, str(k), pre)
        kwargs[k] = _coerce(v, hints[k], pre + k)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None or child is True:
            child = {}
            node[p] = child
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def _check_override_key(key: str) -> None:
    """Reject unknown dotted keys early, with the closest name."""
    cls = Config
    parts = key.split(".")
    for i, p in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        prefix = ".".join(parts[:i]) + ("." if i else "")
        if p not in fields:
            raise _unknown_key(cls, p, prefix)
        tp = typing.get_type_hints(cls)[p]
        sub = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or ([tp] if dataclasses.is_dataclass(tp) else [])
        if i < len(parts) - 1:
            if not sub:
                if typing.get_origin(tp) is dict:
                    return
                raise ConfigError(f"{key}: '{prefix}{p}' is a value, not a section")
            cls = sub[0]


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        _check_override_key(key)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # YAML reads 1e-4 as a string; accept it as a number
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") and not value.isalpha() else value
            except ValueError:
                pass
        out.append((key, value))
    return out


def resolve_recipe_path(recipe: str) -> Path:
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"recipe file not found: {recipe}")
        return p
    builtin = RECIPES_DIR / f"{recipe}.yaml"
    if builtin.exists():
        return builtin
    names = builtin_recipes()
    close = difflib.get_close_matches(recipe, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown recipe '{recipe}'{hint} (built-in: {', '.join(names)}; or pass a YAML path)")


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None, data: Optional[dict] = None) -> Config:
    tree: dict = {}
    if recipe is not None:
        path = resolve_recipe_path(recipe)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    if data:
        tree = _merge(tree, data)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(cfg: Config) -> None:
    """Combinations that cannot work are rejected before anything loads."""
    t, ds, m = cfg.train, cfg.deepspeed, cfg.model
    positive = {"train.micro_batch_size": t.micro_batch_size, "train.global_batch_size": t.global_batch_size,
                "data.max_length": cfg.data.max_length, "train.log_every": t.log_every}
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{k}: got {v}, must be > 0")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr: got {t.lr}, must be > 0")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio: got {t.warmup_ratio}, allowed: 0 <= x < 1")
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing: got {t.label_smoothing}, allowed: 0 <= x < 1")
    if t.max_steps == 0 or (t.max_steps < 0 and t.epochs <= 0):
        raise ConfigError("train.max_steps / train.epochs: nothing to train (set train.max_steps > 0 or train.epochs > 0)")
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage: got {ds.zero_stage}, allowed: 0, 1, 2, 3")
    if ds.offload_params and ds.zero_stage != 3:
        raise ConfigError(f"deepspeed.offload_params=true needs deepspeed.zero_stage=3 (got {ds.zero_stage})")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer=true needs deepspeed.zero_stage >= 1 (got 0)")
    if cfg.checkpoint.keep_last < 0:
        raise ConfigError(f"checkpoint.keep_last: got {cfg.checkpoint.keep_last}, must be >= 0")
    q = m.quantization
    if q is not None and (q.load_in_4bit or q.load_in_8bit):
        if q.load_in_4bit and q.load_in_8bit:
            raise ConfigError("model.quantization: load_in_4bit and load_in_8bit are exclusive")
        if m.lora is None:
            raise ConfigError("model.quantization: quantised weights cannot be trained; add a model.lora section (QLoRA)")
    if cfg.data.train is None and cfg.stage != "ppo":
        raise ConfigError("data.train: no training data given (a file path, a datasets directory, or 'ftdist/tiny-task')")


def ds_config_path(cfg: Config) -> Path:
    ds = cfg.deepspeed
    name = ds.config
    if name == "auto":
        name = f"zero{ds.zero_stage}" + ("_offload" if (ds.offload_optimizer or ds.offload_params) else "")
    p = Path(name)
    if p.exists():
        return p
    candidate = DS_CONFIGS_DIR / (name if name.endswith(".json") else f"{name}.json")
    if candidate.exists():
        return candidate
    raise ConfigError(f"deepspeed.config: '{ds.config}' is neither a file nor one of "
                      f"{', '.join(sorted(p.stem for p in DS_CONFIGS_DIR.glob('*.json')))}")


def _walk_keys(cls=Config, prefix: str = ""):
    """(key, type name, default or None for sections, help, is_section) for every recipe key."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        sub = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or ([tp] if dataclasses.is_dataclass(tp) else [])
        key = prefix + f.name
        if sub:
            yield key, "mapping", None, f.metadata.get("help", ""), True
            yield from _walk_keys(sub[0], key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield key, _type_name(tp), default, f.metadata.get("help", ""), False


def config_help() -> str:
    """Every recipe key with its type, default and meaning, for `ftdist train --help`."""
    lines = []
    for key, tp, default, help, section in _walk_keys():
        lines.append(f"  {key}: {help}" if section else f"  {key} ({tp}, default {default!r})\n      {help}")
    return "\n".join(lines)


def config_markdown() -> str:
    """The README's table of recipe keys (tests keep the README equal to this)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help, section in _walk_keys():
        shown = "section" if section else f"`{default!r}`"
        rows.append(f"| `{key}` | {tp.replace('|', chr(92) + '|')} | {shown} | {help} |")
    return "\n".join(rows)


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
