"""`ftdist merge`: fold LoRA adapters into a 16/32-bit base and save a plain Hugging Face model.

    ftdist merge --base meta-llama/Llama-2-7b-hf --adapter runs/sft/final --adapter runs/dpo/final --out merged

Adapters are applied in the order given, each merged before the next is
loaded, as in the usual two-step recipe (an SFT adapter, then a DPO adapter
trained on top of it). The base is always loaded in 16 or 32 bits, also for
adapters trained with QLoRA: rounding a merged weight back to 4 bits would
throw away most of what the adapter learned.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ftdist.errors import UserError

log = logging.getLogger("ftdist")

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class MergeError(UserError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftdist merge", description="Merge LoRA adapters into a 16/32-bit base model "
                                "and save a full Hugging Face model with the tokenizer.")
    p.add_argument("--base", default=None,
                   help="base model directory, hub id, or 'ftdist/tiny' (default: the first adapter's base)")
    p.add_argument("--adapter", action="append", required=True, metavar="DIR",
                   help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors); repeat to "
                        "apply several in order, e.g. the SFT adapter then the DPO adapter")
    p.add_argument("--out", required=True, help="output directory for the merged model")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="dtype of the base while merging and of the saved model (default bf16)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the base directory")
    p.add_argument("--overwrite", action="store_true", help="write into --out even when it is not empty")
    return p


def _adapter_config(path: Path) -> dict:
    if not path.is_dir():
        raise MergeError(f"--adapter {path}: no such directory")
    cfg = path / "adapter_config.json"
    if not cfg.exists():
        raise MergeError(f"--adapter {path}: no adapter_config.json (not a PEFT adapter directory; "
                         f"training writes one to output_dir/final or checkpoints/step-N/adapter)")
    if not any((path / w).exists() for w in ADAPTER_WEIGHTS):
        raise MergeError(f"--adapter {path}: no {ADAPTER_WEIGHTS[0]}")
    try:
        data = json.loads(cfg.read_text())
    except ValueError as e:
        raise MergeError(f"--adapter {path}: adapter_config.json is not valid JSON: {e}") from None
    if data.get("peft_type") != "LORA":
        raise MergeError(f"--adapter {path}: peft_type={data.get('peft_type')!r}; only LoRA adapters can be merged")
    return data


def _check_fits(model, adapter_dir: Path, base: str) -> None:
    """LoRA shapes against the base's layers, so a wrong base fails here with names, not deep in peft."""
    from safetensors import safe_open

    weights = adapter_dir / ADAPTER_WEIGHTS[0]
    if not weights.exists():
        return
    modules = dict(model.named_modules())
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            owner = key.split(".lora_")[0].removeprefix("base_model.model.")
            layer = modules.get(owner)
            if layer is None:
                raise MergeError(f"--adapter {adapter_dir} does not fit --base {base}: the base has no layer "
                                 f"{owner!r} (adapter trained on another architecture?)")
            shape = tuple(f.get_slice(key).get_shape())
            expected_in = getattr(layer, "in_features", None)
            expected_out = getattr(layer, "out_features", None)
            got = shape[1] if ".lora_A." in key else shape[0]
            want = expected_in if ".lora_A." in key else expected_out
            if want is not None and got != want:
                side = "input" if ".lora_A." in key else "output"
                raise MergeError(f"--adapter {adapter_dir} does not fit --base {base}: {owner} has {side} size "
                                 f"{want}, the adapter's {key} expects {got} (adapter trained on another model?)")


def merge(base: str | None, adapters: list[str], out: str, dtype: str = "bf16", trust_remote_code: bool = False,
          overwrite: bool = False):
    """Returns the merged model (also saved to `out` with the tokenizer)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ftdist.models.adapters import adapter_base
    from ftdist.models.loading import check_model_source, load_failure
    from ftdist.run.outputs import check_writable, writing

    dirs = [Path(a) for a in adapters]
    configs = [_adapter_config(d) for d in dirs]
    path = check_model_source(adapter_base(dirs[0], base), "--base" if base else f"--adapter {dirs[0]}: its base")
    base = base or path
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise MergeError(f"--out {out}: directory is not empty (pass --overwrite to write into it)")
    check_writable(out, "--out", directory=True)
    for d, c in zip(dirs, configs):
        named = c.get("base_model_name_or_path")
        if named and base and named != base and Path(named).name != Path(base).name:
            log.warning("adapter %s was trained on %r; merging it into %r", d, named, base)

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if getattr(config, "quantization_config", None):
            raise MergeError(f"--base {base}: a quantised checkpoint; merging needs the 16/32-bit weights the "
                             f"adapter was trained on top of (QLoRA quantises at load time, so pass the original)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except MergeError:
        raise
    except Exception as e:  # a damaged or crafted weights file, a config transformers cannot read
        raise MergeError(f"--base {base}: cannot be loaded: {load_failure(path, e)}") from None
    for d in dirs:
        _check_fits(model, d, base)
        try:
            model = PeftModel.from_pretrained(model, str(d), is_trainable=False, torch_device="cpu")
        except (ValueError, RuntimeError, KeyError) as e:
            raise MergeError(f"--adapter {d} does not fit --base {base}: {e}") from None
        except Exception as e:  # a crafted adapter_model.bin (refused by the weights-only reader), ...
            raise MergeError(f"--adapter {d}: cannot be loaded: {load_failure(d, e)}") from None
        # merged before the next adapter loads: the next one was trained on top of this one
        model = model.merge_and_unload(safe_merge=True)
        log.info("merged %s", d)

    tok_src = next((d for d in reversed(dirs) if (d / "tokenizer_config.json").exists()), None)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_src) if tok_src else path, trust_remote_code=trust_remote_code)
    with writing(out_dir, "the merged model"):
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    return model


def run(args) -> int:
    from ftdist.run.logs import setup_logging

    setup_logging(True)
    merge(args.base, args.adapter, args.out, args.dtype, args.trust_remote_code, args.overwrite)
    print(f"merged {len(args.adapter)} adapter(s) into {args.base or 'the adapter base'}: {args.out}")
    return 0
