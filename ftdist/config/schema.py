"""The recipe schema: typed sections, every default and every key's help in one place.

Each field's help becomes `ftdist train --help` and the README's key table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

from ftdist.errors import UserError

# optimizers that optimizer offload turns into DeepSpeed's CPU Adam (the engine, the validation and the
# memory planner all read this)
OFFLOAD_OPTIMIZERS = ("adamw_torch", "paged_adamw_32bit")
PREFERENCE_STAGES = ("rm", "dpo", "orpo")
EVAL_SUITES = ("perplexity", "exact_match", "contains", "choice", "reward", "judge")


class ConfigError(UserError):
    """A recipe problem the user can fix: the message names key, value and what is allowed."""


def _f(default, help: str, library: Optional[tuple] = None, **kw):
    """A recipe key: its default and help. library: (library, its default, how to show it or None) where
    ftdist's default differs from the value the Hugging Face library a user knows would take; --help, the
    README's key table and --print-config say so."""
    if library is not None:
        kw["library"] = library
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        factory = (lambda d=default: type(d)(d)) if not dataclasses.is_dataclass(default) else type(default)
        return field(default_factory=factory, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank.", library=("peft", 8, None))
    alpha: float = _f(16.0, "LoRA scaling numerator (scale = alpha / r).", library=("peft", 8.0, "8"))
    dropout: float = _f(0.05, "Dropout on the LoRA input.", library=("peft", 0.0, "0"))
    target_modules: Union[str, list[str]] = _f(
        "all-linear", "Modules to adapt: a list of names, or 'all-linear' for every linear layer but the output head.",
        library=("peft", None, "the architecture's attention projections, e.g. [q_proj, v_proj] for Llama"))
    modules_to_save: list[str] = _f([], "Extra modules trained in full and saved with the adapter (e.g. lm_head, score).")
    bias: Literal["none", "all", "lora_only"] = _f("none", "Which biases are trained.")


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = _f(False, "Load linear weights in 4 bits (bitsandbytes); needs model.lora.")
    load_in_8bit: bool = _f(False, "Load linear weights in 8 bits (bitsandbytes); needs model.lora.")
    quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type.", library=("bitsandbytes", "fp4", None))
    double_quant: bool = _f(True, "Quantise the quantisation constants too (saves ~0.4 bit/param).",
                            library=("bitsandbytes", False, "false"))
    compute_dtype: Literal["bf16", "fp16", "fp32"] = _f("bf16", "Dtype of the matmuls on de-quantised weights.",
                                                        library=("bitsandbytes", "fp32", None))
    quant_storage: Optional[Literal["bf16", "fp16", "fp32", "uint8"]] = _f(
        None, "Storage dtype of packed 4-bit weights; must equal the training dtype under ZeRO-3 (default: chosen for you).")


@dataclass
class ModelConfig:
    name_or_path: str = _f("ftdist/tiny", "Hugging Face model directory or hub id; 'ftdist/tiny' is the embedded tiny "
                           "Llama. A LoRA adapter directory is refused (merge it first: ftdist merge).")
    tokenizer: Optional[str] = _f(
        None, "Load the tokenizer (and its chat template) from this directory instead of model.name_or_path; it must "
        "share the model's vocabulary.")
    dtype: Literal["bf16", "fp16", "fp32"] = _f("bf16", "Training precision (bf16/fp16 mixed precision, or fp32); fp16 "
                                                "needs a GPU.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = _f(
        "auto", "Attention kernel; 'auto' = flash_attention_2 on CUDA when installed, else sdpa.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    trust_remote_code: bool = _f(False, "Allow model code from the model directory to run.")
    lora: Optional[LoraConfig] = _f(None, "LoRA adapter settings (a mapping); absent = full fine-tuning.")
    quantization: Optional[QuantizationConfig] = _f(None, "bitsandbytes quantisation settings (a mapping), for QLoRA.")


@dataclass
class DataSource:
    """One source of a data mixture (an item of data.train or data.eval); keys left out take the data.* value."""
    path: str = field(metadata={"help": "A file, datasets directory or dataset name, as data.train takes it."})
    split: Optional[str] = _f(None, "Split read (default data.split for data.train, data.eval_split for data.eval).")
    subset: Optional[str] = _f(None, "Configuration name (default data.subset).")
    revision: Optional[str] = _f(None, "Hub revision (default data.revision).")
    format: Optional[Literal["auto", "messages", "alpaca", "text", "preference", "prompt"]] = _f(
        None, "Row format (default data.format).")
    columns: Optional[dict[str, str]] = _f(None, "Column mapping (default data.columns).")
    filter: Optional[list[str]] = _f(None, "Row conditions (default data.filter).")
    max_samples: Optional[int] = _f(None, "Rows read at most, after shuffle_seed (default data.max_samples).")
    shuffle_seed: Optional[int] = _f(None, "Shuffle before max_samples (default data.shuffle_seed).")
    weight: Optional[float] = _f(
        None, "Rows taken = weight x the source's usable rows, rounded: below 1 a seeded subsample, above 1 whole "
        "repeats plus a seeded subsample for the fraction.")
    samples: Optional[int] = _f(None, "Exactly this many rows taken (repeating the source as needed).")

    def __repr__(self) -> str:  # the keys given, as the recipe has them
        return repr({k: v for k, v in dataclasses.asdict(self).items() if v is not None})


Sources = Union[str, list[Union[str, DataSource]]]


@dataclass
class DataConfig:
    train: Optional[Sources] = _f(
        None, "Training data: a JSON/JSONL/CSV/Parquet file, a saved datasets directory, a dataset name as "
        "load_dataset takes it (Hub, or a local directory laid out as one); 'ftdist/tiny-task' = the bundled task. "
        "Or a mixture: a list of such names and of mappings with path and, each optional, split, subset, revision, "
        "format, columns, filter, max_samples, shuffle_seed (default: the data.* value) and weight or samples (how "
        "many of its rows are taken; README).")
    eval: Optional[Sources] = _f(None, "Evaluation data, same forms as data.train (a list's sources read "
                                 "data.eval_split by default).")
    split: str = _f("train", "Split of data.train when it is a dataset name or directory with splits (e.g. train_sft; "
                    "slices as in datasets: train[:10%]).")
    eval_split: str = _f("test", "Split of data.eval when it is a dataset name or directory with splits (e.g. "
                         "test_sft[:3000]).")
    subset: Optional[str] = _f(None, "Configuration (subset) name of a dataset with several, as load_dataset's name.")
    revision: Optional[str] = _f(None, "Revision (branch, tag or commit) of a Hub dataset (refused for a local path, "
                                 "which has none).")
    max_samples: int = _f(0, "Use at most this many rows of each data source (after data.shuffle_seed); 0 = all.")
    shuffle_seed: Optional[int] = _f(None, "Shuffle the rows with this seed before data.max_samples; null = file order.")
    format: Literal["auto", "messages", "alpaca", "text", "preference", "prompt"] = _f(
        "auto", "Row format; 'auto' detects it from the columns.")
    columns: dict[str, str] = _f({}, "Column mapping from the format's names to the file's names, e.g. {messages: "
                                 "conversations}; a name the format does not read is refused.")
    max_length: Optional[int] = _f(
        2048, "Maximum tokens per sample; longer samples are truncated (and counted). null = the model's maximum "
        "(max_position_embeddings in its config); above it is refused.", library=("TRL", 1024, None))
    packing: bool = _f(False, "Pack several samples per row (best fit) with attention kept within each sample. "
                       "rm/dpo/orpo: each micro-batch is its pairs' sequences end to end, no padding; the same pairs "
                       "per step, up to 2 x train.micro_batch_size x data.max_length tokens per micro-batch.")
    train_on_prompt: bool = _f(False, "Also compute the loss on system/user tokens (default: assistant turns only).",
                               library=("TRL", True, "true for messages rows (assistant_only_loss=False)"))
    on_error: Literal["raise", "skip"] = _f("raise", "Malformed rows: stop with file and row number, or count and skip them.")
    max_prompt_length: int = _f(
        512, "Preference stages: prompt tokens kept (the end of the prompt) before the response; at most "
        "data.max_length (each response keeps at least one token).")
    chat_template: Optional[str] = _f(
        None, "Chat template replacing the tokenizer's: chatml, llama3, llama2, mistral, zephyr, tinyllama, a Jinja "
        "file, or Jinja text (for base models without one).")
    drop_ties: bool = _f(False, "Preference data: drop pairs whose scores are equal or whose responses are identical.")
    filter: list[str] = _f(
        [], "Keep only rows where every condition holds: 'column op value' with op ==, !=, >=, <=, >, <, in, not in "
        "and a YAML value, e.g. ['chosen_score >= 8', 'status != tie', 'in_gsm8k_train == false'].")
    min_chosen_score: Optional[float] = _f(None, "Preference data: drop pairs whose chosen score is below this.")
    num_workers: int = _f(0, "DataLoader worker processes.")
    num_proc: Optional[int] = _f(
        None, "Processes that read and tokenise the data (on the rank that does it; the others wait for its "
        "cache). null = the CPUs available to it, one per 5000 rows at most.")
    cache_dir: Optional[str] = _f(None, "Where tokenised data is cached (default: output_dir/cache).")


@dataclass
class TrainConfig:
    micro_batch_size: int = _f(4, "Rows per forward/backward on one rank.",
                               library=("transformers", 8, "8 (per_device_train_batch_size)"))
    global_batch_size: int = _f(16, "Rows per optimizer step over all ranks; accumulation = global / (micro * world).")
    epochs: float = _f(1.0, "Passes over the training data (ignored when train.max_steps > 0).",
                       library=("transformers", 3.0, "3"))
    max_steps: int = _f(-1, "Optimizer steps to run; -1 = derived from train.epochs.")
    lr: float = _f(2e-5, "Peak learning rate.")
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"] = _f(
        "cosine", "Learning-rate schedule (transformers schedulers); constant with a warmup set warms up "
        "(constant_with_warmup).", library=("transformers", "linear", None))
    warmup_ratio: Optional[float] = _f(
        None, "Fraction of steps with linear warmup (default 0.03 unless train.warmup_steps is given).",
        library=("transformers", 0.0, "0 (no warmup)"))
    warmup_steps: Optional[int] = _f(
        None, "Steps of linear warmup, instead of train.warmup_ratio: both non-zero in the recipe (or both on the "
        "command line) is refused; given on the command line, either replaces the recipe's other one.")
    scheduler_kwargs: dict[str, Any] = _f(
        {}, "Extra arguments of the schedule, as transformers names them (e.g. {num_cycles: 2} for "
        "cosine_with_restarts).")
    weight_decay: float = _f(0.0, "Decoupled weight decay; never applied to biases and norm weights.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.")
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "adafactor", "sgd", "lion",
                       "rmsprop", "adagrad"] = _f(
        "adamw_torch", "Optimizer (DeepSpeed CPU Adam is used automatically with optimizer offload).")
    optimizer_kwargs: dict[str, Any] = _f(
        {}, "Extra arguments of the optimizer, as its class names them; they override ftdist's defaults (e.g. "
        "{momentum: 0.0, nesterov: true} for sgd, {betas: [0.95, 0.98]} for lion).")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_eps: float = _f(1e-8, "Adam epsilon.")
    label_smoothing: float = _f(0.0, "Label smoothing of the token cross-entropy.")
    on_nonfinite: Literal["stop", "skip"] = _f(
        "stop", "A step with a NaN/inf loss or gradient norm: stop (one line naming the step; nothing of it is "
        "saved) or skip its update and go on.")
    max_nonfinite_steps: int = _f(10, "With train.on_nonfinite=skip: stop after this many non-finite steps in a row.")
    neftune_alpha: float = _f(0.0, "NEFTune noise scale on input embeddings during training; 0 disables.")
    log_every: int = _f(1, "Log metrics every N optimizer steps.")
    eval_every: int = _f(0, "Evaluate every N optimizer steps; 0 = only before and after training.")
    eval_accuracy: bool = _f(False, "Also measure exact-match accuracy of greedy answers to the eval prompts.")
    eval_max_new_tokens: int = _f(32, "Tokens generated per eval prompt for accuracy.")
    eval_max_samples: int = _f(200, "At most this many eval rows are used for accuracy.")
    progress_bar: bool = _f(True, "Show a progress bar on rank 0.")
    group_by_length: Union[bool, Literal["step", "epoch"]] = _f(
        "step", "Unpacked rows. step: each step's rows run as micro-batches of similar length (up to "
        "train.micro_batch_size rows; more micro-batches where the padding saved pays for them), the same rows and "
        "the same update as without it. epoch (or true): steps of rows of similar length, cut from mega-batches of "
        "50 steps sorted by length (the transformers Trainer's group_by_length), in random step order; can train "
        "worse (README). false: micro-batches cut from each step's rows in order. With data.packing: no effect for "
        "sft (rows packed over the epoch); for rm/dpo/orpo only epoch acts (each step's pairs are packed by tokens).")
    save_final: bool = _f(True, "Write the model to output_dir/final at the end (false: the checkpoints only; a "
                          "LoRA run's hold its adapter, a full run's DeepSpeed's zero_to_fp32.py).")

    def warmup(self, total_steps: int) -> int:
        """Warmup steps of a run of total_steps steps: the non-zero one of warmup_steps and warmup_ratio (both
        non-zero is refused), else 0 where either is given, else 3%."""
        if self.warmup_steps:
            return self.warmup_steps
        if self.warmup_ratio is None and self.warmup_steps is None:
            return int(round(0.03 * total_steps))
        return int(round((self.warmup_ratio or 0.0) * total_steps))


