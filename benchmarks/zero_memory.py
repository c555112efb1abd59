"""Per-rank memory of parameters, gradients, master weights and optimizer state under ZeRO 0-3
(and optimizer offload), measured in real gloo processes and compared with ftdist.plan.

    python benchmarks/zero_memory.py                      # 1, 2 and 4 ranks, fp32 and bf16
    python benchmarks/zero_memory.py --ranks 2 --dtypes fp32 --tiny

One torchrun launch per (world size, precision) runs every (stage, offload) case in turn, plus,
on several ranks, ZeRO-3 with other reuse-distance / prefetch knobs: build a 48M-parameter Llama
(random init, loaded with ftdist's loader inside ftdist's ZeRO-3 init context), wrap it in
ftdist's Engine (DeepSpeed) with 2 micro-batches per step, run one step, then in the second step
count, after the mid-step backward and after the boundary backward (the larger is kept), the
bytes of every tensor the rank holds, each storage once:

  params     the module's parameters: whole tensors, or under ZeRO-3 the rank's partition
             (ds_tensor) plus the small parameters kept whole; under ZeRO-3 on several ranks
             also the peak: the most parameter bytes materialised at once in the forward
  grads      p.grad and the ZeRO optimizer's gradient partitions (averaged_gradients,
             all_grad_tensors, accumulated_grads_in_cpu, the stage-3 grad partitions, the
             fp32 gradient of the master partition)
  master     tensors the inner optimizer steps that are not the module's parameters
             (fp32 master partitions)
  optimizer  the inner optimizer's state (Adam m and v)
  buckets    reduce buckets (ipg_*) and offload staging buffers: scratch sized by the DeepSpeed
             config, not part of the theory

Theory = ftdist.plan.estimate for the same setup, per rank; what the planner puts in cpu_bytes
under offload is split back into grads, master and optimizer (on a CPU machine every tensor is
in the same memory). Exits 1 when a model-state total is off by more than 15%.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

TOLERANCE = 0.15
CASES = [(0, False), (1, False), (2, False), (3, False), (1, True), (2, True), (3, True)]  # (stage, offload)
# ZeRO-3 knobs besides ds_configs/zero3.json's (reuse distance 1e9, prefetch 5e7), to check how many
# gathered parameters the forward keeps: none kept for reuse, and about a third of the model kept
ZERO3_KNOBS = [{"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0},
               {"stage3_max_reuse_distance": 30_000_000, "stage3_prefetch_bucket_size": 0}]
SHAPES = {
    "full": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=16384),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
SEQ = 32


def write_model(work: Path, tiny: bool) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = work / "model"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES["tiny" if tiny else "full"], max_position_embeddings=256, tie_word_embeddings=False,
                      use_cache=False)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


# -- measurement inside one rank ----------------------------------------------------------------
class Held:
    """Bytes per category, each storage counted once (views of a flat buffer count as the buffer)."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}
        self.where: dict[str, int] = {}  # "category:attribute" -> bytes, for the breakdown

    def add(self, category: str, t, name: str = "") -> None:
        import torch

        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key == 0 or st.nbytes() == 0 or key in self.seen:
            return
        self.seen.add(key)
        self.bytes[category] = self.bytes.get(category, 0) + st.nbytes()
        label = f"{category}:{name}"
        self.where[label] = self.where.get(label, 0) + st.nbytes()


