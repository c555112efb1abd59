"""Check ftdist.plan against what a real Llama training step holds in memory, on CPU.

    python benchmarks/plan_vs_measured.py

A ~19M-parameter Llama (random init from a config) runs one forward+backward and one
AdamW step: full fine-tuning in fp32 (sdpa and eager attention, with and without
gradient checkpointing), in bf16, and with peft LoRA adapters on all seven projections.
Measured: parameter, gradient and optimizer-state bytes, and every tensor allocation of
the step (a TorchDispatchMode that follows each storage until it is freed), from which
we take the bytes still held when the forward ends and the peak during the step, both
without the gradients (the planner's "activations"); with gradient checkpointing also
the bytes one layer's recompute keeps in backward. Prints predicted vs measured and
exits 1 when any item is off by more than 20%.
"""

from __future__ import annotations

import sys
import tempfile
import weakref
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from ftdist.plan import LINEAR_TARGETS, ModelShape, activation_parts, estimate  # noqa: E402

TOLERANCE = 0.20
SEQ_LEN, MICRO_BATCH, LORA_R = 256, 2, 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class AllocationLog(TorchDispatchMode):
    """Logs (storage key, +bytes) when an op creates a storage and (key, -bytes) when it dies."""

    def __init__(self, known_tensors):
        super().__init__()
        self.alive = {t.untyped_storage()._cdata for t in known_tensors}  # params, buffers: not counted
        self.events: list[tuple[int, int]] = []
        self.live = 0

    def _free(self, key, nbytes):
        self.alive.discard(key)
        self.live -= nbytes
        self.events.append((key, -nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.alive:
                    self.alive.add(key)
                    self.live += st.nbytes()
                    self.events.append((key, st.nbytes()))
                    weakref.finalize(st, self._free, key, st.nbytes())
        return out

    def peak_without(self, final_keys) -> int:
        """Peak of the running total, leaving out the last allocation of each key in final_keys."""
        last = {key: k for k, (key, n) in enumerate(self.events) if n > 0 and key in final_keys}
        skip = set(last.values())
        total = peak = 0
        for k, (key, n) in enumerate(self.events):
            if k not in skip:
                total += n
                peak = max(peak, total)
        return peak


def tiny_config(attn: str) -> LlamaConfig:
    return LlamaConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                       num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=False,
                       attn_implementation=attn, use_cache=False)


def train_step(dtype: str, attn: str, checkpointing: bool, lora_dropout: float | None) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(attn)).to(DTYPES[dtype]).train()
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if lora_dropout is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_dropout=lora_dropout,
                                                 target_modules=list(LINEAR_TARGETS)))
    ids = torch.randint(0, 8192, (MICRO_BATCH, SEQ_LEN))  # (B, T)
    log = AllocationLog([*model.parameters(), *model.buffers()])

    # the bytes one layer's recompute keeps for its backward: live after its MLP minus live
    # before its first norm, without the MLP output (early stop off, so the recompute
    # runs the whole layer and the hooks see its end)
    recomputed, state = [], {"backward": False, "before": 0}

    def start(module, args):
        state["before"] = log.live

    def end(module, args, out):
        if state["backward"]:
            recomputed.append(log.live - state["before"] - out.untyped_storage().nbytes())

    for layer in (m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"):
        layer.input_layernorm.register_forward_pre_hook(start)
        layer.mlp.register_forward_hook(end)

    with log, torch.utils.checkpoint.set_checkpoint_early_stop(False):
        out = model(input_ids=ids, labels=ids)
        after_forward = log.live
        state["backward"] = True
        out.loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    grad_keys = {p.grad.untyped_storage()._cdata for p in trained}
    opt = torch.optim.AdamW(trained, lr=1e-4)
    opt.step()
    return {
        "weights": sum(p.nbytes for p in model.parameters()),
        "grads": sum(p.grad.nbytes for p in trained),
        "optimizer": sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
        "stored": after_forward,
        "peak": log.peak_without(grad_keys),
        "recomputed": max(recomputed, default=0),
    }


def main() -> int:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        tiny_config("sdpa").to_json_file(f"{d}/config.json")
        shape = ModelShape.from_hf_config_dir(d)
    tokens = SEQ_LEN * MICRO_BATCH
    print(f"model: {shape.n_params() / 1e6:.1f}M params, {tokens} tokens per step "
          f"(seq {SEQ_LEN} x micro-batch {MICRO_BATCH}), CPU")
    rows = []

    def check(name, predicted, measured):
        ratio = predicted / measured
        rows.append((name, predicted, measured, ratio, abs(ratio - 1) <= TOLERANCE))

    # (dtype, attention, gradient checkpointing, LoRA dropout or None for full fine-tuning);
    # bf16 runs weights and activations in bf16 with the logits upcast for the loss, as
    # transformers does, so it checks the mixed-precision activation terms
    cases = [("fp32", "sdpa", False, None), ("fp32", "sdpa", True, None), ("fp32", "eager", False, None),
             ("bf16", "sdpa", False, None), ("bf16", "sdpa", True, None),
             ("fp32", "sdpa", False, 0.0), ("fp32", "sdpa", False, 0.05)]
    for dtype, attn, ckpt, dropout in cases:
        m = train_step(dtype, attn, ckpt, dropout)
        method = "full" if dropout is None else "lora"
        lora = dict(lora_r=LORA_R, lora_dropout=dropout) if dropout is not None else {}
        est = estimate(shape, method, seq_len=SEQ_LEN, micro_batch=MICRO_BATCH, gradient_checkpointing=ckpt,
                       dtype=dtype, optimizer="adamw", attention=attn, **lora)
        p = activation_parts(shape, SEQ_LEN, dtype, attn, **lora)
        tag = f"{dtype}, {attn}, ckpt {'on' if ckpt else 'off'}" + (f", lora dropout {dropout}" if lora else "")
        # torch's CPU dropout keeps its mask in the compute dtype, CUDA's fused kernel in 1 byte
        cpu_mask = tokens * shape.num_layers * (DTYPES[dtype].itemsize - 1) * sum(
            a for a, _ in shape.linear_shapes().values()) if dropout else 0
        if not rows or dropout == 0.0:  # model state once for full fine-tuning, once for LoRA
            check(f"weights ({method})", est.weights, m["weights"])
            check(f"gradients ({method})", est.gradients, m["grads"])
            check(f"optimizer m+v, AdamW ({method})", est.optimizer_state, m["optimizer"])
        held_layers = shape.num_layers * (p["layer_input"] if ckpt else p["layer"])
        check(f"activations held after forward ({tag})", tokens * (held_layers + p["head"]) + cpu_mask, m["stored"])
        check(f"activation peak of the step ({tag})", est.activations + cpu_mask, m["peak"])
        if ckpt:
            check(f"one recomputed layer ({tag})", tokens * p["layer"], m["recomputed"])

    width = max(len(r[0]) for r in rows)
    print(f"{'item':<{width}}  {'predicted MB':>12}  {'measured MB':>12}  {'ratio':>6}")
    for name, pred, meas, ratio, ok in rows:
        print(f"{name:<{width}}  {pred / 1e6:12.2f}  {meas / 1e6:12.2f}  {ratio:6.3f}{'' if ok else '  <-- off'}")
    bad = [r[0] for r in rows if not r[4]]
    if bad:
        print(f"FAIL: {len(bad)} item(s) off by more than {TOLERANCE:.0%}: {', '.join(bad)}")
        return 1
    print(f"OK: every item within {TOLERANCE:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
