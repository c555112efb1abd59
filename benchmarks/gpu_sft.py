"""Model FLOPs utilisation (MFU) of ftdist SFT on a ~1B Llama in bf16 with packing,
with and without gradient checkpointing.

    python benchmarks/gpu_sft.py                       # on a GPU: TinyLlama-1.1B shape, 4 x 2048-token rows
    python benchmarks/gpu_sft.py --tiny                # anywhere: a tiny model on CPU, checks the script runs
    python benchmarks/gpu_sft.py --compare packing     # packed against padded rows of the same data
    python benchmarks/gpu_sft.py --tiny --in-process --compare both   # the CI smoke test: every setting, one process

Each setting is one real `python -m ftdist train recipe.yaml` process (one rank, ZeRO-0, bf16,
data.packing=true, attention 'auto': flash-attention varlen when installed, else per-sample sdpa)
on a randomly initialised model and generated chat data (benchmarks/sft_throughput.py makes
both); with --in-process the same recipe runs through ftdist's CLI in this process instead (a quicker start,
for a smoke test: the settings then share one process's imports and memory). Tokens/s comes from the run's
metrics.jsonl over the steps after `--warmup`.

MFU = model FLOPs per second / the GPU's peak dense bf16 FLOPs. Model FLOPs per trained token
(PaLM, Chowdhery et al. 2022, appendix B): 6 N + 12 L d S, with N the parameters that multiply
(all but the input embedding), L layers, d = heads x head_dim, and S = sum(l_i^2) / sum(l_i) over
the packed samples (attention within each sample only). Gradient checkpointing's recomputation is
not counted: that would be hardware FLOPs utilisation, not MFU.

Without a GPU the numbers are CPU numbers of a tiny model: they only show that the script and the
training path work; the MFU column then reads "n/a".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sft_throughput import prepare_workdir, write_lengths  # noqa: E402

# peak dense bf16 tensor-core FLOPs (vendor data sheets; sparsity excluded)
PEAK_BF16 = {"H100 SXM": 989.4e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12,
             "GH200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
SETTINGS = {
    # TinyLlama-1.1B shape (ftdist.plan's "1b" preset)
    "gpu": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, samples=4000,
                max_length=2048, min_length=64, median_length=400, sigma=0.9, micro=4, accum=2, steps=30, warmup=10,
                save_dtype="bfloat16"),
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512, samples=120, max_length=128,
                 min_length=16, median_length=40, sigma=0.7, micro=2, accum=2, steps=3, warmup=1,
                 tokenizer_sentences=2000),
}


def peak_flops(name: str) -> float | None:
    """Peak bf16 FLOPs of the GPU named `name` (torch.cuda.get_device_name), None when unknown."""
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        words = key.split()
        if all(w.lower() in name.lower() for w in words):
            return PEAK_BF16[key]
    return None


def model_flops_per_token(config: dict, lengths: list[int]) -> tuple[float, float]:
    """(6N + 12 L d S, 6N) per trained token for a Llama config.json and the packed sample lengths."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or h // heads
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * config["intermediate_size"] + 2 * h
    n = layers * per_layer + h + (0 if config.get("tie_word_embeddings") else vocab * h)
    s = sum(x * x for x in lengths) / sum(lengths)
    return 6 * n + 12 * layers * heads * hd * s, 6 * n


