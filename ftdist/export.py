"""`ftdist export`: any complete checkpoint of a run as a Hugging Face model, so the best step can be kept.

    ftdist export runs/sft --step 400 --out runs/sft-step400      # a full model (safetensors) + tokenizer
    ftdist export runs/lora --step 400 --out adapter-step400      # a LoRA run: its PEFT adapter + tokenizer

One process, no GPU and no process group needed, whatever the number of ranks and the ZeRO stage the run
trained with: ZeRO-1/2/3 shards are gathered into one fp32 state dict by DeepSpeed's own converter
(zero_to_fp32, reading weights only), a ZeRO-0 state is read as it is; the model is rebuilt from the run's
config.yaml (the same class as training: a causal LM, or a reward model with its score head) and saved in
model.dtype. A LoRA checkpoint already holds its adapter in PEFT format (checkpoints/step-N/adapter): it is
copied; `ftdist merge` folds it into its base.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from ftdist.errors import UserError

log = logging.getLogger("ftdist")


class ExportError(UserError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftdist export", description="Write a run's checkpoint as a Hugging Face model "
                                "(a LoRA run's as its PEFT adapter) with the tokenizer.")
    p.add_argument("run_dir", help="the run's output_dir (holding config.yaml and checkpoints/)")
    p.add_argument("--step", default="latest",
                   help="the checkpoint's step number, or 'latest' (default): the newest complete checkpoint")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="write into --out even when it is not empty")
    return p


def find_checkpoint(run_dir: Path, step: str) -> Path:
    """checkpoints/step-N of run_dir, complete and undamaged (its manifest checked), or an ExportError that says
    which steps there are."""
    from ftdist.engine.checkpoint import damaged_file, is_complete, list_checkpoints

    root = run_dir / "checkpoints"
    complete = [(n, p) for n, p in list_checkpoints(root) if is_complete(p)]
    have = ", ".join(str(n) for n, _ in complete) or "none"
    if step == "latest":
        if not complete:
            raise ExportError(f"{root}: no complete checkpoint")
        path = complete[-1][1]
    else:
        try:
            n = int(step)
        except ValueError:
            raise ExportError(f"--step {step!r}: a step number or 'latest'") from None
        path = dict(complete).get(n)
        if path is None:
            raise ExportError(f"--step {n}: {root} has no complete checkpoint of that step (complete: {have})")
    bad = damaged_file(path)
    if bad:
        raise ExportError(f"{path}: damaged ({bad}); export another step (complete: {have})")
    return path


def export(run_dir: str, step: str, out: str, overwrite: bool = False) -> Path:
    from ftdist.config import ConfigError, load_config
    from ftdist.engine.checkpoint import consolidated_weights
    from ftdist.engine.dist import DistInfo
    from ftdist.models.loading import load_tokenizer
    from ftdist.train.task import make_task

    run, out_dir = Path(run_dir), Path(out)
    if not (run / "config.yaml").exists():
        raise ExportError(f"{run}: no config.yaml (not an ftdist run's output_dir)")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"--out {out_dir}: not empty (use --overwrite)")
    try:
        cfg = load_config(str(run / "config.yaml"))
    except ConfigError as e:
        raise ExportError(f"{run / 'config.yaml'}: {e}") from None
    if cfg.stage == "ppo":
        raise ExportError(f"{run}: a PPO run; its policy is written to {run / 'final'} (checkpoints hold one "
                          f"engine state per actor group)")
    ckpt = find_checkpoint(run, step)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.model.lora is not None:
        if not (ckpt / "adapter").is_dir():
            raise ExportError(f"{ckpt}: a LoRA run's checkpoint without its adapter/ directory")
        shutil.copytree(ckpt / "adapter", tmp)
    else:
        tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
        task = make_task(cfg, tokenizer, DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo"))
        model = task.build_model()
        state = consolidated_weights(ckpt / "engine")
        dtype = next(model.parameters()).dtype
        missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
        # tied weights (lm_head = embed_tokens) are saved once
        missing = [k for k in missing if k not in _tied_names(model)]
        if missing or unexpected:
            raise ExportError(f"{ckpt}: the checkpoint's weights do not fit the model of {run / 'config.yaml'} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _tied_names(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    return set(keys if isinstance(keys, (list, tuple, set)) else keys.keys())


def run(args) -> int:
    from ftdist.run.logs import setup_logging

    from ftdist.config import ConfigError
    from ftdist.engine.engine import UnsafeCheckpointError
    from ftdist.models.loading import ModelError

    setup_logging(True)
    try:
        out = export(args.run_dir, args.step, args.out, args.overwrite)
    except (ExportError, ConfigError, ModelError, UnsafeCheckpointError) as e:
        print(f"ftdist export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0
