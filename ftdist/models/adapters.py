"""LoRA adapters through peft: wrapping a loaded model, and switching the adapter off.

The reference model of LoRA/QLoRA DPO and PPO is the policy with its adapter
disabled (DESIGN.md), so `adapter_disabled` is the one way the Tasks get it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

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
    # the recipe's name (a hub id, ftdist/tiny), not this machine's cache path, so the adapter names its base
    # portably; a local path made absolute, so the adapter loads from any working directory
    name = model_cfg.name_or_path
    local = os.path.expanduser(name)
    for pc in peft_model.peft_config.values():
        pc.base_model_name_or_path = os.path.abspath(local) if os.path.exists(local) else name
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


def adapter_base(adapter_dir: Path, given: Optional[str] = None) -> str:
    """The base model of the PEFT adapter in `adapter_dir`: `given` (--base), else the one its adapter_config.json
    names. A relative local path (adapters saved before bases were recorded absolute) is tried from the working
    directory, then from the directory the run was started in (its config.yaml's output_dir says where that
    was), then from the adapter's own directory; a local base found nowhere is a ModelError naming the paths
    tried. A hub id or ftdist/tiny is returned as it is."""
    from ftdist.models.loading import ModelError, _in_hub_cache

    if given:
        return given
    try:
        named = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ModelError(f"{adapter_dir}/adapter_config.json: cannot be read ({e})") from None
    if not named:
        raise ModelError(f"{adapter_dir}: the adapter does not name its base model: pass --base")
    if named in ("ftdist/tiny", "tiny"):
        return named
    path = Path(os.path.expanduser(named))
    if path.is_absolute():
        if not path.exists():
            raise ModelError(f"{adapter_dir}: the adapter's base {named} does not exist: pass --base")
        return named
    tried = [Path.cwd() / path] + [d / path for d in (run_start_dir(Path(adapter_dir)), Path(adapter_dir).absolute())
                                   if d is not None]
    for candidate in tried:
        if candidate.exists():
            return str(candidate)
    # a hub id is ORG/NAME (a local path whose first part exists was meant as one, as models/loading.py reads it)
    hub_id = named.count("/") == 1 and not named.startswith((".", "~")) and not os.path.isdir(named.split("/")[0])
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if hub_id and not (offline and not _in_hub_cache(named)):
        return named
    raise ModelError(f"{adapter_dir}: the adapter's base {named!r} is not found (tried "
                     f"{', '.join(str(t) for t in dict.fromkeys(tried))}"
                     f"{'; as a hub id it is not in the cache, and HF_HUB_OFFLINE=1' if hub_id else ''}): pass --base")


def run_start_dir(path: Path) -> Optional[Path]:
    """The working directory a run was started in, for `path` inside the run (its output_dir, final/, or
    checkpoints/step-N/adapter): the run directory's absolute path less its relative output_dir (config.yaml)."""
    import yaml

    path = Path(path).absolute()
    for run_dir in [path, *path.parents][:4]:
        try:
            out = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("output_dir")
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            continue
        if not isinstance(out, str) or Path(out).is_absolute():
            continue
        parts = Path(os.path.normpath(out)).parts
        if run_dir.parts[-len(parts):] == parts:
            return Path(*run_dir.parts[:-len(parts)])
    return None