def subprocess_env() -> dict:
    """The environment of an `ftdist train` child: this checkout first on PYTHONPATH (what is already there, e.g.
    wheels installed with --target, after it), offline, and no launcher variables of a parent run."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_setting(work: Path, s: dict, a, checkpointing: bool, packing: bool = True) -> dict:
    name = f"ckpt-{'on' if checkpointing else 'off'}" + ("" if packing else "-padded")
    out = work / "runs" / name
    recipe = {
        "stage": "sft", "output_dir": str(out), "seed": 0,
        "model": {"name_or_path": str(work / "model"), "dtype": a.dtype, "attn_implementation": "auto",
                  "gradient_checkpointing": checkpointing},
        "data": {"train": str(work / "data.jsonl"), "max_length": s["max_length"], "packing": packing,
                 "cache_dir": str(work / "cache")},
        "train": {"micro_batch_size": s["micro"], "global_batch_size": s["micro"] * s["accum"],
                  "max_steps": s["steps"], "lr": 1e-5, "scheduler": "constant", "warmup_ratio": 0.0,
                  "log_every": 1, "progress_bar": False,
                  # padded rows as cut from each step (not split further by length): the classic padded layout
                  "group_by_length": False},
        "deepspeed": {"zero_stage": a.zero_stage},
        "checkpoint": {"every_steps": 0, "keep_last": 1, "resume": "never"},
        "logging": {"tensorboard": False},
    }
    path = work / f"recipe-{name}.yaml"
    text = f"# ftdist train {path}\n" + yaml.safe_dump(recipe, sort_keys=False)
    done = out / "metrics.jsonl"
    if not (path.exists() and path.read_text() == text and (out / "final").exists() and done.exists()):
        # not already run with this recipe in this work directory (gpu_check.sh runs ckpt-off twice)
        shutil.rmtree(out, ignore_errors=True)
        path.write_text(text)
        if a.in_process:
            from ftdist.cli import main as ftdist_main

            code = ftdist_main(["train", str(path)])
            if code != 0:
                raise SystemExit(f"ftdist train {path} failed ({code})")
        else:
            proc = subprocess.run([sys.executable, "-m", "ftdist", "train", str(path)], env=subprocess_env(),
                                  cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"ftdist train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-6000:]}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens" in r and "elapsed_s" in r]
    w0, w1 = steps[s["warmup"] - 1], steps[-1]
    tokens_per_s = (w1["tokens"] - w0["tokens"]) / max(w1["elapsed_s"] - w0["elapsed_s"], 1e-9)
    peaks = [r["peak_memory_gb"] for r in steps if "peak_memory_gb" in r]
    return {"gradient_checkpointing": checkpointing, "packing": packing, "tokens_per_s": tokens_per_s,
            "peak_memory_gb": max(peaks) if peaks else None,
            "padding_fraction": statistics.mean(r["padding_fraction"] for r in steps[s["warmup"]:]),
            "timed_steps": len(steps) - s["warmup"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny model on whatever device there is: a smoke test")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per setting (default 30, tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="first steps not timed (default 10, tiny 1)")
    p.add_argument("--micro-batch", type=int, default=None, help="packed rows per forward (default 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per packed row, data.max_length (default 2048)")
    p.add_argument("--zero-stage", type=int, default=0, help="ZeRO stage of the single rank (default 0)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="training precision (default bf16)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak bf16 TFLOPs, if not in the table")
    p.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--compare", choices=("ckpt", "packing", "both"), default="ckpt",
                   help="ckpt: packed rows with gradient checkpointing off and on (default); packing: packed "
                        "against padded rows of the same data (train.group_by_length=false), checkpointing off; "
                        "both: the three settings of the two (packed off, packed on, padded off)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--in-process", action="store_true",
                   help="run each setting's `ftdist train` in this process, not in its own (a quicker smoke test; "
                        "the settings then share imports and memory)")
    a = p.parse_args(argv)
    if a.in_process:  # the environment subprocess_env gives a child, before anything imports the HF libraries
        env = subprocess_env()
        os.environ.clear()
        os.environ.update(env)

    import torch

    cuda = torch.cuda.is_available()
    name = "tiny" if a.tiny or not cuda else "gpu"
    s = dict(SETTINGS[name])
    for key, value in (("steps", a.steps), ("warmup", a.warmup), ("micro", a.micro_batch),
                       ("max_length", a.seq_len)):
        if value:
            s[key] = value
    if not 1 <= s["warmup"] < s["steps"]:
        p.error("--warmup must be at least 1 and below --steps")
    device = torch.cuda.get_device_name(0) if cuda else "CPU (no GPU: smoke test of a tiny model, MFU n/a)"
    peak = a.peak_tflops * 1e12 if a.peak_tflops else (peak_flops(device) if cuda else None)
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="gpu-sft-")
    work = Path(a.work or tmp.name) / name
    meta = prepare_workdir(work, s)
    write_lengths(work, s)
    lengths = json.loads((work / "lengths.json").read_text())
    config = json.loads((work / "model" / "config.json").read_text())
    flops_token, flops_token_6n = model_flops_per_token(config, lengths)
    print(f"device: {device}; model: Llama {meta['n_params'] / 1e6:,.1f}M parameters, {a.dtype}, packing into rows "
          f"of {s['max_length']} tokens, micro-batch {s['micro']} x accumulation {s['accum']}, ZeRO-{a.zero_stage}; "
          f"{s['steps']} steps, first {s['warmup']} not timed; {flops_token / 1e6:,.1f} MFLOPs per token "
          f"(6N alone: {flops_token_6n / 1e6:,.1f})", flush=True)
    rows = []
    settings = {"ckpt": [(False, True), (True, True)], "packing": [(False, True), (False, False)],
                "both": [(False, True), (True, True), (False, False)]}[a.compare]
    for ckpt, packing in settings:
        r = run_setting(work, s, a, ckpt, packing)
        r["mfu"] = r["tokens_per_s"] * flops_token / peak if peak else None
        rows.append(r)
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"gradient checkpointing {'on' if ckpt else 'off'}, {'packed' if packing else 'padded'} rows: "
              f"{r['tokens_per_s']:.0f} tokens/s, MFU {mfu}", flush=True)
    print()
    print("| gradient checkpointing | rows | tokens/s | MFU | padding | peak memory |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mem = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f} GB"
        print(f"| {'on' if r['gradient_checkpointing'] else 'off'} | {'packed' if r['packing'] else 'padded'} | "
              f"{r['tokens_per_s']:.0f} | {mfu} | {r['padding_fraction']:.1%} | {mem} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": device, "meta": meta, "settings": s, "results": rows,
                                            "flops_per_token": flops_token}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
