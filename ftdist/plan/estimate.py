"""Per-GPU memory planner behind `ftdist plan`: predicts bytes and picks a ZeRO/offload setup.

Pure arithmetic on the model shape (no torch import). GB = 1e9 bytes; an "80 GB" card
holds 80 GiB, so budgets are read ~7% conservatively.

Model state per parameter (Psi params; ZeRO paper, Rajbhandari et al. 2020):
  mixed precision: 2 bf16 weights + 2 bf16 grads + K=12 (4 fp32 master + 8 Adam m, v)
  fp32:            4 weights + 4 grads + 8 Adam m, v; no master copy without ZeRO, but
                   ZeRO 1-3 keep a 4-byte master partition anyway (DeepSpeed clones the
                   partition it steps whatever its dtype; benchmarks/zero_memory.py measures it)
  "optimizer" counts m+v only, the master copy is its own line: AdamW on 7B holds
  8 B/param = 54 GB (the "56 GB for 7B" rule is 7e9 x 8); 8-bit AdamW holds 2 B/param
  plus an fp32 absmax per 256-block of each state = 13.7 GB (the "14 GB" rule).
  ZeRO over N ranks: stage 1 divides master + m + v by N, stage 2 also the gradients,
  stage 3 also the weights, plus the parameters gathered whole at the turn from forward to
  backward: a gathered parameter is not released while its next use is within
  stage3_max_reuse_distance parameters, and a layer's next use waits for every later
  layer's forward and backward, so the last reuse_distance/2 parameters stay (at least one
  unit: the largest decoder layer or the embedding), plus the prefetch bucket, at most the
  whole model. With ds_configs/zero3.json (reuse distance 1e9, bucket 5e7) that is 0.55B
  parameters: a model below that is held whole at the peak. offload_optimizer (ZeRO 1-3)
  moves master + m + v to the CPU with the fp32 gradient partition CPU Adam steps on; under
  ZeRO 2/3 no gradient partition stays on the GPU, and a second one, in the training dtype,
  accumulates micro-batches on the CPU (ZeRO-2 allocates it once a step has more than one
  micro-batch, ZeRO-3 always); ZeRO-1 keeps its full bf16 gradients.
  offload_params (ZeRO-3) moves the weight partition to the CPU too.
  LoRA: frozen base in the training dtype, adapters (r*(in+out) per linear) pay the full
  cost. QLoRA: decoder linear weights in NF4 = 0.5 B/param + constants: fp32 absmax per
  64-block (4/64), or double-quantised 8-bit absmax + an fp32 constant per 256 of them
  (1/64 + 4/(64*256)); bitsandbytes measures 0.5164. Embeddings, norms, lm_head: compute dtype.

Activations, bytes per token per decoder layer (e = compute dtype size), from what
autograd saves in a transformers LlamaDecoderLayer (benchmarks/plan_vs_measured.py
measures real steps on CPU within 1.5%: fp32, bf16, eager, LoRA):
  2 RMSNorms  2*(4h + 4 + 2e*h): fp32 copy of the input (the input itself in fp32) and
              rsqrt; with a trained weight also the normalised x (for the weight grad) and
              the weighted output (input of the trained linears after it)
  attention   e*(2*q_dim + 2*kv_dim): q, k after RoPE, v, attention output = o_proj input.
              sdpa kernels (flash, memory-efficient, torch's CPU kernel) add an fp32
              logsumexp per head; eager keeps the fp32 softmax and its cast (heads*T*(4+e),
              once in fp32) and k, v repeated to all heads.
  MLP         4e*I: gate output, SiLU output, up output, their product (down_proj input)
  LoRA        frozen linears and norms save no inputs (so no normalised x, norm output or
              product); each adapter saves e*r (lora_A output) and with dropout a copy of its
              input plus CUDA's 1-byte mask, (e+1)*in; without dropout the shared inputs.
Outside the layers: the final norm, logits kept by the model output (e*V) and the fp32
log-softmax of the loss (4V); at the start of backward two fp32 V-sized gradients (8V)
coexist. Gradient checkpointing keeps each layer's input (e*h) and recomputes one layer
in backward: peak = max(inputs + final norm + loss + 8V, inputs + logits + one layer).
Not modelled (headroom covers them): CUDA context, NCCL and ZeRO buckets, fragmentation,
transients inside a layer's backward.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ftdist.config.schema import OFFLOAD_OPTIMIZERS

GB = 1e9
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# optimizer state bytes per trainable parameter (m + v for Adam; the fp32 master copy is separate)
OPTIMIZER_STATE_BYTES = {
    "adamw_torch": 8.0,
    "paged_adamw_32bit": 8.0,
    "adamw_8bit": 2 + 8 / 256,  # two uint8 states + one fp32 absmax per 256-block each
    "paged_adamw_8bit": 2 + 8 / 256,  # paged: same bytes, can spill to CPU under pressure
    "sgd": 4.0,  # momentum buffer
    "lion": 4.0,  # one momentum buffer
    "adafactor": 0.0,  # factored second moment, rows + columns only: ~0 per parameter
    "rmsprop": 4.0,  # square average (a momentum buffer adds 4 more when optimizer_kwargs sets momentum)
    "adagrad": 4.0,  # running sum of squared gradients
}
OPTIMIZER_ALIASES = {"adamw": "adamw_torch", "adam": "adamw_torch"}
METHODS = ("full", "lora", "qlora")
OFFLOADS = ((False, False), (True, False), (True, True))  # (optimizer, params), slowest last
# ZeRO-3 knobs as ds_configs/zero3*.json set them
ZERO3_PREFETCH_BUCKET = 5e7
ZERO3_MAX_REUSE_DISTANCE = 1e9
ZERO3_MAX_LIVE_PARAMETERS = 1e9


def _nf4_bytes_per_param(double_quant: bool) -> float:
    return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)


@dataclass(frozen=True)
class ModelShape:
    """The numbers that fix a Llama-architecture model's size."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_embeddings: bool = False
    head_dim: int | None = None  # None = hidden_size // num_heads
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_heads * (self.head_dim or self.hidden_size // self.num_heads)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * (self.head_dim or self.hidden_size // self.num_heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_weight_params(self) -> int:
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())

    def linear_params(self) -> int:
        """Parameters inside the decoder layers' nn.Linear modules (weights and biases)."""
        sh = self.linear_shapes()
        bias = sum(sh[n][1] for n in ("q_proj", "k_proj", "v_proj", "o_proj")) * self.attention_bias
        bias += sum(sh[n][1] for n in ("gate_proj", "up_proj", "down_proj")) * self.mlp_bias
        return self.linear_weight_params() + self.num_layers * bias

    def layer_params(self) -> int:
        return self.linear_params() // self.num_layers + 2 * self.hidden_size  # + 2 RMSNorm weights

    def n_params(self) -> int:
        """Exact count: embeddings, layers, final norm, lm_head unless tied."""
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_embeddings else 2) + self.num_layers * self.layer_params() + self.hidden_size

    def lora_params(self, r: int, targets=LINEAR_TARGETS) -> int:
        """LoRA A (r x in) + B (out x r) for every targeted linear of every layer."""
        sh = self.linear_shapes()
        unknown = set(targets) - set(sh)
        if unknown:
            raise ValueError(f"lora targets: unknown {sorted(unknown)}, allowed: {', '.join(LINEAR_TARGETS)}")
        return self.num_layers * sum(r * (sh[t][0] + sh[t][1]) for t in targets)

    @classmethod
    def from_hf_config_dir(cls, path: str) -> ModelShape:
        """Read a Hugging Face config.json (a directory holding it, or the file)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with open(file) as f:
            c = json.load(f)
        c = c.get("text_config", c)
        try:
            return cls(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                       num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                       num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                       vocab_size=c["vocab_size"], tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                       head_dim=None if c.get("head_dim") in (None, c["hidden_size"] // c["num_attention_heads"])
                       else c["head_dim"], attention_bias=bool(c.get("attention_bias", False)),
                       mlp_bias=bool(c.get("mlp_bias", False)))
        except KeyError as e:
            raise ValueError(f"{file}: missing {e.args[0]!r}; a Llama-style config is needed") from None

    @classmethod
    def resolve(cls, spec: str) -> ModelShape:
        """A preset name (1b, 7b, 13b, 70b) or a Hugging Face config directory."""
        if spec.lower() in PRESETS:
            return PRESETS[spec.lower()][0]
        if os.path.exists(spec):
            return cls.from_hf_config_dir(spec)
        raise ValueError(f"--model: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config directory")


PRESETS = {  # name: (shape, Hugging Face id written into emitted recipes)
    "1b": (ModelShape(2048, 5632, 22, 32, 4, 32000), "TinyLlama/TinyLlama_v1.1"),
    "7b": (ModelShape(4096, 11008, 32, 32, 32, 32000), "meta-llama/Llama-2-7b-hf"),
    "13b": (ModelShape(5120, 13824, 40, 40, 40, 32000), "meta-llama/Llama-2-13b-hf"),
    "70b": (ModelShape(8192, 28672, 80, 64, 8, 32000), "meta-llama/Llama-2-70b-hf"),
}


def zero3_gathered_params(shape: ModelShape, prefetch_bucket: float = ZERO3_PREFETCH_BUCKET,
                          max_reuse_distance: float = ZERO3_MAX_REUSE_DISTANCE,
                          max_live_parameters: float = ZERO3_MAX_LIVE_PARAMETERS) -> float:
    """Parameters a ZeRO-3 rank holds whole at the peak of a step (see the module docstring)."""
    unit = max(shape.layer_params(), shape.vocab_size * shape.hidden_size)
    kept = min(max_reuse_distance / 2, max_live_parameters)
    return min(float(shape.n_params()), max(unit, kept) + prefetch_bucket)


def weights_bytes(shape: ModelShape, fmt: str = "bf16", double_quant: bool = True) -> float:
    """Bytes to hold the whole model: fp32, bf16/fp16, or nf4 (decoder linear weights in 4 bits)."""
    if fmt == "nf4":
        q = shape.linear_weight_params()
        return q * _nf4_bytes_per_param(double_quant) + (shape.n_params() - q) * 2
    return shape.n_params() * DTYPE_BYTES[fmt]


def activation_parts(shape: ModelShape, seq_len: int, dtype: str = "bf16", attention: str = "sdpa",
                     lora_r: int = 0, lora_targets=LINEAR_TARGETS, lora_dropout: float = 0.0) -> dict[str, float]:
    """Activation bytes per token: one decoder layer's saved tensors ('layer'), a checkpointed
    layer input ('layer_input'), final norm + loss ('head'), logits alone ('logits') and the
    fp32 loss gradients at the start of backward ('loss_grad'); see the module docstring."""
    e = DTYPE_BYTES[dtype]
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    # rmsnorm: fp32 copy of the input + rsqrt, and (trained weight only) the normalised x and
    # the weighted output, which the trained linears after it save as their input
    norm = 4 * h + 4 + (0 if lora_r else 2 * e * h)
    # q, k after RoPE, v, attention output (= o_proj input); gate, SiLU, up outputs
    layer = 2 * norm + e * (2 * shape.q_dim + 2 * shape.kv_dim) + 3 * e * i
    if attention == "sdpa":
        layer += 4 * shape.num_heads  # fp32 logsumexp per head
    elif attention == "eager":
        if shape.num_kv_heads != shape.num_heads:  # repeat_kv copies replace k, v
            layer += 2 * e * (shape.q_dim - shape.kv_dim)
        layer += shape.num_heads * seq_len * (4 + (e if e != 4 else 0))  # fp32 softmax + its cast
    else:
        raise ValueError(f"attention: got {attention!r}, allowed: sdpa, eager")
    if not lora_r:
        layer += e * i  # gate*up product, saved by down_proj
    else:
        # frozen linears save no input; each adapter saves its lora_A input and output:
        # with dropout a fresh copy plus a 1-byte mask (CUDA's fused dropout), without it
        # the shared input (norm outputs, or the product for down_proj)
        sh, t = shape.linear_shapes(), set(lora_targets)
        layer += sum(e * lora_r + ((e + 1) * sh[n][0] if lora_dropout > 0 else 0) for n in t)
        if lora_dropout == 0:
            layer += e * (h * bool(t & {"q_proj", "k_proj", "v_proj"}) + h * bool(t & {"gate_proj", "up_proj"})
                          + i * ("down_proj" in t))
    return {"layer": layer, "layer_input": e * h, "head": norm + v * (e + 4), "logits": e * v, "loss_grad": 8 * v}


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, dtype: str = "bf16",
                     gradient_checkpointing: bool = False, attention: str = "sdpa",
                     lora_r: int = 0, lora_targets=LINEAR_TARGETS, lora_dropout: float = 0.0) -> float:
    """Peak activation bytes of one forward+backward on one GPU."""
    p = activation_parts(shape, seq_len, dtype, attention, lora_r, lora_targets, lora_dropout)
    tokens, layers = seq_len * micro_batch, shape.num_layers
    if not gradient_checkpointing:
        return tokens * (layers * p["layer"] + p["head"] + p["loss_grad"])
    inputs = layers * p["layer_input"]
    # start of backward, or the recompute of one layer while the logits are still referenced
    return tokens * max(inputs + p["head"] + p["loss_grad"], inputs + p["logits"] + p["layer"])


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (cpu_bytes: per rank on the host) for one training setup."""

    method: str
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    gradient_checkpointing: bool
    world_size: int
    seq_len: int
    micro_batch: int
    dtype: str
    optimizer: str
    lora_r: int
    trainable_params: int
    weights: float
    gradients: float
    master_weights: float
    optimizer_state: float
    activations: float
    cpu_bytes: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.master_weights + self.optimizer_state + self.activations

    @property
    def offload(self) -> str:
        names = [n for n, on in (("opt", self.offload_optimizer), ("param", self.offload_params)) if on]
        return "+".join(names) or "none"


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}: got {value!r}, allowed: {', '.join(map(str, allowed))}")


