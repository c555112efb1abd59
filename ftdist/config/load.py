"""Loading a recipe: a YAML file or built-in name, `key=value` overrides with dotted keys, type checks that
name the key, then validation; and the views of the schema (`--help`, the README table, config.yaml).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
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
        try:  # a key given twice in a flow mapping ({a: x, a: y}) is refused, as in a recipe file
            value = _load_yaml(raw, item) if raw != "" else ""
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
        if not p.is_file():
            raise ConfigError(f"{recipe}: a directory, not a recipe (a YAML file or a built-in name: "
                              f"{', '.join(builtin_recipes())})")
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


def _load_yaml(text: str, name: str):
    """YAML's safe load, except that a key given twice in one mapping is a ConfigError naming `name`."""
    loader = _UniqueKeyLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_recipe(path: Path) -> dict:
    data = path.read_bytes()
    try:
        if b"\0" in data:
            raise UnicodeError
        text = data.decode("utf-8")
    except UnicodeError:
        raise ConfigError(f"{path}: not a recipe: binary content, not YAML text") from None
    try:
        tree = _load_yaml(text, str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{path}: {where}not valid YAML: {what}") from None
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
    given = parse_overrides(overrides or [])
    notes = _command_line_warmup(tree, dict(given))
    for key, value in given:
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree)
    validate(cfg)
    t = cfg.train
    if t.scheduler == "constant" and (t.warmup_steps or t.warmup_ratio):
        # transformers' constant schedule ignores num_warmup_steps; a warmup that is set is meant to happen
        warmup = f"train.warmup_steps={t.warmup_steps}" if t.warmup_steps else f"train.warmup_ratio={t.warmup_ratio}"
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, scheduler="constant_with_warmup"))
        notes.append(f"train.scheduler=constant with {warmup}: the learning rate warms up, then stays constant "
                     f"(constant_with_warmup; transformers' constant schedule would skip the warmup)")
    cfg.notes = tuple(notes)
    return cfg


WARMUP_KEYS = ("train.warmup_steps", "train.warmup_ratio")


def _command_line_warmup(tree: dict, given: dict) -> list[str]:
    """A warmup key given on the command line replaces the recipe's other one (as transformers' warmup_steps wins
    over warmup_ratio), so `train.warmup_steps=5` works on a recipe that sets a ratio; returns the note saying so.
    Both keys in the same place, both non-zero, stays an error (validate)."""
    on_line = [k for k in WARMUP_KEYS if k in given]
    if len(on_line) != 1:
        return []
    other = next(k for k in WARMUP_KEYS if k not in on_line)
    section = tree.get("train")
    name = other.split(".")[1]
    if not isinstance(section, dict) or section.get(name) is None:
        return []
    replaced = section.pop(name)
    return [f"{on_line[0]}={given[on_line[0]]} from the command line replaces the recipe's {other}={replaced}"]


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
        help = f.metadata.get("help", "")
        if "library" in f.metadata:
            help += f" ({_library_default(f.metadata['library'])})"
        yield key, _type_name(tp), default, help, False


def _library_default(library: tuple) -> str:
    name, value, shown = library
    return f"{name} default: {shown or yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def _library_marks(cfg: Config) -> dict[str, str]:
    """key -> '<library> default: X' for every key whose value differs from that library's own default."""
    marks = {}
    unused = {"ppo", "data.train_on_prompt"} - ({"ppo"} if cfg.stage == "ppo" else {"data.train_on_prompt"} if
                                                cfg.stage == "sft" else set())  # keys this stage does not read

    def walk(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if prefix + f.name in unused:
                continue
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif "library" in f.metadata:
                if f.name == "warmup_ratio" and value is None:  # null: 3%, unless warmup_steps decides
                    value = 0.03 if obj.warmup_steps is None else f.metadata["library"][1]
                if value != f.metadata["library"][1]:
                    marks[prefix + f.name] = _library_default(f.metadata["library"])

    walk(cfg, "")
    return marks


def config_yaml(cfg: Config) -> str:
    """The resolved recipe as YAML (`ftdist train --print-config`): every value that differs from the default of
    the Hugging Face library a user would compare with carries a comment naming that default, and what the
    loader decided (cfg.notes) heads it as comments."""
    marks = _library_marks(cfg)
    lines, path = [], []  # path: (indent, key) of the mappings the line is inside
    for line in yaml.safe_dump(cfg.to_dict(), sort_keys=False).splitlines():
        body = line.lstrip(" ")
        indent = len(line) - len(body)
        key, sep, _ = body.partition(":")
        if sep and not body.startswith(("-", "'", '"')) and " " not in key:
            path = [p for p in path if p[0] < indent] + [(indent, key)]
            dotted = ".".join(k for _, k in path)
            if dotted in marks:
                line += f"  # {marks[dotted]}"
        lines.append(line)
    head = [f"# {note}" for note in cfg.notes]
    if marks:
        head.append("# values marked '<library> default: X' differ from that library's default; ftdist's are kept")
    return "\n".join(head + lines) + "\n"


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