def _tensors(obj, depth: int = 0):
    """(tensor, is_a_grad) reachable through lists, tuples, dicts and DeepSpeed helper objects (not modules)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj, False
        if obj.grad is not None:
            yield obj.grad, True
        return
    if depth > 3 or isinstance(obj, torch.nn.Module):
        return
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from _tensors(v, depth + 1)


def measure(engine) -> Held:
    h = Held()
    module, opt = engine.module, engine.optimizer
    for p in module.parameters():
        h.add("params", p.data, "module")
        h.add("params", getattr(p, "ds_tensor", None), "ds_tensor")
    for p in module.parameters():
        h.add("grads", p.grad, "p.grad")
    inner = getattr(opt, "optimizer", opt)
    for g in inner.param_groups:
        for p in g["params"]:
            h.add("master", p, "optimizer params")
            h.add("grads", p.grad, "optimizer params .grad")
    for state in inner.state.values():
        for v in state.values():
            h.add("optimizer", v, "state")
    if opt is not inner:
        attrs = sorted(vars(opt).items())
        # gradient holders first, then fp32 master partitions the inner optimizer reaches through views,
        # then communication buckets and staging buffers, then anything else the wrapper keeps
        def scratch(n: str) -> bool:
            return "ipg" in n or "bucket" in n or "temp" in n or "buffer_of" in n

        for want, category in ((lambda n: "grad" in n and not scratch(n), "grads"),
                               (lambda n: "fp32" in n and not scratch(n), "master"),
                               (scratch, "buckets"), (lambda n: True, "other")):
            for name, value in attrs:
                if name in ("optimizer", "module") or not want(name):
                    continue
                for t, is_grad in _tensors(value):
                    h.add("grads" if is_grad else category, t, name + (".grad" if is_grad else ""))
    return h


def param_peak_hooks(module) -> dict:
    """Most parameter bytes materialised at once during a forward (ZeRO-3 gathers and releases)."""
    peak = {"bytes": 0}  # the caller resets it once the first step has recorded ZeRO-3's trace
    params = list(module.parameters())

    def probe(*_):
        seen, total = set(), 0
        for p in params:
            for t in (p.data, getattr(p, "ds_tensor", None)):
                if t is None or t.numel() == 0:
                    continue
                st = t.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        peak["bytes"] = max(peak["bytes"], total)

    for m in module.modules():
        m.register_forward_pre_hook(probe)
        m.register_forward_hook(probe)
    return peak


def run_case(model_dir: Path, info, dtype: str, stage: int, offload: bool, knobs: dict | None = None) -> dict:
    import torch

    from ftdist.config import load_config
    from ftdist.engine.engine import Engine
    from ftdist.models.loading import load_causal_lm

    cfg = load_config(data=dict(
        model={"name_or_path": str(model_dir), "dtype": dtype, "attn_implementation": "sdpa"},
        data={"train": "ftdist/tiny-task"},  # required by the config, never read here
        train={"micro_batch_size": 1, "global_batch_size": 2 * info.world_size, "lr": 1e-4, "max_grad_norm": 1.0,
               "warmup_ratio": 0.0, "progress_bar": False},
        deepspeed={"zero_stage": stage, "offload_optimizer": offload, "config": _ds_config(model_dir, knobs)}))
    # two micro-batches per step: ZeRO-1 holds whole gradients between the boundaries, ZeRO-2 only partitions
    engine = Engine(lambda: load_causal_lm(cfg.model), cfg, info, grad_accum=2, total_steps=4)
    peak = param_peak_hooks(engine.module)
    g = torch.Generator().manual_seed(info.rank)
    vocab = engine.module.config.vocab_size
    held = []
    for micro in range(4):
        if micro == 2:
            peak["bytes"] = 0
        ids = torch.randint(0, vocab, (1, SEQ), generator=g)
        loss = engine.forward(input_ids=ids, labels=ids).loss
        engine.backward(loss / 2)
        if micro >= 2:  # the second step: optimizer state exists; after a mid-step and after a boundary backward
            held.append(measure(engine))
        engine.step()
    worst = max(held, key=lambda h: sum(h.bytes.get(c, 0) for c in ("params", "grads", "master", "optimizer")))
    result = {"dtype": dtype, "stage": stage, "offload": offload, "ranks": info.world_size, "rank": info.rank,
              "knobs": knobs or {}, **worst.bytes, "params_peak": peak["bytes"], "where": worst.where}
    # every case runs in the same processes: hand DeepSpeed's buffers back before the next one
    engine.engine.destroy()
    engine.engine.optimizer = engine.optimizer = engine.engine.module = None
    del engine, held, worst
    # the next case must not be built inside this case's ZeRO-3 init context
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed state goes back to the OS, not to the next case's peak
    result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import psutil

    result["rss_now_mb"] = psutil.Process().memory_info().rss / 2**20
    return result


def _ds_config(model_dir: Path, knobs: dict | None) -> str:
    """'auto', or ds_configs/zero3.json with `knobs` replaced, written next to the model."""
    if not knobs:
        return "auto"
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"].update(knobs)
    name = "-".join(f"{k}={v}" for k, v in sorted(knobs.items()))
    path = model_dir.parent / f"zero3-{name}-rank{os.environ.get('RANK', '0')}.json"  # each rank its own file
    path.write_text(json.dumps(ds))
    return str(path)


def worker(a) -> int:
    import logging

    from ftdist.engine.dist import barrier, init_distributed
    from ftdist.run.logs import setup_logging

    info = init_distributed("gloo", 600)
    setup_logging(info.is_main)
    logging.getLogger("ftdist").setLevel(logging.WARNING)
    out = []
    for dtype in a.dtypes.split(","):
        for stage, offload in CASES:
            out.append(run_case(Path(a.model), info, dtype, stage, offload))
            barrier()
        for knobs in ZERO3_KNOBS if info.world_size > 1 else []:
            out.append(run_case(Path(a.model), info, dtype, 3, False, knobs))
            barrier()
    Path(a.out).with_suffix(f".rank{info.rank}.json").write_text(json.dumps(out))
    return 0


# -- theory and report ------------------------------------------------------------------------------
def theory(shape, r: dict) -> dict:
    """ftdist.plan's bytes per category for the case of record r; offloaded state split back by kind."""
    from ftdist.plan import ZERO3_MAX_REUSE_DISTANCE, ZERO3_PREFETCH_BUCKET, estimate

    knobs, n = r.get("knobs", {}), r["ranks"]
    e = estimate(shape, "full", zero_stage=r["stage"], offload_optimizer=r["offload"], world_size=n, seq_len=SEQ,
                 dtype=r["dtype"], optimizer="adamw_torch",
                 zero3_prefetch_bucket=knobs.get("stage3_prefetch_bucket_size", ZERO3_PREFETCH_BUCKET),
                 zero3_max_reuse_distance=knobs.get("stage3_max_reuse_distance", ZERO3_MAX_REUSE_DISTANCE))
    t = {"params": e.weights, "grads": e.gradients, "master": e.master_weights, "optimizer": e.optimizer_state}
    if r["offload"]:
        # cpu_bytes = fp32 master + m + v + the gradient partition(s) CPU Adam uses
        psi = shape.n_params()
        t["master"] += 4 * psi / n
        t["optimizer"] += 8 * psi / n
        t["grads"] += e.cpu_bytes - 12 * psi / n
    t["total"] = sum(t.values())
    return t


