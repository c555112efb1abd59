"""`ftdist plan`: the memory table, the recommendation and the recipe it writes (the arithmetic is in
plan/estimate.py)."""

from __future__ import annotations

import argparse

from ftdist.config.schema import OFFLOAD_OPTIMIZERS
from ftdist.errors import UserError, print_error
from ftdist.plan.estimate import (DTYPE_BYTES, GB, LINEAR_TARGETS, METHODS, OPTIMIZER_ALIASES, OPTIMIZER_STATE_BYTES,
                                  PRESETS, Candidate, ModelShape, Recommendation, recommend)


def format_table(rec: Recommendation) -> str:
    """The candidates as a text table in GB, the recommended row marked with '*'."""
    cols = ("", "zero", "offload", "grad-ckpt", "weights", "grads", "master", "optimizer", "activations",
            "total", "cpu/node", "fits")
    rows = []
    for c in rec.candidates:
        e = c.estimate
        gb = [f"{x / GB:.1f}" for x in (e.weights, e.gradients, e.master_weights, e.optimizer_state,
                                        e.activations, e.total, e.cpu_bytes * rec.gpus_per_node)]
        rows.append(("*" if c is rec.choice else "", str(e.zero_stage), e.offload,
                     "on" if e.gradient_checkpointing else "off", *gb, "yes" if c.fits else "no"))
    widths = [max(len(r[k]) for r in [cols, *rows]) for k in range(len(cols))]

    def line(r):  # text columns left, numbers right
        return "  ".join(s.rjust(w) if k > 3 else s.ljust(w) for k, (s, w) in enumerate(zip(r, widths))).rstrip()

    head = (f"per-GPU memory in GB (1e9 bytes); budget {rec.budget / GB:.1f} GB = {rec.gpu_memory_gb:g} GB "
            f"minus headroom; cpu/node = host memory for offload on one node")
    return "\n".join([head, line(cols), *map(line, rows)])


def describe(c: Candidate) -> str:
    e = c.estimate
    return (f"ZeRO-{e.zero_stage}, offload {e.offload}, gradient checkpointing "
            f"{'on' if e.gradient_checkpointing else 'off'}: {e.total / GB:.1f} GB per GPU")


def emit_recipe(choice: Candidate, base_recipe_fields: dict, path: str = "recipe.yaml") -> str:
    """YAML recipe for the chosen setup. base_recipe_fields set or override keys by dotted
    name and must name the model: {"model.name_or_path": ..., "data.train": ..., ...}."""
    import yaml

    if "model.name_or_path" not in base_recipe_fields:
        raise ValueError("emit_recipe: base_recipe_fields needs 'model.name_or_path'")
    e = choice.estimate
    model = {"name_or_path": None, "dtype": e.dtype, "gradient_checkpointing": e.gradient_checkpointing}
    if e.method != "full":
        model["lora"] = {"r": e.lora_r, "alpha": float(2 * e.lora_r), "dropout": 0.05,
                         "target_modules": list(LINEAR_TARGETS)}
    if e.method == "qlora":
        model["quantization"] = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                                 "compute_dtype": e.dtype}
    recipe = {
        "stage": "sft",
        "output_dir": f"runs/sft_{e.method}",
        "model": model,
        "data": {"max_length": e.seq_len},
        "train": {"micro_batch_size": e.micro_batch, "global_batch_size": e.micro_batch * e.world_size,
                  "optimizer": e.optimizer},
        "deepspeed": {"zero_stage": e.zero_stage, "offload_optimizer": e.offload_optimizer,
                      "offload_params": e.offload_params},
    }
    for key, value in base_recipe_fields.items():
        node, *parents = recipe, *key.split(".")[:-1]
        for p in parents:
            node = node.setdefault(p, {})
        node[key.split(".")[-1]] = value
    header = f"# ftdist train {path}\n# written by `ftdist plan`: {describe(choice)} on {e.world_size} GPU(s)\n"
    if "train" not in recipe["data"]:
        header += "# set data.train (a JSONL/Parquet file or datasets directory), or pass data.train=PATH\n"
    return header + yaml.safe_dump(recipe, sort_keys=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftdist plan", description="Predict per-GPU memory for every ZeRO stage, "
                                "offload and gradient-checkpointing choice, and recommend the fastest that fits.")
    p.add_argument("--model", required=True, help="Hugging Face config directory, or a preset: " + ", ".join(PRESETS))
    p.add_argument("--method", choices=METHODS, default="full", help="full fine-tuning, LoRA, or QLoRA (4-bit base)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GB (default 80)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence, data.max_length (default 2048)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per step (default 1)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 16, or 64 for qlora)")
    p.add_argument("--optimizer", default="adamw_torch", choices=[*OPTIMIZER_STATE_BYTES, *OPTIMIZER_ALIASES],
                   help="optimizer whose state is counted (default adamw_torch; offload needs an Adam)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16", help="training precision (default bf16)")
    p.add_argument("--cpu-memory-gb", type=float, default=None,
                   help="host memory per node in GB; offloaded state must fit it (default: not checked)")
    p.add_argument("--headroom", type=float, default=0.15,
                   help="fraction of GPU memory kept free for CUDA context, NCCL and fragmentation (default 0.15)")
    p.add_argument("--emit-recipe", metavar="PATH", default=None,
                   help="write a recipe YAML for the recommended setup to PATH")
    return p


