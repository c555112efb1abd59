"""Recipe configuration: one typed schema (schema.py), loading with overrides (load.py), and every rule about
combinations of keys (validate.py). Unknown keys, wrong types and invalid combinations are rejected at load
time with a message that names the key, the value and what is allowed.
"""

from ftdist.config.load import (DS_CONFIGS_DIR, RECIPES_DIR, builtin_recipes, config_help, config_markdown,
                                config_yaml, ds_config_path, load_config, parse_overrides,
                                resolve_recipe_path)
from ftdist.config.schema import (OFFLOAD_OPTIMIZERS, PREFERENCE_STAGES, CheckpointConfig, Config, ConfigError,
                                  DataConfig, DataSource, DeepSpeedConfig, DistConfig, DPOConfig, EvalConfig, LoggingConfig,
                                  LoraConfig, ModelConfig, ORPOConfig, PPOConfig, QuantizationConfig,
                                  RewardModelConfig, TrainConfig)
from ftdist.config.validate import colocated_sets, ppo_groups, resume_changes, validate

__all__ = [
    "DS_CONFIGS_DIR", "RECIPES_DIR", "builtin_recipes", "config_help", "config_markdown", "config_yaml",
    "ds_config_path",
    "load_config", "parse_overrides", "resolve_recipe_path", "OFFLOAD_OPTIMIZERS",
    "PREFERENCE_STAGES", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DataSource", "DeepSpeedConfig",
    "DistConfig", "DPOConfig", "EvalConfig", "LoggingConfig", "LoraConfig", "ModelConfig", "ORPOConfig", "PPOConfig",
    "QuantizationConfig", "RewardModelConfig", "TrainConfig", "colocated_sets", "ppo_groups", "resume_changes",
    "validate",
]
