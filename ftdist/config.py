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
    max_prompt_length: int = _f(
        512, "Preference stages: prompt tokens kept (the end of the prompt) before the response; below data.max_length.")
    drop_ties: bool = _f(False, "Preference data: drop pairs whose scores are equal or whose responses are identical.")
    min_chosen_score: Optional[float] = _f(None, "Preference data: drop pairs whose chosen score is below this.")
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
class RewardModelConfig:
    head: Literal["sequence_classification", "causal_lm"] = _f(
        "sequence_classification", "Scalar head: 'sequence_classification' = AutoModelForSequenceClassification "
        "(num_labels=1) on the model's body; 'causal_lm' = the causal LM with its output layer replaced by one "
        "scalar (full fine-tuning only). final/ loads with AutoModelForSequenceClassification either way.")
    margin: Literal["none", "column", "score_diff"] = _f(
        "none", "Target margin m in -log sigmoid(r_chosen - r_rejected - m): none, the data's 'margin' column, "
        "or score_chosen - score_rejected.")
    margin_scale: float = _f(1.0, "Multiplies the margin from rm.margin.")
    score_diff_weighting: bool = _f(
        False, "Weight each pair by (score_chosen - score_rejected)^2, normalised to mean 1 over the micro-batch.")


@dataclass
class DPOConfig:
    beta: float = _f(0.1, "KL strength: implicit reward = beta * (log pi - log pi_ref).")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = _f(
        "sigmoid", "sigmoid = DPO, ipo = IPO (length-normalised as in TRL), hinge = SLiC.")
    label_smoothing: float = _f(0.0, "cDPO: assumed probability that a pair's label is flipped, in [0, 0.5); sigmoid only.")
    reference: Literal["auto", "model", "adapter_disabled", "precomputed"] = _f(
        "auto", "Reference log-probs: a separate frozen model, the policy with its LoRA adapter disabled, or "
        "computed once before training and cached; auto = adapter_disabled with model.lora, else model.")
    reference_model: Optional[str] = _f(None, "Reference model directory (default: model.name_or_path).")


@dataclass
class ORPOConfig:
    beta: float = _f(0.1, "Weight of the odds-ratio term added to the SFT loss on the chosen responses.")


