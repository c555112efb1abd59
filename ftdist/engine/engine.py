"""The one owner of DeepSpeed: config, model construction under ZeRO-3, initialize, backward/step,
gathered weights, HF export, engine state for checkpoints.

`backward` is DeepSpeed's, without its 1/accumulation scaling; how the loss is
normalised over a step is decided in one place, train/step.py.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
from typing import Optional

import torch

from ftdist.config import Config, ConfigError, ds_config_path
from ftdist.engine.dist import DistInfo
from ftdist.errors import UserError
from ftdist.models.loading import decay_param_groups
from ftdist.models.preflight import check_precision

log = logging.getLogger("ftdist")

def build_ds_config(cfg: Config, world_size: int, grad_accum: int) -> dict:
    check_precision(cfg.model)
    path = ds_config_path(cfg)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {e}") from None
    t = cfg.train
    auto = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": t.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
    }
    for k, v in auto.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
        elif ds[k] != v:
            raise ConfigError(f"deepspeed.config: {path} sets {k}={ds[k]} but the recipe gives {v}; "
                              f"set it to \"auto\" so ftdist fills it from the recipe")
    ds.setdefault("bf16", {})["enabled"] = cfg.model.dtype == "bf16"
    ds.setdefault("fp16", {})["enabled"] = cfg.model.dtype == "fp16"
    if cfg.deepspeed.zero_stage == 0 and cfg.model.dtype == "fp32":
        # DeepSpeed clips fp32 ZeRO-0 gradients without keeping the norm; the Engine clips (same rule) and
        # reports it, like every other configuration
        ds["gradient_clipping"] = 0.0
    z = ds.setdefault("zero_optimization", {})
    # the recipe decides stage and offload; the JSON supplies the tuning knobs
    z["stage"] = cfg.deepspeed.zero_stage
    pin = torch.cuda.is_available()
    if cfg.deepspeed.offload_optimizer:
        z["offload_optimizer"] = {**z.get("offload_optimizer", {}), "device": "cpu", "pin_memory": pin}
    else:
        z.pop("offload_optimizer", None)
    if cfg.deepspeed.offload_params:
        z["offload_param"] = {**z.get("offload_param", {}), "device": "cpu", "pin_memory": pin}
    else:
        z.pop("offload_param", None)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


# A JIT build of a DeepSpeed op holds a `lock` file in its build folder; a process killed mid-build leaves it
# behind and every later process waits on it forever. No build takes this long, so an older lock is stale.
STALE_BUILD_LOCK_S = 15 * 60


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[str]:
    """Remove op-build locks older than max_age_s under the torch extensions folder; returns what was removed."""
    import glob
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    removed = []
    for lock in glob.glob(os.path.join(root, "**", "lock"), recursive=True):
        try:
            if time.time() - os.path.getmtime(lock) > max_age_s:
                os.remove(lock)
                removed.append(lock)
        except OSError:
            continue
    for lock in removed:
        log.warning("removed a stale op-build lock left by a killed build: %s", lock)
    return removed


@functools.cache
def _prepare_deepspeed_ops() -> None:
    """Once per process, before DeepSpeed first builds or loads an op."""
    import deepspeed.ops

    clear_stale_build_locks()
    # DeepSpeed's CPU shared-memory all-reduce serves only its inference all-reduce, never training; skipping
    # it saves a compiler run (g++, about a minute) on the first start of every machine
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _init_deepspeed_comm(info_backend: str) -> None:
    """deepspeed.comm wraps the torch process group we already created; it must know about it."""
    import deepspeed

    _prepare_deepspeed_ops()
    deepspeed.init_distributed(dist_backend=info_backend, auto_mpi_discovery=False)


@contextlib.contextmanager
def model_init_context(cfg: Config, world_size: int, grad_accum: int):
    """Under ZeRO-3, parameters are partitioned as from_pretrained creates them: no rank ever holds the whole model.

    Yields the HfDeepSpeedConfig that tells transformers so (None below ZeRO-3). transformers keeps only a
    weak reference to it, and later calls (generation, saving) ask it again: whoever builds the model keeps
    the yielded object as long as the model lives (the Engine does).
    """
    if cfg.deepspeed.zero_stage != 3:
        yield None
        return
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    _init_deepspeed_comm(dist.get_backend())
    zero3 = HfDeepSpeedConfig(build_ds_config(cfg, world_size, grad_accum))  # alive for the block at least
    yield zero3


@contextlib.contextmanager
def whole_model_context():
    """Models built inside the block are whole (not partitioned), even while a ZeRO-3 engine lives: transformers
    asks a global reference to the live HfDeepSpeedConfig, which is set aside for the block."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _build_optimizer(cfg: Config, param_groups: list[dict]):
    from ftdist.engine.optim import build_optimizer

    return build_optimizer(cfg.train, param_groups, offload=cfg.deepspeed.offload_optimizer)


class UnsafeCheckpointError(UserError):
    """A checkpoint file holds objects other than tensors, plain containers and DeepSpeed's own state types."""