def _label(r: dict) -> str:
    knobs = r.get("knobs") or {}
    if not knobs:
        return str(r["stage"])
    return (f"3, reuse {knobs['stage3_max_reuse_distance']:.0e}, bucket {knobs['stage3_prefetch_bucket_size']:.0e}"
            .replace("0e+00", "0"))


def report(rows: list[dict], shape) -> tuple[str, bool]:
    mb = 1e6
    lines = ["Measured / theory (ftdist.plan), MB per rank. params: the partition, and under ZeRO-3 on several "
             "ranks (peak of the forward) which is what is compared; buckets: reduce buckets and staging buffers, "
             "outside the theory.", "",
             "| precision | ZeRO | offload | ranks | params | grads | master | optimizer | model states | ratio "
             "| buckets |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ok = True
    for r in rows:
        t = theory(shape, r)
        peak = r["stage"] == 3 and r["ranks"] > 1
        m = {"params": r["params_peak"] if peak else r.get("params", 0),
             **{c: r.get(c, 0) for c in ("grads", "master", "optimizer")}}
        m["total"] = sum(m.values())
        ratio = m["total"] / t["total"]
        ok &= abs(ratio - 1) <= TOLERANCE

        def cell(c):
            return f"{m[c] / mb:.0f} / {t[c] / mb:.0f}"

        params = (f"{r.get('params', 0) / mb:.0f} ({cell('params')})" if peak else cell("params"))
        lines.append(f"| {r['dtype']} | {_label(r)} | {'optimizer' if r['offload'] else '-'} | {r['ranks']} | "
                     f"{params} | {cell('grads')} | {cell('master')} | {cell('optimizer')} | {cell('total')} | "
                     f"{ratio:.3f}{'' if abs(ratio - 1) <= TOLERANCE else ' off'} | {r.get('buckets', 0) / mb:.0f} |")
    return "\n".join(lines), ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2,4", help="world sizes, comma-separated (default 1,2,4)")
    p.add_argument("--dtypes", default="fp32,bf16", help="precisions: fp32 and/or bf16 (default both)")
    p.add_argument("--tiny", action="store_true", help="a tiny model: checks the script runs")
    p.add_argument("--json", default=None, help="also write every rank's record to this JSON file")
    p.add_argument("--verbose", action="store_true", help="print where the bytes of each case are held")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)

    from ftdist.plan import ModelShape

    with tempfile.TemporaryDirectory(prefix="zero-memory-") as tmp:
        work = Path(tmp)
        model_dir = write_model(work, a.tiny)
        shape = ModelShape.from_hf_config_dir(str(model_dir))
        print(f"model: Llama {shape.n_params() / 1e6:.1f}M parameters; per-rank bytes after backward, before the "
              f"optimizer step; MB = 1e6 bytes", flush=True)
        rows = []
        # one launch per world size and precision: fewer cases per process, less left behind between them
        for n, dtype in ((int(x), d) for x in a.ranks.split(",") for d in a.dtypes.split(",")):
            out = work / f"ranks{n}-{dtype}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                   str(_free_port()), __file__, "--worker", "--model", str(model_dir), "--out", str(out),
                   "--dtypes", dtype]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-8000:], file=sys.stderr)
                return 2
            per_rank = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(n)]
            for k, r0 in enumerate(per_rank[0]):
                # the report shows the rank holding the most (ranks differ by partition padding only)
                rows.append(max((pr[k] for pr in per_rank),
                                key=lambda r: sum(r.get(c, 0) for c in ("params", "grads", "master", "optimizer"))))
            print(f"{n} rank(s), {dtype}: done", flush=True)
        rows.sort(key=lambda r: (r["dtype"] != "fp32", r["offload"], bool(r.get("knobs")), r["stage"],
                                 json.dumps(r.get("knobs", {}), sort_keys=True), r["ranks"]))
        text, ok = report(rows, shape)
        print(text)
        if a.verbose:
            for r in rows:
                print(r["dtype"], r["stage"], r["offload"], r["ranks"],
                      {k: round(v / 1e6, 3) for k, v in r["where"].items() if v >= 1e4})
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"{'OK' if ok else 'FAIL'}: every model-state total {'within' if ok else 'NOT all within'} "
          f"{TOLERANCE:.0%} of ftdist.plan")
    return 0 if ok else 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