@dataclass
class PPOConfig:
    algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = _f(
        "ppo", "Advantage estimator: ppo (critic + GAE); grpo (scores normalised within each prompt's group), rloo "
        "(leave-one-out baseline) and reinforce_pp (whitened returns) start no critic.")
    iterations: int = _f(100, "Rollout-and-update iterations; each draws ppo.rollout_batch_size prompts.")
    rollout_batch_size: int = _f(16, "Prompts drawn per iteration.")
    samples_per_prompt: int = _f(1, "Responses sampled per prompt (the group of grpo/rloo, which need >= 2).")
    max_new_tokens: int = _f(
        128, "Longest response; prompts keep their last data.max_length - max_new_tokens tokens.")
    temperature: float = _f(1.0, "Sampling temperature of the rollouts.")
    top_p: float = _f(1.0, "Nucleus sampling threshold of the rollouts (1 = off).")
    missing_eos_penalty: Optional[float] = _f(
        None, "Subtracted from the score of a response that reached max_new_tokens without EOS; null = none "
        "(such responses are always counted in the metric no_eos).")
    ppo_epochs: int = _f(1, "Passes of the update over each rollout batch.")
    mini_batch_size: int = _f(
        8, "Samples per optimizer step over all ranks of a group (replaces train.global_batch_size); each rank "
        "runs micro-batches of train.micro_batch_size.")
    clip_eps: float = _f(0.2, "Policy ratio clip: ratios outside [1 - eps, 1 + eps] carry no gradient.")
    value_clip_eps: float = _f(0.2, "Critic clip: a value moves at most this far from its rollout estimate.")
    gamma: float = _f(1.0, "Discount of later token rewards (GAE and reinforce_pp).")
    lam: float = _f(0.95, "GAE lambda (bias-variance trade-off of the advantage).")
    whiten_advantages: bool = _f(True, "Whiten ppo advantages over all response tokens of the batch.")
    kl_coef: float = _f(0.05, "KL(policy || reference) coefficient; the starting value when ppo.kl_target is set. "
                        "A per-token reward penalty, except for grpo where it is a loss term.")
    kl_estimator: Literal["k1", "k2", "k3"] = _f(
        "k1", "Per-token KL estimator: k1 = log r (unbiased), k2 = (log r)^2 / 2, k3 = r - 1 - log r (unbiased, >= 0).")
    kl_target: Optional[float] = _f(
        None, "Adaptive KL controller: per-sequence KL to aim for; null = fixed ppo.kl_coef.")
    kl_horizon: int = _f(10000, "Adaptive KL controller horizon in samples (how fast kl_coef moves).")
    entropy_coef: float = _f(0.0, "Weight of the entropy bonus in the policy loss.")
    reward_fn: Optional[str] = _f(
        None, "Python reward 'module:function', called as fn(prompts, responses, **columns) -> one float per "
        "response, e.g. 'ftdist.data.tiny_task:sort_reward'.")
    reward_model: Optional[str] = _f(
        None, "Learned reward model directory (AutoModelForSequenceClassification with one label, the policy's "
        "tokenizer); scored at the last real token.")
    critic_init: Literal["auto", "reward_model", "policy"] = _f(
        "auto", "Weights of the critic's body and head: the reward model or the policy (with a new value head); "
        "auto = reward_model when ppo.reward_model is set.")
    critic_lr: float = _f(1e-5, "Critic learning rate (the policy uses train.lr).")
    policy_ranks: int = _f(1, "Actors (DeepSpeed ranks) of the policy group.")
    critic_ranks: int = _f(1, "Actors of the critic group (ppo only).")
    ref_ranks: int = _f(1, "Actors of the reference group (none with model.lora: the policy with its adapter off).")
    reward_ranks: int = _f(1, "Actors of the reward group.")
    colocation: Literal["none", "policy_ref", "critic_reward", "ref_reward", "all"] = _f(
        "none", "Groups that share devices (fractional GPU bundles of one placement group): none, policy+reference, "
        "critic+reward, reference+reward, or all groups; shared groups need equal ranks.")
    cpus_per_actor: float = _f(1.0, "CPUs in each actor's bundle; fractions let several actors share a core.")
    device: Literal["auto", "gpu", "cpu"] = _f("auto", "Actor bundles: a GPU each (auto: when the Ray cluster has GPUs) "
                                               "or CPU only.")
    eval_every: int = _f(
        0, "Greedy evaluation on data.eval every N iterations (reward mean; exact-match accuracy when the rows have "
        "an 'answer' column); 0 = before and after training only.")


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
    rm: RewardModelConfig = _f(RewardModelConfig(), "Reward-model section (stage: rm).")
    dpo: DPOConfig = _f(DPOConfig(), "DPO section (stage: dpo).")
    orpo: ORPOConfig = _f(ORPOConfig(), "ORPO section (stage: orpo).")
    ppo: PPOConfig = _f(PPOConfig(), "PPO section (stage: ppo).")

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
        _validate_quantization(m, ds.zero_stage)
    if m.lora is not None:
        lc = m.lora
        if lc.r <= 0 or lc.alpha <= 0 or not 0 <= lc.dropout < 1:
            raise ConfigError(f"model.lora: got r={lc.r}, alpha={lc.alpha}, dropout={lc.dropout}; "
                              "allowed: r > 0, alpha > 0, 0 <= dropout < 1")
        if not lc.target_modules:
            raise ConfigError("model.lora.target_modules: empty; give module names or 'all-linear'")
    if ds.offload_optimizer and t.optimizer not in ("adamw_torch", "paged_adamw_32bit"):
        raise ConfigError(f"train.optimizer={t.optimizer!r} cannot be combined with deepspeed.offload_optimizer=true "
                          "(use adamw_torch, which becomes DeepSpeed's CPU Adam)")
    if cfg.stage in PREFERENCE_STAGES:
        _validate_preference(cfg)
    if cfg.stage == "ppo":
        _validate_ppo(cfg)
    if cfg.data.train is None and cfg.stage != "ppo":
        raise ConfigError("data.train: no training data given (a file path, a datasets directory, or 'ftdist/tiny-task')")


PREFERENCE_STAGES = ("rm", "dpo", "orpo")