class CheckpointError(UserError):
    """A file a run reads back (checkpoint, RNG state, trainer state) that is damaged: the message names it."""


def _deepspeed_checkpoint_types() -> list:
    """The non-tensor types DeepSpeed writes into its checkpoints (found by loading every ZeRO stage, bf16,
    offload and QLoRA checkpoint weights-only); nothing else may be unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_TORCH_LOAD = torch.load  # the real one, also while engine/universal.py stands in for torch.load


def safe_checkpoint_load(path: str, map_location=None):
    """torch.load(weights_only=True) with DeepSpeed's own state types allowed, and a clear refusal otherwise."""
    import pickle

    with torch.serialization.safe_globals(_deepspeed_checkpoint_types()):
        try:
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's own lines around the reason: how weights_only changed, where to file an issue, the docs
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith(
                ("Weights only load failed", "Please file an issue", "Check the documentation"))]
            why = lines[0] if lines else type(e).__name__
            if "GLOBAL" not in why:  # not an object it refused, but bytes that are no pickle it knows
                raise CheckpointError(f"{path}: damaged: not a file torch.save wrote ({why})") from None
            raise UnsafeCheckpointError(
                f"{path}: refused to load: it holds objects that are not checkpoint state ({why}); ftdist never "
                f"runs code from checkpoint files. Was this file written by ftdist?") from None


class Engine:
    """A DeepSpeed engine around one trainable model, with the calls the step function and checkpoints need.

    `build()` makes the model; the Engine calls it inside ZeRO-3's partitioning context.
    """

    def __init__(self, build, cfg: Config, info: DistInfo, *, grad_accum: int, total_steps: int):
        import deepspeed
        from transformers import get_scheduler

        self.cfg, self.info, self.grad_accum = cfg, info, grad_accum
        with model_init_context(cfg, info.world_size, grad_accum) as self._zero3_init:
            model = build()
        _init_deepspeed_comm(info.backend)
        self.ds_config = build_ds_config(cfg, info.world_size, grad_accum)
        optimizer = _build_optimizer(cfg, decay_param_groups(model, cfg.train.weight_decay))
        scheduler = get_scheduler(cfg.train.scheduler, optimizer, num_warmup_steps=cfg.train.warmup(total_steps),
                                  num_training_steps=total_steps,
                                  scheduler_specific_kwargs=dict(cfg.train.scheduler_kwargs) or None)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=copy.deepcopy(self.ds_config),
            dist_init_required=False)
        self.device = self.engine.device
        if info.world_size == 1 and self.zero_stage == 0:
            # one rank: DeepSpeed would still flatten every gradient, all-reduce it with itself and copy it
            # back, each step (6% of a CPU step of a 27M model, measured)
            self.engine.enable_backward_allreduce = False
        self._own_clipping = self.zero_stage == 0 and cfg.model.dtype == "fp32"  # see build_ds_config
        self._grad_norm: Optional[float] = None

    # -- training -------------------------------------------------------------------------------
    @property
    def module(self):
        return self.engine.module

    def train(self, mode: bool = True):
        self.engine.train(mode)

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        # the caller (train/step.py) has normalised the loss over the whole step
        self.engine.backward(loss, scale_wrt_gas=False)

    def accumulation_boundary(self, last: bool) -> None:
        """Before each micro-batch's forward: whether it is the last of its optimizer step (then its backward
        completes the gradient reduction and step() updates), however many micro-batches the step holds."""
        self.engine.set_gradient_accumulation_boundary(last)

    def step(self) -> None:
        if self._own_clipping and self.engine.is_gradient_accumulation_boundary():
            # the gradients are complete here (ZeRO-0 all-reduces them in the boundary's backward)
            params = [p for p in self.module.parameters() if p.grad is not None]
            max_norm = self.cfg.train.max_grad_norm
            norm = (torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0
                    else torch.nn.utils.get_total_norm([p.grad for p in params]))
            self._grad_norm = float(norm)
            if not math.isfinite(self._grad_norm):
                # no update from non-finite gradients, as DeepSpeed's other paths do: the optimizer skips
                # parameters without a gradient (its state too)
                for p in params:
                    p.grad = None
        self.engine.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.scheduler is None else float(self.scheduler.get_last_lr()[0])

    def grad_norm(self) -> Optional[float]:
        """The last step's gradient norm before clipping."""
        if self._own_clipping:
            return self._grad_norm
        g = self.engine.get_global_grad_norm()
        if g is None:
            return None
        return float(g.item() if isinstance(g, torch.Tensor) else g)

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage()

    # -- weights --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def gathered(self, params=None, modifier_rank: Optional[int] = None):
        """Full parameters on every rank inside the block (a no-op below ZeRO-3)."""
        if self.zero_stage != 3:
            yield
            return
        import deepspeed

        params = list(params if params is not None else self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield

    def full_state_dict(self) -> Optional[dict]:
        """The module's state dict with whole tensors on rank 0 (None on other ranks under ZeRO-3)."""
        if self.zero_stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            return sd if self.info.is_main else None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    @property
    def is_peft(self) -> bool:
        from ftdist.models.adapters import is_peft_model

        return is_peft_model(self.module)

    def trainable_state_dict(self) -> Optional[dict]:
        """Whole tensors of the trainable parameters (the LoRA adapter and modules_to_save) on rank 0.

        Under ZeRO-3 only these are gathered: the frozen, possibly 4-bit base never
        leaves its shards, so saving an adapter costs the adapter's size.
        """
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        with self.gathered([p for _, p in named]):
            if not self.info.is_main:
                return None
            return {n: p.detach().cpu().clone() for n, p in named}

    def export_hf(self, out_dir: str, tokenizer=None) -> None:
        """Hugging Face format (safetensors) with the tokenizer; collective under ZeRO-3.

        A peft model is written as its adapter only (adapter_model.safetensors +
        adapter_config.json); `ftdist merge` turns it into a full model.
        """
        sd = self.trainable_state_dict() if self.is_peft else self.full_state_dict()
        if self.info.is_main:
            os.makedirs(out_dir, exist_ok=True)
            sd = {k: v.contiguous().cpu() for k, v in sd.items()}
            if self.is_peft:
                # embeddings are never resized here; `auto` would look the base model up on the hub
                self.module.save_pretrained(out_dir, state_dict=sd, safe_serialization=True,
                                            save_embedding_layers=False)
            else:
                self.module.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(out_dir)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_state(self, ckpt_dir: str, client_state: dict) -> None:
        # a LoRA run never changes its frozen base, so checkpoints leave it out (it reloads from model.name_or_path)
        self.engine.save_checkpoint(ckpt_dir, tag="engine", client_state=client_state, save_latest=False,
                                    exclude_frozen_parameters=self.is_peft)

    def load_state(self, ckpt_dir: str, universal: bool = False) -> dict:
        """universal: ckpt_dir holds DeepSpeed's universal form of the state (engine/universal.py), saved by
        another number of ranks."""
        from ftdist.engine.universal import weights_only_torch_load

        # DeepSpeed reads its files with torch.load(weights_only=False), which runs whatever code a crafted file
        # carries; its reader is swapped for a weights-only one that knows DeepSpeed's few own types (the
        # universal loader calls torch.load itself: it is made weights-only for the call)
        reader = self.engine.checkpoint_engine
        reader.load = safe_checkpoint_load
        self.engine._config.load_universal_checkpoint = universal
        # ZeRO-3's universal loader gives every parameter group the hyperparameters of the first (weight decay
        # then also applies to norms and biases), and one shared step-count tensor, which Adam advances in place
        # once per group (the bias correction then runs ahead). Each group's own values come from the recipe,
        # which a resume may not change, so they are put back (the learning rate is the checkpoint's, the same
        # in every group), and each state gets its own step count.
        groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.optimizer.param_groups]
        try:
            # without the frozen base the module state is partial; bitsandbytes' quant-state entries are not
            # parameters, so DeepSpeed keeps them and strict loading would reject them
            with weights_only_torch_load() if universal else contextlib.nullcontext():
                path, client_state = self.engine.load_checkpoint(ckpt_dir, tag="engine", load_optimizer_states=True,
                                                                 load_lr_scheduler_states=True,
                                                                 load_module_strict=not self.is_peft)
        finally:
            del reader.load
            self.engine._config.load_universal_checkpoint = False
        if universal:
            for group, own in zip(self.optimizer.param_groups, groups):
                group.update(own)
            for state in self.optimizer.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
        if path is None:
            raise RuntimeError(f"{ckpt_dir}: DeepSpeed could not load the engine state")
        return client_state or {}