def estimate(shape: ModelShape, method: str = "full", zero_stage: int = 0, offload_optimizer: bool = False,
             offload_params: bool = False, world_size: int = 1, seq_len: int = 2048, micro_batch: int = 1,
             gradient_checkpointing: bool = False, dtype: str = "bf16", optimizer: str = "adamw",
             lora_r: int = 16, lora_targets=LINEAR_TARGETS, lora_dropout: float = 0.05,
             attention: str = "sdpa", double_quant: bool = True,
             zero3_prefetch_bucket: float = ZERO3_PREFETCH_BUCKET,
             zero3_max_reuse_distance: float = ZERO3_MAX_REUSE_DISTANCE,
             zero3_max_live_parameters: float = ZERO3_MAX_LIVE_PARAMETERS) -> MemoryEstimate:
    """Per-GPU memory of one setup (theory in the module docstring)."""
    optimizer = OPTIMIZER_ALIASES.get(optimizer, optimizer)
    _check("method", method, METHODS)
    _check("zero_stage", zero_stage, (0, 1, 2, 3))
    _check("dtype", dtype, tuple(DTYPE_BYTES))
    _check("optimizer", optimizer, tuple(OPTIMIZER_STATE_BYTES))
    if offload_optimizer and zero_stage == 0:
        raise ValueError("offload_optimizer needs zero_stage >= 1")
    if offload_params and zero_stage != 3:
        raise ValueError("offload_params needs zero_stage=3")
    if offload_optimizer and optimizer not in OFFLOAD_OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} cannot be offloaded; allowed: {', '.join(OFFLOAD_OPTIMIZERS)}")
    for name, value in (("world_size", world_size), ("seq_len", seq_len), ("micro_batch", micro_batch),
                        ("lora_r", lora_r if method != "full" else 1)):
        if value < 1:
            raise ValueError(f"{name}: got {value}, allowed: >= 1")
    if method == "qlora" and dtype == "fp32":
        raise ValueError("qlora computes in bf16 or fp16, not fp32")
    e, n = DTYPE_BYTES[dtype], world_size
    total = shape.n_params()
    if method == "full":
        trainable, frozen = total, 0.0
    else:
        trainable = shape.lora_params(lora_r, lora_targets)
        if method == "lora":
            frozen = total * e
        else:
            q = shape.linear_weight_params()
            frozen = q * _nf4_bytes_per_param(double_quant) + (total - q) * e
    weights = frozen + trainable * e
    grads = trainable * e
    master = trainable * 4.0 if e != 4 or zero_stage >= 1 else 0.0
    states = trainable * OPTIMIZER_STATE_BYTES[optimizer]
    shard_opt = n if zero_stage >= 1 else 1
    shard_grad = n if zero_stage >= 2 else 1
    cpu = 0.0
    gpu_weights = weights / (n if zero_stage == 3 else 1)
    if zero_stage == 3 and (n > 1 or offload_params):
        live = zero3_gathered_params(shape, zero3_prefetch_bucket, zero3_max_reuse_distance, zero3_max_live_parameters)
        gathered = live * weights / (total + (trainable if method != "full" else 0))
        gpu_weights = gathered + (0 if offload_params else gpu_weights)
        cpu += weights / n if offload_params else 0
    gpu_grads = grads / shard_grad
    gpu_master, gpu_states = master / shard_opt, states / shard_opt
    if offload_optimizer:
        # CPU Adam keeps an fp32 parameter partition, m, v and the fp32 gradient partition;
        # ZeRO 2/3 accumulate micro-batches into a partition in the training dtype there as well
        cpu += trainable * (4.0 + 4.0 + OPTIMIZER_STATE_BYTES[optimizer] + (e if zero_stage >= 2 else 0)) / shard_opt
        gpu_master = gpu_states = 0.0
        if zero_stage >= 2:
            gpu_grads = 0.0
    acts = activation_bytes(shape, seq_len, micro_batch, dtype, gradient_checkpointing, attention,
                            lora_r if method != "full" else 0, lora_targets, lora_dropout)
    return MemoryEstimate(method, zero_stage, offload_optimizer, offload_params, gradient_checkpointing, world_size,
                          seq_len, micro_batch, dtype, optimizer, lora_r if method != "full" else 0, trainable,
                          gpu_weights, gpu_grads, gpu_master, gpu_states, acts, cpu)


