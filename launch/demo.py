"""The demo: fine-tune the embedded tiny Llama on the bundled digit-sorting task with 2 gloo ranks
under ZeRO-2 on CPU, and print eval loss and exact-match accuracy before and after.

    make demo                      # = .venv/bin/python launch/demo.py
    python launch/demo.py --out runs/demo --nproc 2 [key=value ...]
    python launch/demo.py --stages sft,rm,dpo   # then a reward model and DPO on the SFT model
    python launch/demo.py --method qlora        # the SFT stage as QLoRA (4-bit base + LoRA), or --method lora
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_stage(nproc: int, recipe: str, out_dir: Path, overrides: list[str]) -> list[dict]:
    shutil.rmtree(out_dir, ignore_errors=True)  # the demo's own run directory: each demo starts afresh
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + os.getpid() % 1000), "-m", "ftdist", "train", recipe, f"output_dir={out_dir}", *overrides]
    print("+", " ".join(cmd[2:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    if rc != 0:
        raise SystemExit(f"demo: {recipe} failed with exit code {rc}")
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# --method -> (recipe, overrides, what the table calls it); LoRA is the QLoRA recipe on a full-precision base
METHODS = {
    "full": ("sft_tiny", [], "SFT"),
    "lora": ("qlora_tiny", ["model.quantization=null"], "LoRA SFT"),
    "qlora": ("qlora_tiny", [], "QLoRA SFT (4-bit NF4 base)"),
}


def before_after(records: list[dict]) -> tuple[dict, dict]:
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    return evals[0], evals[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="directory for the runs (default runs/demo)")
    p.add_argument("--nproc", type=int, default=2, help="gloo ranks (default 2)")
    p.add_argument("--stages", default="sft",
                   help="comma-separated pipeline, e.g. sft,rm,dpo (default sft); see launch/demo_pipeline.py")
    p.add_argument("--method", choices=tuple(METHODS), default="full",
                   help="SFT as full fine-tuning (sft_tiny), LoRA, or QLoRA (qlora_tiny) (default full)")
    p.add_argument("overrides", nargs="*", help="recipe overrides for the SFT stage, e.g. train.epochs=2")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if args.stages != "sft" and args.method != "full":
        p.error("--method picks the recipe of the SFT-only demo; the --stages pipeline uses its own recipes")
    if args.stages != "sft":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from demo_pipeline import run_pipeline

        run_pipeline(run_stage, args.stages.split(","), args.nproc, out, args.overrides,
                     sft_report=lambda records: print_before_after("SFT", args.nproc, records, out))
        return 0
    recipe, method_overrides, label = METHODS[args.method]
    records = run_stage(args.nproc, recipe, out / "sft", ["checkpoint.resume=never", *method_overrides, *args.overrides])
    print_before_after(label, args.nproc, records, out)
    return 0


def print_before_after(label: str, nproc: int, records: list[dict], out: Path) -> None:
    """The SFT stage's table: eval loss and exact-match accuracy before training and after."""
    before, after = before_after(records)
    print(f"\n{label} of the tiny Llama on digit sorting ({nproc} gloo ranks, ZeRO-2, CPU)")
    print(f"{'':14s}{'eval loss':>12s}{'accuracy':>12s}")
    for name, r in (("before", before), ("after", after)):
        print(f"{name:14s}{r['eval/loss']:12.4f}{r.get('eval/accuracy', float('nan')):12.1%}")
    print(f"\nmodel: {out / 'sft' / 'final'}\nmetrics: {out / 'sft' / 'metrics.jsonl'}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