class FrozenEngine:
    """A model used for inference only (the DPO reference), partitioned like the policy.

    Under ZeRO-3 it gets its own DeepSpeed engine with no optimizer, so its
    parameters stay sharded and are gathered layer by layer in each forward,
    exactly as the policy's are; every rank must then run the same number of
    forwards. Below ZeRO-3 a frozen copy simply sits on the device.
    `build()` is called inside the ZeRO-3 model-init context.
    """

    def __init__(self, build, cfg: Config, info: DistInfo, grad_accum: int):
        from ftdist.engine.dist import device_for

        with model_init_context(cfg, info.world_size, grad_accum) as self._zero3_init:
            model = build()
        model.requires_grad_(False)
        model.eval()
        self.engine = None
        if cfg.deepspeed.zero_stage == 3:
            import deepspeed

            _init_deepspeed_comm(info.backend)
            ds = build_ds_config(cfg, info.world_size, grad_accum)
            ds["zero_optimization"].pop("offload_optimizer", None)
            self.engine, *_ = deepspeed.initialize(model=model, config=ds, dist_init_required=False)
            self.engine.eval()
            self.module = self.engine.module
        else:
            self.module = model.to(device_for(info))

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return (self.engine or self.module)(*args, **kwargs)

    def close(self) -> None:
        """Free the weights (e.g. after reference log-probs were precomputed)."""
        if self.engine is not None:
            self.engine.destroy()
        self.engine = self.module = None
