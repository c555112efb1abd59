"""Model memory of fp32, bf16, 8-bit and 4-bit (NF4) loads, and optionally a QLoRA training measurement.

    python benchmarks/model_memory.py                      # markdown table for the tiny and a ~100M Llama
    python benchmarks/model_memory.py --train-steps 20     # plus QLoRA tokens/s and peak memory (GPU when present)

Models come from configs with random weights (no hub): the embedded tiny Llama
and a ~100M Llama (hidden 768, 12 layers, vocab 8192). Each is saved once and
loaded through ftdist's own loader (`load_causal_lm`), so the 8/4-bit rows are
what bitsandbytes holds after quantising at load. "linear" is the weights of the
quantised projections (packed bytes plus quantisation constants); lm_head,
embeddings and norms stay in the load dtype (bf16 for the quantised rows) and
are in "model" only. Exits 1 when a 4-bit linear layer set is not
at most 0.35x its bf16 size.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from ftdist.config import load_config  # noqa: E402
from ftdist.models.loading import load_causal_lm, resolve_model_path  # noqa: E402

MAX_4BIT_RATIO = 0.35
LOADS = {
    "fp32": ["model.dtype=fp32", "model.quantization=null"],
    "bf16": ["model.dtype=bf16", "model.quantization=null"],
    "8-bit": ["model.dtype=bf16", "model.quantization.load_in_4bit=false", "model.quantization.load_in_8bit=true"],
    "4-bit nf4": ["model.dtype=bf16", "model.quantization.compute_dtype=bf16", "model.quantization.double_quant=false"],
    "4-bit nf4 + double quant": ["model.dtype=bf16", "model.quantization.compute_dtype=bf16"],
}


def llama_100m(root: Path) -> str:
    path = root / "llama-100m"
    if not (path / "config.json").exists():
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(path)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(resolve_model_path("ftdist/tiny")).save_pretrained(path)
    return str(path)


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def _quant_state_bytes(weight) -> int:
    qs = getattr(weight, "quant_state", None)
    if qs is None:  # 8-bit: one fp32 scale per output row
        scb = getattr(weight, "SCB", None)
        return 0 if scb is None else _tensor_bytes(scb)
    n = _tensor_bytes(qs.absmax) + _tensor_bytes(qs.code)
    if qs.nested:
        n += _tensor_bytes(qs.state2.absmax) + _tensor_bytes(qs.state2.code)
    return n


def measure(path: str, overrides: list[str]) -> dict:
    cfg = load_config("qlora_tiny", [f"model.name_or_path={path}", *overrides])
    model = load_causal_lm(cfg.model)
    total = sum(_tensor_bytes(p) for p in model.parameters()) + sum(_tensor_bytes(b) for b in model.buffers())
    linear = bf16_linear = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        w = module.weight
        qs = getattr(w, "quant_state", None)
        real = torch.Size(qs.shape).numel() if qs is not None else w.numel()
        constants = _quant_state_bytes(w)  # not parameters or buffers, so not in `total` yet
        total += constants
        linear += _tensor_bytes(w) + constants
        bf16_linear += 2 * real
    return {"total": total, "linear": linear, "bf16_linear": bf16_linear}


def train_qlora(path: str, steps: int, seq_len: int, micro_batch: int) -> dict:
    """One process, no DeepSpeed: the adapter-only step that QLoRA dev mode runs, timed."""
    from ftdist.engine.optim import build_optimizer
    from ftdist.models.adapters import apply_lora
    from ftdist.models.loading import decay_param_groups

    cuda = torch.cuda.is_available()
    dtype = "bf16" if cuda else "fp32"
    cfg = load_config("qlora_7b", [f"model.name_or_path={path}", "data.train=ftdist/tiny-task", f"model.dtype={dtype}",
                                   f"model.quantization.compute_dtype={dtype}"])
    model = apply_lora(load_causal_lm(cfg.model), cfg.model)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model.to(device)
    opt = build_optimizer(cfg.train, decay_param_groups(model, 0.0))
    vocab = model.config.vocab_size
    x = torch.randint(8, vocab, (micro_batch, seq_len), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = None
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps (kernel selection, optimizer state allocation)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "tokens_per_s": steps * micro_batch * seq_len / dt,
            "peak": peak, "peak_kind": "torch.cuda.max_memory_allocated" if cuda else "process max RSS"}


def mib(n: int) -> str:
    return f"{n / 2**20:,.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "ftdist-bench-models"))
    p.add_argument("--train-steps", type=int, default=0, help="also time QLoRA training steps (0 = memory only)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2)
    args = p.parse_args(argv)
    models = {"tiny (ftdist/tiny)": resolve_model_path("ftdist/tiny"), "~100M Llama": llama_100m(Path(args.cache))}
    ok = True
    print("| model | load | model MiB | quantised linear MiB | same linears in bf16 MiB | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for mname, path in models.items():
        for lname, overrides in LOADS.items():
            m = measure(path, overrides)
            ratio = m["linear"] / m["bf16_linear"]
            if lname.startswith("4-bit") and ratio > MAX_4BIT_RATIO:
                ok = False
            print(f"| {mname} | {lname} | {mib(m['total'])} | {mib(m['linear'])} | {mib(m['bf16_linear'])} | {ratio:.3f} |")
    if args.train_steps:
        print("\n| model | device | seq x batch | tokens/s | peak memory MiB |")
        print("|---|---|---|---:|---:|")
        for mname, path in models.items():
            r = train_qlora(path, args.train_steps, args.seq_len, args.micro_batch)
            print(f"| {mname} | {r['device']} | {args.seq_len} x {args.micro_batch} | {r['tokens_per_s']:,.0f} | "
                  f"{mib(r['peak'])} ({r['peak_kind']}) |")
    if not ok:
        print(f"\nFAIL: a 4-bit load keeps more than {MAX_4BIT_RATIO}x the bf16 bytes of its linear layers")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