def run(args) -> int:
    """Print the table and recommendation; write the recipe when asked. 0 = something fits."""
    if args.emit_recipe:
        from ftdist.run.outputs import check_writable

        check_writable(args.emit_recipe, "--emit-recipe", directory=False)
    try:
        for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node),
                            ("--seq-len", args.seq_len), ("--micro-batch", args.micro_batch)):
            if value < 1:
                raise ValueError(f"{flag}: got {value}, allowed: >= 1")
        for flag, value in (("--gpu-memory-gb", args.gpu_memory_gb), ("--cpu-memory-gb", args.cpu_memory_gb)):
            if value is not None and value <= 0:
                raise ValueError(f"{flag}: got {value}, allowed: > 0")
        if not 0 <= args.headroom < 1:
            raise ValueError(f"--headroom: got {args.headroom}, allowed: 0 <= headroom < 1")
        shape = ModelShape.resolve(args.model)
        r = args.lora_r if args.lora_r is not None else (64 if args.method == "qlora" else 16)
        rec = recommend(shape, args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.seq_len, args.micro_batch,
                        args.method, args.headroom, args.cpu_memory_gb,
                        dtype=args.dtype, optimizer=args.optimizer, lora_r=r)
    except (ValueError, OSError) as err:
        raise UserError(str(err)) from None
    print(f"model {args.model}: {shape.n_params() / 1e9:.2f}B parameters, {args.method}, "
          f"{args.nodes} node(s) x {args.gpus_per_node} GPU(s), seq {args.seq_len} x micro-batch {args.micro_batch}")
    print(format_table(rec))
    if rec.choice is None:
        hint = "" if OPTIMIZER_ALIASES.get(args.optimizer, args.optimizer) in OFFLOAD_OPTIMIZERS else (
            f"; {args.optimizer} cannot be offloaded, adamw_torch can")
        print(f"nothing fits: add GPUs, shorten --seq-len, lower --micro-batch, or try --method lora/qlora{hint}")
        return 1
    print(f"recommended: {describe(rec.choice)}")
    if args.emit_recipe:
        name = PRESETS[args.model.lower()][1] if args.model.lower() in PRESETS else args.model
        text = emit_recipe(rec.choice, {"model.name_or_path": name}, path=args.emit_recipe)
        try:
            with open(args.emit_recipe, "w") as f:
                f.write(text)
        except OSError as err:
            raise UserError(f"--emit-recipe {args.emit_recipe}: cannot be written ({err.strerror})") from None
        print(f"wrote {args.emit_recipe}; launch with: ftdist train {args.emit_recipe}")
    return 0


def main(argv=None) -> int:
    """`ftdist plan` on its own (`ftdist plan` itself runs inside the command line's error boundary)."""
    try:
        return run(build_parser().parse_args(argv))
    except UserError as e:
        print_error(str(e))
        return e.exit_code
