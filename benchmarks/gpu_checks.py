"""The GPU checks of benchmarks/gpu_check.sh that are not already a script of their own.

    python benchmarks/gpu_checks.py zero     [--tiny] [--json FILE]   ZeRO-2/3, one rank, against a plain loop (bf16)
    python benchmarks/gpu_checks.py zero --tiny --steps 3               the same over 3 steps (a CPU smoke test)
    python benchmarks/gpu_checks.py qlora    [--tiny] [--json FILE]   QLoRA peak memory against `ftdist plan`
    python benchmarks/gpu_checks.py generate [--tiny] [--json FILE]   the PPO policy's generate call: tokens/s
    python benchmarks/gpu_checks.py sft-record FILE {ckpt,packing}    the result line of a gpu_sft.py --json run

Each prints one result line starting with PASS, FAIL or INFO and writes one JSON record. Without a GPU
(or with --tiny) each runs a tiny version on the CPU: that only shows the check works, its numbers are
not GPU numbers. The models are random weights from a config (no download): TinyLlama-1.1B's shape on a
GPU, a tiny Llama otherwise (benchmarks/sft_throughput.py builds both, with generated chat data).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_sft  # noqa: E402
from sft_throughput import prepare_workdir, write_lengths  # noqa: E402

BF16_ROUNDING = 2.0 ** -8  # bf16 keeps 8 significant bits: rounding moves a value by at most 2^-8 of it


def _gb(x: float) -> str:
    return f"{x:.2f} GB" if x >= 0.1 else f"{x * 1e3:.1f} MB"


def _start_train(recipe: dict, path: Path, nproc: int = 0) -> subprocess.Popen:
    """Start `ftdist train` in its own process (nproc > 0: under torchrun with that many ranks), its output
    into a log file next to the recipe."""
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc else [sys.executable])
    with open(path.with_suffix(".log"), "w") as log:
        return subprocess.Popen([*launcher, "-m", "ftdist", "train", str(path)], env=gpu_sft.subprocess_env(),
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _metrics(proc: subprocess.Popen, recipe: dict, path: Path) -> list[dict]:
    """Wait for a run of _start_train; its metrics."""
    if proc.wait() != 0:
        raise SystemExit(f"ftdist train {path} failed ({proc.returncode}):\n"
                         f"{path.with_suffix('.log').read_text()[-6000:]}")
    out = Path(recipe["output_dir"]) / "metrics.jsonl"
    return [json.loads(line) for line in out.read_text().splitlines()]


def _train(recipe: dict, path: Path, nproc: int = 0) -> list[dict]:
    """`ftdist train` in its own process (nproc > 0: under torchrun with that many ranks); the metrics."""
    return _metrics(_start_train(recipe, path, nproc), recipe, path)


# -- ZeRO-2 and ZeRO-3 on one rank (NCCL on a GPU) against a plain PyTorch loop -------------------------
# SGD (momentum 0.9) at 0.05 lowers the tiny model's loss by ~47% in 6 steps, ~31% in 3 (6.27 -> 4.35); 3 is the
# fewest steps over which that drop clears 5x the allowed difference (2 steps: ~4%; see check_zero)
ZERO_STEPS, ZERO_LR = 6, 0.05


def _zero_recipe(out: Path, zero: int, steps: int = ZERO_STEPS) -> dict:
    return {"stage": "sft", "output_dir": str(out), "seed": 42,
            "model": {"name_or_path": "ftdist/tiny", "dtype": "bf16"},
            "data": {"train": "ftdist/tiny-task", "max_length": 64, "cache_dir": str(out.parent / "cache")},
            "train": {"micro_batch_size": 16, "global_batch_size": 16, "max_steps": steps, "lr": ZERO_LR,
                      "optimizer": "sgd", "scheduler": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0,
                      "max_grad_norm": 0.0, "log_every": 1, "progress_bar": False},
            "deepspeed": {"zero_stage": zero},
            "checkpoint": {"every_steps": 0, "keep_last": 1, "resume": "never"},
            "logging": {"tensorboard": False}}


def plain_loop_losses(recipe: dict, device) -> list[float]:
    """The same steps as `recipe` in plain PyTorch: bf16 weights for forward and backward, fp32 master weights
    for SGD (what DeepSpeed's bf16 mode does), the batches of ftdist's own epoch plan."""
    import torch

    from ftdist.algos.sft import sft_loss_sum
    from ftdist.config import load_config
    from ftdist.data.batching import TokenData, collate_rows, plan_epoch
    from ftdist.data.tokenize import tokenize_sft
    from ftdist.models.forward import causal_logits
    from ftdist.models.loading import load_causal_lm, load_tokenizer

    cfg = load_config(data=recipe)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    ds, _ = tokenize_sft(cfg.data.train, tok, cfg.data, cfg.data.cache_dir)
    data = TokenData(ds)
    model = load_causal_lm(cfg.model).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().clone().requires_grad_(True) for p in params]
    opt = torch.optim.SGD(master, lr=cfg.train.lr, momentum=0.9)
    plan = plan_epoch(data.lengths, seed=cfg.seed, epoch=0, micro_batch_size=cfg.train.micro_batch_size,
                      grad_accum=1, world_size=1, rank=0, packing=False, capacity=cfg.data.max_length)
    losses = []
    for step in range(cfg.train.max_steps):
        batch = collate_rows(plan.steps[step][0], data, tok.pad_token_id, cfg.data.max_length, False).to(device)
        loss_sum, n = sft_loss_sum(causal_logits(model, batch, "sdpa", torch.bfloat16), batch.labels)
        loss = loss_sum / n
        loss.backward()
        losses.append(float(loss.detach()))
        for p, m in zip(params, master):
            m.grad = p.grad.float()
            p.grad = None
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for p, m in zip(params, master):
                p.copy_(m)
    return losses


def check_zero(work: Path, tiny: bool, steps: int = ZERO_STEPS) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not tiny
    # the three runs side by side (nothing here is timed; each is deterministic on its own): the ZeRO-2 and
    # ZeRO-3 runs in their own processes while this one runs the plain loop. The tokenised data they share is
    # cached atomically (whichever finishes first writes it, the others' identical copies are dropped).
    started = {}
    for zero in (2, 3):
        recipe = _zero_recipe(work / f"zero{zero}", zero, steps)
        started[f"zero{zero}"] = (_start_train(recipe, work / f"zero{zero}.yaml", nproc=1), recipe,
                                  work / f"zero{zero}.yaml")
    try:
        plain = plain_loop_losses(_zero_recipe(work / "plain", 2, steps), "cuda" if cuda else "cpu")
        runs = {name: [r["loss"] for r in _metrics(*run) if "loss" in r] for name, run in started.items()}
    finally:  # none left running after a failure
        for proc, _, _ in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # Each run computes the same bf16 forward from the same weights; they differ only where a bf16 rounding
    # lands differently (the gradient reduction, the master-to-bf16 copy): a few roundings of 2^-8 each.
    # Allowed: 4 of them, relative to the loss. A wrong update (a lost or doubled gradient, a wrong lr) moves
    # the loss by a share of its drop over the run, which must be far larger (checked below).
    worst = 0.0
    for name, losses in runs.items():
        worst = max(worst, max(abs(a - b) / b for a, b in zip(losses, plain)))
    drop = (plain[0] - plain[-1]) / plain[0]
    ok = all(len(v) == steps for v in runs.values()) and worst <= 4 * BF16_ROUNDING < drop / 5
    backend = "nccl" if cuda else "gloo"
    line = (f"{'PASS' if ok else 'FAIL'} zero: ZeRO-2 and ZeRO-3, 1 rank ({backend}, bf16) against a plain loop over "
            f"{steps} steps: largest loss difference {worst:.3%} (allowed {4 * BF16_ROUNDING:.2%}); "
            f"loss {plain[0]:.3f} -> {plain[-1]:.3f}")
    return {"check": "zero", "ok": ok, "line": line, "backend": backend, "losses": {**runs, "plain": plain},
            "largest_relative_difference": worst, "allowed": 4 * BF16_ROUNDING, "steps": steps}


# -- QLoRA: peak memory against ftdist plan ------------------------------------------------------------
def _model(work: Path, tiny: bool) -> tuple[Path, dict]:
    """The shared random-weight model and chat data of gpu_sft.py (built once per work directory)."""
    s = dict(gpu_sft.SETTINGS["tiny" if tiny else "gpu"])
    d = work / ("tiny" if tiny else "gpu")
    prepare_workdir(d, s)
    write_lengths(d, s)
    return d, s


def check_qlora(work: Path, tiny: bool) -> dict:
    import torch

    from ftdist.plan import ModelShape, estimate

    cuda = torch.cuda.is_available() and not tiny
    d, s = _model(work, tiny or not cuda)
    seq, micro, r = s["max_length"], 1, 64
    recipe = {"stage": "sft", "output_dir": str(d / "runs" / "qlora"), "seed": 0,
              "model": {"name_or_path": str(d / "model"), "dtype": "bf16", "gradient_checkpointing": True,
                        "attn_implementation": "auto",
                        "lora": {"r": r, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
                        "quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                                         "compute_dtype": "bf16"}},
              "data": {"train": str(d / "data.jsonl"), "max_length": seq, "packing": True,
                       "cache_dir": str(d / "cache")},
              "train": {"micro_batch_size": micro, "global_batch_size": micro * 2, "max_steps": 8 if cuda else 2,
                        "optimizer": "paged_adamw_32bit", "lr": 2e-4, "log_every": 1, "progress_bar": False},
              "deepspeed": {"zero_stage": 0},
              "checkpoint": {"every_steps": 0, "keep_last": 1, "resume": "never"},
              "logging": {"tensorboard": False}}
    t0 = time.time()
    metrics = [m for m in _train(recipe, d / "qlora.yaml") if "loss" in m]
    wall = time.time() - t0
    est = estimate(ModelShape.from_hf_config_dir(str(d / "model")), method="qlora", seq_len=seq, micro_batch=micro,
                   gradient_checkpointing=True, dtype="bf16", optimizer="paged_adamw_32bit", lora_r=r,
                   lora_dropout=0.05)
    predicted = est.total / 1e9
    tokens_per_s = ((metrics[-1]["tokens"] - metrics[0]["tokens"])
                    / max(metrics[-1]["elapsed_s"] - metrics[0]["elapsed_s"], 1e-9)) if len(metrics) > 1 else None
    measured = max((m.get("peak_memory_gb") or 0.0) for m in metrics) or None
    if measured is None:
        line = (f"INFO qlora: {len(metrics)} steps on the CPU in {wall:.0f}s; ftdist plan predicts {_gb(predicted)} "
                f"for this shape on a GPU (no GPU here: nothing to compare)")
        ok = True
    else:
        ratio = measured / predicted
        ok = abs(ratio - 1) <= 0.15
        line = (f"{'PASS' if ok else 'FAIL'} qlora: peak {_gb(measured)} measured, {_gb(predicted)} predicted by "
                f"ftdist plan ({ratio - 1:+.1%}, allowed 15%); {tokens_per_s:.0f} tokens/s")
    return {"check": "qlora", "ok": ok, "line": line, "measured_gb": measured, "predicted_gb": predicted,
            "tokens_per_s": tokens_per_s, "seq_len": seq, "micro_batch": micro, "lora_r": r, "steps": len(metrics)}


# -- generation throughput of the PPO policy's generate call -----------------------------------------------
def check_generate(work: Path, tiny: bool) -> dict:
    import torch

    from ftdist.config import load_config
    from ftdist.models.generate import generate
    from ftdist.models.loading import load_causal_lm, load_tokenizer

    cuda = torch.cuda.is_available() and not tiny
    d, s = _model(work, tiny or not cuda)
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(data={"stage": "sft", "model": {"name_or_path": str(d / "model"), "dtype": "bf16"},
                            "data": {"train": str(d / "data.jsonl")}})
    tok = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model).to(device)
    model.generation_config.eos_token_id = None  # random weights: every sample runs to max_new_tokens
    rows = [json.loads(line) for line in (d / "data.jsonl").read_text().splitlines()]
    batch, new = (64, 256) if cuda else (4, 8)
    prompts = [tok.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True)
               for r in rows[:batch]]
    kw = dict(max_new_tokens=new, device=device, max_prompt_tokens=256, do_sample=True, temperature=1.0, top_p=1.0)
    generate(model, tok, prompts[:2], **{**kw, "max_new_tokens": 4})  # warm-up (kernels, allocator)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.time()
    enc, out = generate(model, tok, prompts, **kw)
    if cuda:
        torch.cuda.synchronize()
    dt = time.time() - t0
    generated = int((out != tok.pad_token_id).sum())
    line = (f"INFO generate: {len(prompts)} prompts x {new} new tokens (sampled, bf16, KV cache): "
            f"{generated / dt:.0f} generated tokens/s ({dt:.1f}s; prompts up to {enc['input_ids'].shape[1]} tokens)")
    return {"check": "generate", "ok": generated > 0, "line": line, "tokens_per_s": generated / dt,
            "prompts": len(prompts), "max_new_tokens": new, "seconds": dt, "device": str(device)}


MFU_TARGET = 0.45  # TinyLlama-1.1B class, 2048-token packed rows, bf16


def sft_record(path: Path, compare: str) -> dict:
    """The result line and record of a `gpu_sft.py --json` run."""
    res = json.loads(Path(path).read_text())
    rows = res["results"]

    def cell(r):
        mfu = "MFU n/a" if r["mfu"] is None else f"MFU {r['mfu']:.1%}"
        mem = "" if r["peak_memory_gb"] is None else f", peak {r['peak_memory_gb']:.1f} GB"
        return f"{r['tokens_per_s']:.0f} tokens/s, {mfu}{mem}"

    if compare == "ckpt":
        mfus = [r["mfu"] for r in rows if r["mfu"] is not None]
        best = max(mfus) if mfus else None
        ok = best is None or best >= MFU_TARGET
        verdict = "INFO" if best is None else ("PASS" if ok else "FAIL")
        line = (f"{verdict} sft_mfu: {res['device']}: gradient checkpointing off: {cell(rows[0])}; on: "
                f"{cell(rows[1])} (target MFU >= {MFU_TARGET:.0%})")
    else:
        speedup = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
        gpu = not res["device"].startswith("CPU")  # the tiny CPU version only shows that both settings run
        ok = speedup > 1 or not gpu
        verdict = "INFO" if not gpu else ("PASS" if ok else "FAIL")
        line = (f"{verdict} packing: packed {cell(rows[0])}, padding {rows[0]['padding_fraction']:.1%}; padded "
                f"{cell(rows[1])}, padding {rows[1]['padding_fraction']:.1%}; packed/padded {speedup:.2f}x")
    return {"check": "sft_mfu" if compare == "ckpt" else "packing", "ok": ok, "line": line, **res}


CHECKS = {"zero": check_zero, "qlora": check_qlora, "generate": check_generate}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=sorted([*CHECKS, "sft-record"]),
                   help="which check; sft-record FILE {ckpt,packing}: the line of a gpu_sft.py --json result")
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help="the tiny CPU version, even on a GPU")
    p.add_argument("--work", default=None, help="work directory (default: a temporary one); models are reused")
    p.add_argument("--json", default=None, help="append the result record to this JSON Lines file")
    p.add_argument("--steps", type=int, default=ZERO_STEPS,
                   help=f"zero: optimizer steps of each run (default {ZERO_STEPS}); at least 3, the fewest over which "
                        "the tiny model's loss drops by more than 5x the allowed difference")
    a = p.parse_args(argv)
    if a.steps < 3:
        p.error("--steps: at least 3 (over fewer the loss drops too little to tell a wrong update)")
    if a.check == "sft-record":
        if len(a.args) != 2 or a.args[1] not in ("ckpt", "packing"):
            p.error("sft-record needs FILE and ckpt or packing")
        rec = sft_record(Path(a.args[0]), a.args[1])
        print(rec["line"], flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return 0 if rec["ok"] else 1
    import tempfile

    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="gpu-checks-")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    if a.check == "zero":
        work = work / "zero"
        work.mkdir(exist_ok=True)
    rec = check_zero(work, a.tiny, a.steps) if a.check == "zero" else CHECKS[a.check](work, a.tiny)
    print(rec["line"], flush=True)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(rec) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0 if rec["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