@dataclass(frozen=True)
class Candidate:
    estimate: MemoryEstimate
    fits: bool


@dataclass(frozen=True)
class Recommendation:
    candidates: list  # of Candidate, fastest first
    choice: Candidate | None  # fastest that fits
    budget: float  # usable bytes per GPU after headroom
    gpu_memory_gb: float
    gpus_per_node: int


def speed_rank(est: MemoryEstimate) -> tuple:
    """Fastest first: no offload > optimizer offload > parameter offload, then lower ZeRO
    stage (less communication), then no gradient checkpointing (~1/3 more compute)."""
    return (OFFLOADS.index((est.offload_optimizer, est.offload_params)), est.zero_stage, est.gradient_checkpointing)


def recommend(shape: ModelShape, nodes: int = 1, gpus_per_node: int = 8, gpu_memory_gb: float = 80.0,
              seq_len: int = 2048, micro_batch: int = 1, method: str = "full", headroom: float = 0.15,
              cpu_memory_gb: float | None = None, **estimate_kwargs) -> Recommendation:
    """Every valid ZeRO x offload x checkpointing setup, and the fastest one that fits on the
    GPU (and, when cpu_memory_gb per node is given, whose offloaded state fits the host)."""
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom: got {headroom}, allowed: 0 <= x < 1")
    budget = gpu_memory_gb * GB * (1 - headroom)
    opt = OPTIMIZER_ALIASES.get(estimate_kwargs.get("optimizer", "adamw"), estimate_kwargs.get("optimizer", "adamw"))
    out = []
    for stage in range(4):
        for off_opt, off_par in OFFLOADS:
            if (off_opt and (stage == 0 or opt not in OFFLOAD_OPTIMIZERS)) or (off_par and stage != 3):
                continue
            for ckpt in (False, True):
                est = estimate(shape, method, stage, off_opt, off_par, nodes * gpus_per_node, seq_len, micro_batch,
                               ckpt, **estimate_kwargs)
                host_ok = cpu_memory_gb is None or est.cpu_bytes * gpus_per_node <= cpu_memory_gb * GB * (1 - headroom)
                out.append(Candidate(est, est.total <= budget and host_ok))
    out.sort(key=lambda c: speed_rank(c.estimate))
    choice = next((c for c in out if c.fits), None)
    return Recommendation(out, choice, budget, gpu_memory_gb, gpus_per_node)
