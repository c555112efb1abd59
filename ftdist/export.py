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
    """checkpoints/step-N of run_dir, complete and undamaged (its manifest checked, sha256 included), or an
    ExportError that says what is wrong with that step (checkpoint_problem) and which other steps are complete."""
    from ftdist.engine.checkpoint import checkpoint_problem, is_complete, list_checkpoints

    root = run_dir / "checkpoints"
    steps = list_checkpoints(root)
    complete = [n for n, p in steps if is_complete(p)]  # the quick check (sizes): a damaged one is named below

    def others(n=None) -> str:
        return ", ".join(str(k) for k in complete if k != n) or "none"

    if step == "latest":
        if not complete:
            raise ExportError(f"{root}: no complete checkpoint")
        n = complete[-1]
    else:
        try:
            n = int(step)
        except ValueError:
            raise ExportError(f"--step {step!r}: a step number or 'latest'") from None
        if n not in dict(steps):
            raise ExportError(f"--step {n}: {root} has no checkpoint of that step (complete: {others()})")
    path = dict(steps)[n]
    problem = checkpoint_problem(path)
    if problem:
        raise ExportError(f"{path}: {problem}; export another step (complete: {others(n)})")
    return path


def export(run_dir: str, step: str, out: str, overwrite: bool = False) -> Path:
    from ftdist.config import ConfigError, load_config
    from ftdist.run.outputs import check_writable, writing

    run, out_dir = Path(run_dir), Path(out)
    if not (run / "config.yaml").exists():
        raise ExportError(f"{run}: no config.yaml (not an ftdist run's output_dir)")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"--out {out_dir}: not empty (use --overwrite)")
    check_writable(out, "--out", directory=True)
    try:
        cfg = _paths_of_run(load_config(str(run / "config.yaml")), run)
    except ConfigError as e:
        raise ExportError(f"{run / 'config.yaml'}: {e}") from None
    ckpt = find_checkpoint(run, step)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    copied = cfg.model.lora is not None and cfg.stage != "ppo"  # a LoRA checkpoint's adapter/, as it is
    if copied and not (ckpt / "adapter").is_dir():
        raise ExportError(f"{ckpt}: a LoRA run's checkpoint without its adapter/ directory")
    model, tokenizer = (None, None) if copied else _rebuilt(cfg, run, ckpt)
    # a full disk while writing: the checkpoint is untouched, --out as it was
    with writing(out_dir, "the exported model", partial=tmp, kept=f"{ckpt} is unchanged"):
        if copied:
            shutil.copytree(ckpt / "adapter", tmp)
            _record_base(ckpt / "adapter", tmp)
        else:
            # a LoRA model is saved as its adapter alone (embeddings are never resized)
            extra = {"save_embedding_layers": False} if cfg.model.lora is not None else {}
            model.save_pretrained(str(tmp), safe_serialization=True, **extra)
            tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    return out_dir


def _paths_of_run(cfg, run: Path):
    """The recipe with its model named as the run read it: a relative path (as given on the run's command line)
    is taken from the directory the run was started in, wherever the export runs."""
    import dataclasses
    import os

    from ftdist.models.adapters import run_start_dir

    start = run_start_dir(run)

    def located(p):
        if p is None or start is None or os.path.isabs(p) or os.path.exists(p) or not (start / p).exists():
            return p
        return str(start / p)

    model = dataclasses.replace(cfg.model, name_or_path=located(cfg.model.name_or_path),
                                tokenizer=located(cfg.model.tokenizer))
    return dataclasses.replace(cfg, model=model)


def _rebuilt(cfg, run: Path, ckpt: Path):
    """(model, tokenizer): the checkpoint's model rebuilt from the run's recipe, its weights from the DeepSpeed
    state. A PPO checkpoint holds one engine state per trained actor group: the policy's
    (checkpoints/step-N/policy/engine) is the model, a LoRA policy's saved as its adapter (its state holds
    the adapter alone: the frozen base is loaded unquantised, which the adapter's weights do not depend on)."""
    import dataclasses

    from ftdist.engine.checkpoint import consolidated_weights
    from ftdist.engine.dist import DistInfo
    from ftdist.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    if cfg.stage == "ppo":
        from ftdist.models.adapters import apply_lora
        from ftdist.models.loading import load_causal_lm

        model_cfg = dataclasses.replace(cfg.model, quantization=None, gradient_checkpointing=False)
        model, engine_dir = apply_lora(load_causal_lm(model_cfg), model_cfg), ckpt / "policy" / "engine"
    else:
        from ftdist.train.task import make_task

        task = make_task(cfg, tokenizer, DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo"))
        model, engine_dir = task.build_model(), ckpt / "engine"
    state = consolidated_weights(engine_dir)
    dtype = next(model.parameters()).dtype
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    # tied weights (lm_head = embed_tokens) are saved once; a LoRA state leaves out the frozen base
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad} if cfg.model.lora is not None else set()
    missing = [k for k in missing if k not in _tied_names(model) and k not in frozen]
    if missing or unexpected:
        raise ExportError(f"{ckpt}: the checkpoint's weights do not fit the model of {run / 'config.yaml'} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, tokenizer


def _record_base(adapter: Path, copy: Path) -> None:
    """The copy names its base by the path training used, resolved against the run (an adapter saved with a
    relative base path would otherwise load only from the directory the run was started in)."""
    import json

    from ftdist.models.adapters import adapter_base
    from ftdist.models.loading import ModelError

    try:
        base = adapter_base(adapter)
    except ModelError:
        return  # left as it is: loading it says which paths were tried
    config = json.loads((copy / "adapter_config.json").read_text())
    if config.get("base_model_name_or_path") != base:
        config["base_model_name_or_path"] = base
        (copy / "adapter_config.json").write_text(json.dumps(config, indent=2))


def _tied_names(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    return set(keys if isinstance(keys, (list, tuple, set)) else keys.keys())


def run(args) -> int:
    from ftdist.run.logs import setup_logging

    setup_logging(True)
    out = export(args.run_dir, args.step, args.out, args.overwrite)
    print(f"exported to {out}")
    return 0