@dataclass
class DeepSpeedConfig:
    config: str = _f("auto", "A JSON in ds_configs/ (name or path); 'auto' = zero{stage}[_offload].json.")
    zero_stage: int = _f(2, "ZeRO stage 0-3.")
    offload_optimizer: bool = _f(False, "Keep optimizer state on CPU (DeepSpeed CPU Adam); ZeRO 1-3.")
    offload_params: bool = _f(False, "Keep parameters on CPU; ZeRO-3 only.")


@dataclass
class CheckpointConfig:
    every_steps: int = _f(0, "Save a checkpoint every N optimizer steps (and always at the end); 0 = only at the end.")
    keep_last: int = _f(2, "Keep the newest N checkpoints; 0 keeps all.",
                        library=("transformers", 0, "all (save_total_limit=None)"))
    resume: str = _f("auto", "'auto' = newest complete checkpoint in output_dir, 'never', or a checkpoint path.")
    resume_with_new_data: bool = _f(
        False, "Resume even though data.train's content changed since the checkpoint (the data position then points "
        "into the new data); refused otherwise.")


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(True, "Write TensorBoard events to output_dir/tensorboard.")
    wandb: bool = _f(False, "Log to Weights & Biases: needs the wandb package (pip install 'ftdist[wandb]') and a "
                     "key (WANDB_API_KEY or `wandb login`), or WANDB_MODE=offline; checked before anything loads.")
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
        False, "Weight each pair's loss by (score_chosen - score_rejected)^2, normalised to mean 1 over the "
        "micro-batch.")
    score_diff_scaling: bool = _f(
        False, "The guides' score-difference loss: -log sigmoid((r_chosen - r_rejected) * (score_chosen - "
        "score_rejected)^2), per pair, unnormalised (ties give no gradient).")


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
    nll: Literal["trl", "pair_mean"] = _f(
        "trl", "The SFT term: trl = TRL's ORPOTrainer (token mean over the chosen rows' prompt and response tokens "
        "of the micro-batch); pair_mean = each pair's mean over its response tokens, then the mean over pairs.")


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
    top_k: int = _f(0, "Sample only among the k most likely tokens (0 = off).",
                    library=("transformers", 50, "50 (generate)"))
    repetition_penalty: float = _f(1.0, "transformers' repetition penalty in the rollouts (1 = off).")
    min_new_tokens: int = _f(0, "EOS is not sampled before this many response tokens.")
    missing_eos_penalty: Optional[float] = _f(
        None, "Subtracted from the score of a response that reached max_new_tokens without EOS; null = none "
        "(such responses are always counted in the metric no_eos).")
    rollout_engine: Literal["hf"] = _f(
        "hf", "What generates the rollouts on the policy ranks: hf = the policy's transformers model in ftdist's own "
        "decoding loop (a prompt encoded once for its samples_per_prompt samples, finished rows leaving the batch).")
    generate_batch_size: int = _f(
        0, "Samples decoded at a time on each policy rank (whole groups of a prompt's samples; 0 = the rank's whole "
        "share at once); train.micro_batch_size is the training micro-batch.")
    gather_for_rollout: bool = _f(
        True, "Under ZeRO-3 with several policy ranks: gather the whole policy into a plain copy once per rollout and "
        "decode with it (needs the memory of one whole model per rank); false = transformers' synced generate, which "
        "gathers every layer at every decoded token.")
    async_rollouts: bool = _f(
        False, "One step off-policy: the next batch is generated (from a copy of the weights taken before the "
        "update) while the current one trains; the importance ratio is taken against the policy that generated "
        "each batch. Costs a copy of the policy per rank.")
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
    kl_estimator: Literal["auto", "k1", "k2", "k3"] = _f(
        "auto", "Per-token KL estimator: k1 = log r (unbiased), k2 = (log r)^2 / 2, k3 = r - 1 - log r (unbiased, "
        ">= 0); auto = k3 for grpo (a loss term, where k1's expected gradient is zero), k1 otherwise (a reward "
        "penalty).")
    kl_target: Optional[float] = _f(
        None, "Adaptive KL controller: per-sequence KL to aim for; null = fixed ppo.kl_coef.")
    kl_horizon: int = _f(10000, "Adaptive KL controller horizon in samples (how fast kl_coef moves).")
    entropy_coef: float = _f(0.0, "Weight of the entropy bonus in the policy loss.")
    vf_coef: float = _f(1.0, "Weight of the critic's value loss (the critic is its own model and optimizer: this "
                        "scales its gradient, which matters with clipping and SGD, hardly with Adam).")
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
    ref_ranks: int = _f(1, "Actors of the reference group; 0 = no group: a frozen copy of the starting policy on each "
                        "policy rank (its forward split over the policy ranks, which otherwise wait while the "
                        "reference scores); none with model.lora: the policy with its adapter off.")
    reward_ranks: int = _f(1, "Actors of the reward group.")
    colocation: Literal["none", "policy_ref", "critic_reward", "ref_reward", "all"] = _f(
        "none", "Groups that share devices (fractional GPU bundles of one placement group): none, policy+reference, "
        "critic+reward, reference+reward, or all groups; shared groups need equal ranks.")
    cpus_per_actor: float = _f(1.0, "CPUs in each actor's bundle; fractions let several actors share a core.")
    resources: dict[str, dict[str, float]] = _f(
        {}, "Extra Ray resources each actor of a group asks for, by group (policy, ref, reward, critic): e.g. "
        "{policy: {'node:10.0.0.11': 0.01}} keeps the policy on that node (Ray gives every node a resource "
        "node:IP of 1.0), or a custom resource its nodes were started with (ray start --resources).")
    call_timeout_s: float = _f(
        3600.0, "Longest any actor call may take (a rollout, a scoring pass, an update, a checkpoint) before the run "
        "stops with an error naming the group and rank; 0 = no limit. The workers' start (loading the models, "
        "forming the process groups) waits at most dist.timeout_s instead.")
    device: Literal["auto", "gpu", "cpu"] = _f("auto", "Actor bundles: a GPU each (auto: when the Ray cluster has GPUs) "
                                               "or CPU only.")
    eval_every: int = _f(
        0, "Greedy evaluation on data.eval every N iterations (reward mean; exact-match accuracy when the rows have "
        "an 'answer' column); 0 = before and after training only.")

    @property
    def kl(self) -> str:
        """The KL estimator in use (ppo.kl_estimator with auto resolved)."""
        if self.kl_estimator != "auto":
            return self.kl_estimator
        return "k3" if self.algorithm == "grpo" else "k1"