def _validate_preference(cfg: Config) -> None:
    d, dpo = cfg.data, cfg.dpo
    if d.format not in ("auto", "preference"):
        raise ConfigError(f"data.format: got {d.format!r} for stage={cfg.stage}, allowed: 'preference' or 'auto'")
    if d.packing:
        raise ConfigError(f"data.packing=true is not supported for stage={cfg.stage} (pairs are batched, not packed)")
    if not 0 < d.max_prompt_length < d.max_length:
        raise ConfigError(f"data.max_prompt_length: got {d.max_prompt_length}, allowed: 0 < x < data.max_length "
                          f"({d.max_length}), so every response keeps at least one token")
    if cfg.stage == "rm" and cfg.rm.head == "causal_lm" and cfg.model.lora is not None:
        raise ConfigError("rm.head=causal_lm trains the full model; use rm.head=sequence_classification with model.lora")
    if cfg.stage == "dpo":
        if dpo.beta <= 0:
            raise ConfigError(f"dpo.beta: got {dpo.beta}, must be > 0")
        if not 0 <= dpo.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing: got {dpo.label_smoothing}, allowed: 0 <= x < 0.5")
        if dpo.label_smoothing and dpo.loss_type != "sigmoid":
            raise ConfigError(f"dpo.label_smoothing={dpo.label_smoothing} needs dpo.loss_type='sigmoid' "
                              f"(got {dpo.loss_type!r})")
        if dpo.reference == "adapter_disabled" and cfg.model.lora is None:
            raise ConfigError("dpo.reference=adapter_disabled needs a model.lora section (there is no adapter to disable)")
        if dpo.reference == "adapter_disabled" and dpo.reference_model is not None:
            raise ConfigError("dpo.reference_model is set but dpo.reference=adapter_disabled uses the policy's own "
                              "base weights; use dpo.reference=model")
    if cfg.stage == "orpo" and cfg.orpo.beta <= 0:
        raise ConfigError(f"orpo.beta: got {cfg.orpo.beta}, must be > 0")


