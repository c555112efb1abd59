"""Every rule about combinations of recipe keys, checked at load before anything starts.

The PPO actor-group rules (which groups a recipe starts, which share devices) live
here too, and the Ray shells read them from here.
"""

from __future__ import annotations

import difflib
import logging

from ftdist.config.filters import parse_filter
from ftdist.config.schema import (EVAL_SUITES, OFFLOAD_OPTIMIZERS, PREFERENCE_STAGES, Config, ConfigError, DataSource,
                                  ModelConfig)

# ppo.colocation -> the groups that share devices ("all": every group the recipe starts)
COLOCATED = {"policy_ref": ("policy", "ref"), "critic_reward": ("critic", "reward"), "ref_reward": ("ref", "reward")}

# what data.columns may map, by row format: the names each format's reader asks for (a key outside them would
# silently do nothing)
COLUMN_ROLES = {
    "messages": ("messages",),
    "alpaca": ("instruction", "input", "output", "system"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected", "system", "score_chosen", "score_rejected", "margin"),
    "prompt": ("prompt",),
}


# what may differ between a checkpoint's recipe and the one that resumes it (key or section prefix): where the
# run writes, how often it logs, evaluates and checkpoints, its timeouts. Anything else changes the training the
# checkpoint's optimizer and schedule belong to. data.train may name another path; its content is compared.
RESUME_SAFE_KEYS = ("output_dir", "overwrite_output_dir", "checkpoint.", "logging.", "dist.timeout_s",
                    "train.log_every", "train.eval_every", "train.progress_bar", "train.eval_accuracy",
                    "train.eval_max_new_tokens", "train.eval_max_samples", "data.train", "data.eval",
                    "data.eval_split", "data.cache_dir", "data.num_workers", "data.num_proc", "ppo.eval_every",
                    "train.save_final", "eval.")


def _resume_safe(key: str) -> bool:
    """A key of RESUME_SAFE_KEYS, or inside one of its sections (those ending with a dot): data.train is safe,
    data.train_on_prompt is not."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_SAFE_KEYS)


def resume_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for every recipe key that differs and may not change within a run."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "columns":  # a section (data.columns is a value)
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    a, b = flat(saved), flat(current)
    for d in (a, b):  # keys added later, with the meaning a recipe from before them had
        if d.get("train.warmup_ratio") is None and d.get("train.warmup_steps") is None:
            d["train.warmup_ratio"] = 0.03
        d.setdefault("train.group_by_length", False)
        if d["train.group_by_length"] in ("step", False):  # the same rows and update in each step (a split only)
            d["train.group_by_length"] = "step"
        elif d["train.group_by_length"] is True:
            d["train.group_by_length"] = "epoch"
    changed = [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return [c for c in changed if not _resume_safe(c[0])]


def ppo_groups(cfg: Config) -> dict[str, int]:
    """The actor groups a PPO recipe starts, with their ranks: no critic without GAE (ppo.algorithm=ppo), no
    reference group with LoRA (the reference is the policy with its adapter off)."""
    p = cfg.ppo
    groups = {"policy": p.policy_ranks}
    if p.algorithm == "ppo":
        groups["critic"] = p.critic_ranks
    if cfg.model.lora is None and p.ref_ranks > 0:  # ref_ranks=0: a frozen copy on each policy rank
        groups["ref"] = p.ref_ranks
    groups["reward"] = p.reward_ranks
    return groups


def colocated_sets(colocation: str, roles: list[str]) -> list[tuple[str, ...]]:
    """Partition the roles into sets that share devices, e.g. policy_ref -> [(policy, ref), (critic,), (reward,)]."""
    if colocation == "all":
        return [tuple(roles)]
    shared = tuple(r for r in COLOCATED.get(colocation, ()) if r in roles)
    sets = [shared] if len(shared) > 1 else []
    return sets + [(r,) for r in roles if not any(r in s for s in sets)]


def validate(cfg: Config) -> None:
    """Combinations that cannot work are rejected before anything loads."""
    _validate_eval(cfg)
    if cfg.stage == "eval":
        return  # no training: the training keys are not used
    t, ds, m = cfg.train, cfg.deepspeed, cfg.model
    positive = {"train.micro_batch_size": t.micro_batch_size, "train.global_batch_size": t.global_batch_size,
                "data.max_length": 1 if cfg.data.max_length is None else cfg.data.max_length,
                "train.log_every": t.log_every, "train.max_nonfinite_steps": t.max_nonfinite_steps}
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{k}: got {v}, must be > 0")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr: got {t.lr}, must be > 0")
    non_negative = {"train.max_grad_norm": t.max_grad_norm, "train.weight_decay": t.weight_decay,
                    "train.eval_every": t.eval_every, "checkpoint.every_steps": cfg.checkpoint.every_steps,
                    "train.neftune_alpha": t.neftune_alpha, "train.eval_max_samples": t.eval_max_samples}
    for k, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"{k}: got {v}, must be >= 0")
    for k, v in (("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)):
        if not 0 <= v < 1:
            raise ConfigError(f"{k}: got {v}, allowed: 0 <= x < 1")
    if t.adam_eps <= 0:
        raise ConfigError(f"train.adam_eps: got {t.adam_eps}, must be > 0")
    if cfg.dist.timeout_s <= 0:
        raise ConfigError(f"dist.timeout_s: got {cfg.dist.timeout_s}, must be > 0 (seconds a collective may wait)")
    if t.warmup_ratio and t.warmup_steps:  # one of them 0: the other one counts
        raise ConfigError(f"train.warmup_ratio={t.warmup_ratio} and train.warmup_steps={t.warmup_steps}: give one "
                          f"of them (a command-line value replaces the recipe's other one)")
    if t.warmup_ratio is not None and not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio: got {t.warmup_ratio}, allowed: 0 <= x < 1")
    if t.warmup_steps is not None and t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps: got {t.warmup_steps}, must be >= 0")
    if t.scheduler_kwargs:
        _validate_scheduler_kwargs(t.scheduler, t.scheduler_kwargs)
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
    if ds.offload_optimizer and t.optimizer not in OFFLOAD_OPTIMIZERS:
        raise ConfigError(f"train.optimizer={t.optimizer!r} cannot be combined with deepspeed.offload_optimizer=true "
                          "(use adamw_torch, which becomes DeepSpeed's CPU Adam)")
    if cfg.stage in PREFERENCE_STAGES:
        _validate_preference(cfg)
    if cfg.stage == "ppo":
        _validate_ppo(cfg)
    _check_filters("data.filter", cfg.data.filter)
    if cfg.data.max_samples < 0:
        raise ConfigError(f"data.max_samples: got {cfg.data.max_samples}, must be >= 0 (0 = all rows)")
    _check_columns("data.columns", cfg.data.columns, cfg.stage, cfg.data.format)
    if cfg.data.train is None and cfg.stage != "ppo":
        raise ConfigError("data.train: no training data given (a file path, a datasets directory, or 'ftdist/tiny-task')")
    for which in ("train", "eval"):
        if isinstance(getattr(cfg.data, which), list):
            _validate_sources(cfg, which)


def _validate_eval(cfg: Config) -> None:
    e = cfg.eval
    for i, spec in enumerate(e.suites):
        name, sep, path = str(spec).partition("=")
        name = name.partition("@")[0]  # SUITE@SPLIT=DATA: a split of a dataset directory or Hub name
        if str(spec).startswith("lm_eval:"):
            if cfg.stage != "eval" and cfg.deepspeed.zero_stage == 3:
                raise ConfigError(f"eval.suites[{i}]: {spec}: lm-evaluation-harness needs the whole model in one "
                                  f"process, and deepspeed.zero_stage=3 shards it; evaluate the run's checkpoints "
                                  f"with `ftdist eval` instead")
            continue
        if not sep or name not in EVAL_SUITES or not path:
            raise ConfigError(f"eval.suites[{i}]: got {spec!r}, allowed: SUITE[@SPLIT]=DATA with SUITE one of "
                              f"{', '.join(EVAL_SUITES)}, or lm_eval:TASK[,TASK]")
    names = {str(s).partition("=")[0].partition("@")[0] for s in e.suites}
    if "reward" in names and not e.reward_model:
        raise ConfigError("eval.suites has a reward suite: set eval.reward_model (an ftdist rm run's final/)")
    if "judge" in names and not e.judge_model:
        raise ConfigError("eval.suites has a judge suite: set eval.judge_model (a causal LM directory)")
    for k in ("max_new_tokens", "batch_size", "max_length"):
        if getattr(e, k) is not None and getattr(e, k) <= 0:  # max_length null: the model's maximum
            raise ConfigError(f"eval.{k}: got {getattr(e, k)}, must be > 0")
    if e.max_samples < 0:
        raise ConfigError(f"eval.max_samples: got {e.max_samples}, must be >= 0 (0 = all rows)")
    if cfg.stage == "eval":
        if not e.models or not e.suites:
            raise ConfigError("stage=eval needs eval.models (the models to compare) and eval.suites (SUITE[@SPLIT]=DATA)")
    elif e.suites and cfg.stage not in ("sft", "dpo", "orpo"):
        raise ConfigError(f"eval.suites during training: the suites evaluate a causal LM (stages sft, dpo, orpo), "
                          f"not stage={cfg.stage}; evaluate its output with `ftdist eval` or a stage: eval recipe")


def _check_filters(key: str, filters: list[str]) -> None:
    for text in filters:
        try:
            parse_filter(text)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None


def _check_columns(key: str, columns: dict, stage: str, fmt: str) -> None:
    """data.columns maps roles a row format reads to the file's columns: any other key would do nothing."""
    if stage == "ppo":
        fmt = "prompt"  # PPO reads the prompt column; every other column travels to the reward function as it is
    elif stage in PREFERENCE_STAGES:
        fmt = "preference"
    if fmt == "auto":
        allowed = tuple(dict.fromkeys(r for roles in COLUMN_ROLES.values() for r in roles))
        what = "rows of any format (data.format=auto)"
    else:
        allowed, what = COLUMN_ROLES[fmt], f"{fmt} rows" + (f" (stage={stage})" if stage != "sft" else "")
    for role, column in columns.items():
        if role in allowed:
            continue
        hint = ""
        if column in allowed:
            hint = f"; the mapping goes from the role to your column: {{{column}: {role}}}"
        elif difflib.get_close_matches(role, allowed, n=1, cutoff=0.75):
            hint = f"; did you mean '{difflib.get_close_matches(role, allowed, n=1, cutoff=0.75)[0]}'?"
        raise ConfigError(f"{key}.{role}: {what} have no column role {role!r}; allowed: {', '.join(allowed)}{hint}")


def _validate_sources(cfg: Config, which: str) -> None:
    """The sources of a data mixture (data.train or data.eval given as a list)."""
    sources = getattr(cfg.data, which)
    if not sources:
        raise ConfigError(f"data.{which}: an empty list; give a source (a path or dataset name) or a list of them")
    for i, src in enumerate(sources):
        if not isinstance(src, DataSource):
            continue
        key = f"data.{which}[{i}]"
        if src.weight is not None and src.samples is not None:
            raise ConfigError(f"{key}: weight={src.weight} and samples={src.samples}: give one of them")
        if src.weight is not None and src.weight <= 0:
            raise ConfigError(f"{key}.weight: got {src.weight}, must be a number > 0")
        if src.samples is not None and src.samples < 1:
            raise ConfigError(f"{key}.samples: got {src.samples}, must be an integer >= 1")
        if src.max_samples is not None and src.max_samples < 0:
            raise ConfigError(f"{key}.max_samples: got {src.max_samples}, must be >= 0 (0 = all)")
        if cfg.stage in PREFERENCE_STAGES and src.format not in (None, "auto", "preference"):
            raise ConfigError(f"{key}.format: got {src.format!r} for stage={cfg.stage}, allowed: 'preference' or "
                              f"'auto'")
        _check_filters(f"{key}.filter", src.filter or [])
        _check_columns(f"{key}.columns", src.columns or {}, cfg.stage, src.format or cfg.data.format)


def _validate_scheduler_kwargs(name: str, kwargs: dict) -> None:
    """Keys the transformers schedule `name` takes beyond the optimizer and the step counts."""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    params = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]).parameters
    allowed = [p for p in params if p not in ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")]
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(f"train.scheduler_kwargs.{key}: not an argument of the {name} schedule (it takes: "
                              f"{', '.join(allowed) or 'none'})")


def _validate_preference(cfg: Config) -> None:
    d, dpo = cfg.data, cfg.dpo
    if d.format not in ("auto", "preference"):
        raise ConfigError(f"data.format: got {d.format!r} for stage={cfg.stage}, allowed: 'preference' or 'auto'")
    if not 0 < d.max_prompt_length <= (d.max_length or d.max_prompt_length):  # null: checked once resolved
        raise ConfigError(f"data.max_prompt_length: got {d.max_prompt_length}, allowed: 0 < x <= data.max_length "
                          f"({d.max_length})")
    if cfg.stage == "rm" and cfg.rm.score_diff_scaling and cfg.rm.score_diff_weighting:
        raise ConfigError("rm.score_diff_scaling and rm.score_diff_weighting: choose one (scaling is the guides' "
                          "-log sigmoid((r_c - r_r) * d^2); weighting multiplies each pair's loss by d^2 / mean d^2)")
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
                "ppo.policy_ranks": p.policy_ranks, "ppo.critic_ranks": p.critic_ranks,
                "ppo.reward_ranks": p.reward_ranks, "ppo.kl_horizon": p.kl_horizon, "ppo.temperature": p.temperature,
                "ppo.clip_eps": p.clip_eps, "ppo.critic_lr": p.critic_lr, "ppo.cpus_per_actor": p.cpus_per_actor}
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{k}: got {v}, must be > 0")
    if p.call_timeout_s < 0:
        raise ConfigError(f"ppo.call_timeout_s: got {p.call_timeout_s}, must be >= 0 (0 = no limit)")
    if p.repetition_penalty <= 0:
        raise ConfigError(f"ppo.repetition_penalty: got {p.repetition_penalty}, must be > 0 (1 = off)")
    for k, v in (("ppo.top_k", p.top_k), ("ppo.vf_coef", p.vf_coef), ("ppo.min_new_tokens", p.min_new_tokens),
                 ("ppo.generate_batch_size", p.generate_batch_size), ("ppo.ref_ranks", p.ref_ranks)):
        if v < 0:
            raise ConfigError(f"{k}: got {v}, must be >= 0")
    if p.min_new_tokens > p.max_new_tokens:
        raise ConfigError(f"ppo.min_new_tokens={p.min_new_tokens} is above ppo.max_new_tokens={p.max_new_tokens}")
    if p.algorithm == "grpo" and p.kl_estimator == "k1" and p.kl_coef > 0:
        logging.getLogger("ftdist").warning(
            "ppo.kl_estimator=k1 with grpo: as a loss term (grpo) the k1 estimator log(pi/pi_ref) has zero expected "
            "gradient, so the KL term does not pull the policy towards the reference; k3 (the default) does")
    if not 0 < p.top_p <= 1:
        raise ConfigError(f"ppo.top_p: got {p.top_p}, allowed: 0 < x <= 1")
    if p.kl_coef < 0 or p.entropy_coef < 0 or p.value_clip_eps < 0:
        raise ConfigError("ppo.kl_coef, ppo.entropy_coef and ppo.value_clip_eps must be >= 0")
    if p.kl_target is not None and p.kl_target <= 0:
        raise ConfigError(f"ppo.kl_target: got {p.kl_target}, must be > 0 (or null for a fixed ppo.kl_coef)")
    if cfg.data.train is None:
        raise ConfigError("data.train: stage=ppo needs prompts: a file with a 'prompt' column (text or a message "
                          "list), e.g. 'ftdist/tiny-task/prompts'")
    if cfg.data.max_length is not None and p.max_new_tokens >= cfg.data.max_length:
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
    n = p.rollout_batch_size * p.samples_per_prompt
    if n % p.mini_batch_size:
        raise ConfigError(f"ppo.mini_batch_size={p.mini_batch_size} must divide the samples of an iteration "
                          f"(ppo.rollout_batch_size x ppo.samples_per_prompt = {n})")
    groups = ppo_groups(cfg)
    for name, ranks in groups.items():
        if n % ranks:
            raise ConfigError(f"ppo.{name}_ranks={ranks} must divide the samples of an iteration ({n})")
    micro = cfg.train.micro_batch_size
    for name in [g for g in ("policy", "critic") if g in groups]:
        per_step = micro * groups[name]
        if p.mini_batch_size % per_step:
            raise ConfigError(f"ppo.mini_batch_size={p.mini_batch_size} is not a multiple of train.micro_batch_size "
                              f"({micro}) x ppo.{name}_ranks ({groups[name]}) = {per_step}")
    shared = tuple(groups) if p.colocation == "all" else COLOCATED.get(p.colocation, ())
    missing = [g for g in shared if g not in groups]
    if missing:
        why = ("ppo.algorithm=" + p.algorithm if "critic" in missing else
               "ppo.ref_ranks=0 (the reference is on the policy ranks)" if p.ref_ranks == 0
               else "model.lora (the reference is the policy)")
        raise ConfigError(f"ppo.colocation={p.colocation!r}: there is no {missing[0]} group with {why}")
    if len({groups[g] for g in shared}) > 1:
        raise ConfigError(f"ppo.colocation={p.colocation!r} shares devices between "
                          f"{', '.join(f'ppo.{g}_ranks={groups[g]}' for g in shared)}; they must be equal")
    for group, res in cfg.ppo.resources.items():
        if group not in ("policy", "ref", "reward", "critic"):
            raise ConfigError(f"ppo.resources.{group}: not a group; allowed: policy, ref, reward, critic")
        if not isinstance(res, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in res.values()):
            raise ConfigError(f"ppo.resources.{group}: got {res!r}, allowed: a mapping of Ray resource names to "
                              f"amounts > 0 (e.g. {{'node:10.0.0.11': 0.01}})")


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
        # allowed, as transformers allows it (the guides use it): bitsandbytes casts the bf16 inputs to fp16
        logging.getLogger("ftdist").warning(
            "model.quantization.compute_dtype='fp16' with bf16 training: the 4-bit matmuls run in fp16, where bf16 "
            "values above 65504 overflow to inf (train.on_nonfinite then stops the run); compute_dtype='bf16' "
            "avoids it")