@dataclass
class EvalConfig:
    suites: list[str] = _f(
        [], "Evaluation suites, each SUITE[@SPLIT]=DATA as `ftdist eval --suite` takes them (SUITE: perplexity, "
        "exact_match, contains, choice, reward, judge; DATA: a data file, a datasets directory or a Hub dataset "
        "name; @SPLIT: that split of a directory or Hub name, default train), or lm_eval:TASK[,TASK] "
        "(lm-evaluation-harness tasks, with lm-eval installed; run on rank 0). During training (stages sft, dpo, orpo) they run on the model being "
        "trained at every evaluation (train.eval_every, and before and after training) on at most "
        "train.eval_max_samples rows each, logged as eval/SUITE/METRIC, every answer and score in "
        "output_dir/samples/step_N.jsonl; with stage: eval, on eval.models.")
    models: list[str] = _f(
        [], "stage: eval: the models compared, [NAME=]MODEL as `ftdist eval` takes them (model directories, runs' "
        "output_dirs, LoRA adapters, ftdist/tiny); results in output_dir/eval.json and samples.jsonl.")
    step: Optional[str] = _f(None, "stage: eval: with runs' output_dirs, this checkpoint step (or 'latest') "
                             "instead of final/.")
    base: Optional[str] = _f(None, "stage: eval: LoRA adapters' base model (default: as their config names it).")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "stage: eval: the models' dtype (auto: bf16 on a GPU, fp32 on CPU).")
    reward_model: Optional[str] = _f(None, "Reward model directory for the reward suite (an ftdist rm run's final/).")
    judge_model: Optional[str] = _f(None, "Causal LM directory (or ftdist/tiny) that rates answers in the judge suite.")
    judge_template: Optional[str] = _f(
        None, "The judge's rubric for a 1-10 rating, with {question} and {answer} (default: the shipped one).")
    pairwise_template: Optional[str] = _f(
        None, "The judge's pairwise rubric, with {question}, {answer_a} and {answer_b} (default: the shipped one).")
    lm_eval_include: Optional[str] = _f(
        None, "A directory of lm-evaluation-harness task YAMLs (e.g. tasks on local data files) for lm_eval:TASK.")
    max_samples: int = _f(0, "stage: eval: rows per suite at most (0 = all; during training: train.eval_max_samples).")
    max_new_tokens: int = _f(64, "Tokens generated at most per answer (exact_match, contains, reward, judge).")
    max_length: Optional[int] = _f(
        None, "stage: eval: tokens per perplexity and lm_eval row (longer: truncated); null: each model's maximum "
        "(max_position_embeddings); above a model's maximum is refused. During training: data.max_length.")
    batch_size: int = _f(8, "Rows per forward or generate call.")


@dataclass
class Config:
    stage: Literal["sft", "rm", "dpo", "orpo", "ppo", "eval"] = _f(
        "sft", "Training stage, or eval: evaluate eval.models on eval.suites (no training).")
    output_dir: str = _f("runs/ftdist", "Run directory: run.json, config.yaml, metrics.jsonl, checkpoints/, final/.")
    overwrite_output_dir: bool = _f(
        False, "Write into an output_dir that is not empty and not an ftdist run directory (refused otherwise).")
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
    eval: EvalConfig = _f(EvalConfig(), "Evaluation suites (during training, and stage: eval).")
    # not a recipe key: what load_config decided on the user's behalf (a command-line value replacing the recipe's,
    # a schedule that warms up), one line each, logged when the run starts and shown by --print-config
    notes: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for which in ("train", "eval"):  # a mixture's sources with the keys they set (null = the data.* value)
            if isinstance(out["data"][which], list):
                out["data"][which] = [s if isinstance(s, str) else {k: v for k, v in s.items() if v is not None}
                                      for s in out["data"][which]]
        return out