def _validate_ppo(cfg: Config) -> None:
    p = cfg.ppo
    positive = {"ppo.iterations": p.iterations, "ppo.rollout_batch_size": p.rollout_batch_size,
                "ppo.samples_per_prompt": p.samples_per_prompt, "ppo.max_new_tokens": p.max_new_tokens,
                "ppo.ppo_epochs": p.ppo_epochs, "ppo.mini_batch_size": p.mini_batch_size,
                "ppo.policy_ranks": p.policy_ranks, "ppo.critic_ranks": p.critic_ranks, "ppo.ref_ranks": p.ref_ranks,
                "ppo.reward_ranks": p.reward_ranks, "ppo.kl_horizon": p.kl_horizon, "ppo.temperature": p.temperature,
                "ppo.clip_eps": p.clip_eps, "ppo.critic_lr": p.critic_lr, "ppo.cpus_per_actor": p.cpus_per_actor}
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{k}: got {v}, must be > 0")
    if not 0 < p.top_p <= 1:
        raise ConfigError(f"ppo.top_p: got {p.top_p}, allowed: 0 < x <= 1")
    if p.kl_coef < 0 or p.entropy_coef < 0 or p.value_clip_eps < 0:
        raise ConfigError("ppo.kl_coef, ppo.entropy_coef and ppo.value_clip_eps must be >= 0")
    if p.kl_target is not None and p.kl_target <= 0:
        raise ConfigError(f"ppo.kl_target: got {p.kl_target}, must be > 0 (or null for a fixed ppo.kl_coef)")
    if cfg.data.train is None:
        raise ConfigError("data.train: stage=ppo needs prompts: a file with a 'prompt' column (text or a message "
                          "list), e.g. 'ftdist/tiny-task/prompts'")
    if p.max_new_tokens >= cfg.data.max_length:
        raise ConfigError(f"ppo.max_new_tokens={p.max_new_tokens} leaves no room for the prompt within "
                          f"data.max_length={cfg.data.max_length}")
    if (p.reward_fn is None) == (p.reward_model is None):
        raise ConfigError("ppo.reward_fn / ppo.reward_model: set exactly one (a 'module:function' or a reward model "
                          "directory)")
    if p.reward_fn is not None and (p.reward_fn.count(":") != 1 or not all(p.reward_fn.split(":"))):
        raise ConfigError(f"ppo.reward_fn: got {p.reward_fn!r}, expected 'module:function' "
                          f"(e.g. 'ftdist.data.tiny_task:sort_reward')")
    if p.algorithm in ("grpo", "rloo") and p.samples_per_prompt < 2:
        raise ConfigError(f"ppo.samples_per_prompt={p.samples_per_prompt}: ppo.algorithm={p.algorithm} compares the "
                          f"samples of one prompt and needs >= 2")
    if p.critic_init == "reward_model" and p.reward_model is None:
        raise ConfigError("ppo.critic_init=reward_model needs ppo.reward_model")
    critic = p.algorithm == "ppo"
    reference = cfg.model.lora is None
    n = p.rollout_batch_size * p.samples_per_prompt
    if n % p.mini_batch_size:
        raise ConfigError(f"ppo.mini_batch_size={p.mini_batch_size} must divide the samples of an iteration "
                          f"(ppo.rollout_batch_size x ppo.samples_per_prompt = {n})")
    groups = {"policy": p.policy_ranks, "reward": p.reward_ranks}
    if critic:
        groups["critic"] = p.critic_ranks
    if reference:
        groups["ref"] = p.ref_ranks
    for name, ranks in groups.items():
        if n % ranks:
            raise ConfigError(f"ppo.{name}_ranks={ranks} must divide the samples of an iteration ({n})")
    micro = cfg.train.micro_batch_size
    for name in ("policy", "critic") if critic else ("policy",):
        per_step = micro * groups[name]
        if p.mini_batch_size % per_step:
            raise ConfigError(f"ppo.mini_batch_size={p.mini_batch_size} is not a multiple of train.micro_batch_size "
                              f"({micro}) x ppo.{name}_ranks ({groups[name]}) = {per_step}")
    shared = {"policy_ref": ("policy", "ref"), "critic_reward": ("critic", "reward"), "ref_reward": ("ref", "reward"),
              "all": tuple(groups)}.get(p.colocation, ())
    missing = [g for g in shared if g not in groups]
    if missing:
        why = "ppo.algorithm=" + p.algorithm if "critic" in missing else "model.lora (the reference is the policy)"
        raise ConfigError(f"ppo.colocation={p.colocation!r}: there is no {missing[0]} group with {why}")
    if len({groups[g] for g in shared}) > 1:
        raise ConfigError(f"ppo.colocation={p.colocation!r} shares devices between "
                          f"{', '.join(f'ppo.{g}_ranks={groups[g]}' for g in shared)}; they must be equal")


def _validate_quantization(m: ModelConfig, zero_stage: int) -> None:
    q = m.quantization
    # DeepSpeed's bf16/fp16 modes cast every floating-point parameter to the training dtype; packed 4-bit
    # bytes stored as another float dtype get converted as numbers: fp32 storage under bf16 fails with a
    # shape error, fp16 storage under bf16 silently corrupts the weights (both measured)
    if q.load_in_4bit and q.quant_storage not in (None, "uint8", m.dtype):
        raise ConfigError(f"model.quantization.quant_storage={q.quant_storage!r} differs from model.dtype={m.dtype!r}; "
                          f"DeepSpeed would cast the packed 4-bit bytes as numbers. Use {m.dtype!r} (or leave it unset)")
    if zero_stage == 3 and q.load_in_4bit and q.quant_storage == "uint8":
        raise ConfigError(f"model.quantization.quant_storage='uint8' with deepspeed.zero_stage=3: ZeRO-3 shards the packed "
                          f"4-bit weights as parameters of the training dtype; use quant_storage={m.dtype!r} (or leave it unset)")
    if zero_stage == 3 and q.load_in_8bit:
        raise ConfigError("model.quantization.load_in_8bit=true with deepspeed.zero_stage=3: bitsandbytes keeps the whole "
                          "int8 matrix beside the parameter, so ZeRO-3 cannot shard it; use load_in_4bit (QLoRA) "
                          "or deepspeed.zero_stage <= 2")
    if q.load_in_4bit and q.compute_dtype == "fp16" and "bf16" in (m.dtype, q.quant_storage):
        raise ConfigError("model.quantization.compute_dtype='fp16' with bf16 activations/storage: bf16 values overflow "
                          "fp16 (max 65504) in the 4-bit matmuls; use compute_dtype='bf16' (or model.dtype='fp16')")


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
