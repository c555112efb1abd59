"""Loading a recipe: a YAML file or built-in name, `key=value` overrides with dotted keys, type checks that
name the key, then validation; and the views of the schema (`--help`, the README table, config.yaml).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ftdist.config.schema import Config, ConfigError
from ftdist.config.validate import validate

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DS_CONFIGS_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
                 "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


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
        if isinstance(value, str) and value.lower() in DTYPE_ALIASES and DTYPE_ALIASES[value.lower()] in typing.get_args(tp):
            return DTYPE_ALIASES[value.lower()]  # dtype names as transformers and torch spell them
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
                errors.append((a, str(e)))
        # a mapping or a list: the one alternative of that kind says what is wrong inside it
        fitting = [msg for a, msg in errors if _container_kind(a) is type(value)]
        if len(fitting) == 1:
            raise ConfigError(fitting[0])
        raise ConfigError(errors[0][1] if len(errors) == 1 else str(bad))
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
        if not math.isfinite(value):
            raise ConfigError(f"{key}: got {value!r}, expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad
        return str(value)
    return value


def _container_kind(tp):
    """dict for a mapping type (a section or dict[...]), list for list[...], None for anything else."""
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:
        return dict
    return list if typing.get_origin(tp) is list else None


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
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if required:
        raise ConfigError(f"{prefix or cls.__name__}: missing key '{required[0]}' (required)")
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{self.name}: line {key_node.start_mark.line + 1}: key '{key}' is given twice "
                                  f"in the same section (first on line {seen[key] + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_recipe(path: Path) -> dict:
    try:
        loader = _UniqueKeyLoader(path.read_text())
        loader.name = str(path)
        try:
            tree = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return tree or {}


def load_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None, data: Optional[dict] = None) -> Config:
    tree: dict = {}
    if recipe is not None:
        path = resolve_recipe_path(recipe)
        tree = _read_recipe(path)
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
