"""Reference log-probs for DPO: a frozen model, the policy with its adapter off, or a precomputed table.

Everything here is collective: every rank asks for the same number of batches
in the same order (the loop and evaluation guarantee it), because a ZeRO-3
reference gathers its weights in each forward. The reference is built on
first use, after the policy engine exists and any checkpoint was restored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch

from ftdist.data.loading import content_digest
from ftdist.engine.dist import all_reduce_sum, barrier, rank_batches
from ftdist.engine.engine import FrozenEngine, UnsafeCheckpointError, safe_checkpoint_load
from ftdist.models.forward import causal_logits
from ftdist.models.loading import describe_weights, load_causal_lm, side_model_config
from ftdist.run.disk import fmt_bytes, free_bytes, out_of_space
from ftdist.train.pairs import sequence_logps

log = logging.getLogger("ftdist")


def reference_mode(cfg) -> str:
    mode = cfg.dpo.reference
    if mode == "auto":
        return "adapter_disabled" if cfg.model.lora is not None and cfg.dpo.reference_model is None else "model"
    return mode


class Reference:
    """`logps(engine, batch)` -> (2B,) float32 summed response log-probs under the reference, no gradient."""

    def __init__(self, task):
        self.task, self.cfg = task, task.cfg
        self.mode = reference_mode(self.cfg)
        self.frozen = None
        self.table: dict[str, torch.Tensor] = {}  # split -> (N, 2) [chosen, rejected] for "precomputed"

    def _uses_adapter(self) -> bool:
        return self.cfg.model.lora is not None and self.cfg.dpo.reference_model is None

    def _adapter_off(self) -> bool:
        """The reference forward is the policy's own with its adapter off (no second model)."""
        return self.mode == "adapter_disabled" or (self.mode == "precomputed" and self._uses_adapter())

    def _model_cfg(self):
        """The frozen reference: the policy's base (or dpo.reference_model) loaded as the policy's was, quantised
        alike, so that it starts equal to the policy."""
        return side_model_config(self.cfg.model, self.cfg.dpo.reference_model)

    def _source(self) -> str:
        if self._adapter_off():
            return f"the policy with its LoRA adapter disabled (its base, {describe_weights(self.cfg.model)})"
        return f"a frozen copy of {describe_weights(self._model_cfg())}"

    def describe(self) -> str:
        """The one log line's words for what the reference is."""
        return ("precomputed once from " if self.mode == "precomputed" else "") + self._source()

    @torch.no_grad()
    def logps(self, engine, batch) -> torch.Tensor:
        if self.mode == "precomputed":
            if not self.table:
                self._precompute(engine)
            ref = self.table[batch.split][batch.index.cpu()]  # (B, 2)
            return torch.cat([ref[:, 0], ref[:, 1]]).to(engine.device, torch.float32)
        return self._forward_logps(engine, batch)

    def _forward_logps(self, engine, batch) -> torch.Tensor:
        task = self.task
        if self._adapter_off():
            from ftdist.models.adapters import adapter_disabled

            with adapter_disabled(engine.module):
                logits = causal_logits(engine.forward, batch, task.attn_impl, task.dtype)  # (R, T, V)
        else:
            if self.frozen is None:
                self.frozen = self._build_frozen(engine)
            logits = causal_logits(self.frozen.forward, batch, task.attn_impl, task.dtype)  # (R, T, V)
        return sequence_logps(logits, batch)  # (2B,)

    def _build_frozen(self, engine):
        ref_cfg = self._model_cfg()
        log.debug("reference: loading %s (frozen, ZeRO-%d)", describe_weights(ref_cfg), engine.zero_stage)
        return FrozenEngine(lambda: load_causal_lm(ref_cfg), self.cfg, engine.info, engine.grad_accum)

    # -- precomputed ----------------------------------------------------------------------------
    def _weights_digest(self) -> str:
        """The reference weights' content (the model files, not their path): weights replaced at the same path
        must not reuse log-probs computed from the old ones."""
        from ftdist.models.loading import resolve_model_path

        path = resolve_model_path(self.cfg.dpo.reference_model or self.cfg.model.name_or_path)
        return content_digest(path, (".safetensors", ".bin", ".json")) if os.path.exists(path) else path

    def _cache_file(self, split: str, data) -> Path:
        # the weights' content and how they are loaded (dtype, every quantisation setting) decide the log-probs
        src = f"{self._source()}|{self._weights_digest()}|{self.cfg.model.quantization}"
        key = hashlib.sha256(f"{data.key}|{src}|{self.cfg.model.dtype}|v2".encode()).hexdigest()[:16]
        return Path(self.task.cache_dir) / f"ref-logps-{split}-{key}.pt"

    def _precompute(self, engine) -> None:
        """All ranks: each scores its share of the pairs, the shares are summed, rank 0 writes the cache."""
        info = engine.info
        was_training = engine.module.training
        engine.train(False)
        try:
            for split, data in (("train", self.task.train), ("eval", self.task.eval)):
                if data is None:
                    continue
                path = self._cache_file(split, data)
                # every rank must take the same branch: a file half-seen (or found damaged) by one rank would hang
                # the others
                cached = None
                if all_reduce_sum([float(path.exists())], engine.device)[0] == info.world_size:
                    cached = _read_cache(path, len(data))
                    if all_reduce_sum([float(cached is not None)], engine.device)[0] == info.world_size:
                        self.table[split] = cached
                        log.info("reference log-probs (%s): cached %s", split, path)
                        continue
                if not self._adapter_off() and self.frozen is None:
                    self.frozen = self._build_frozen(engine)
                self.table[split] = self._score_split(engine, split, data)
                if info.is_main:
                    _write_cache(path, self.table[split])
                    log.info("reference log-probs (%s): %d pairs from %s -> %s", split, len(data), self._source(),
                             path)
                barrier()
        finally:
            if self.frozen is not None:
                self.frozen.close()
                self.frozen = None
            engine.train(was_training)

    def _score_split(self, engine, split: str, data) -> torch.Tensor:
        n = len(data)
        table = torch.zeros(n, 2, dtype=torch.float64)
        for chunk in rank_batches(n, self.cfg.train.micro_batch_size, engine.info):
            batch = self.task.collate([[i] for i in (chunk or [0])], split).to(engine.device)
            out = self._forward_logps(engine, batch).double().cpu()  # (2B,)
            if chunk:
                table[chunk] = torch.stack(out.chunk(2), dim=1)
        flat = all_reduce_sum(table.flatten().tolist(), engine.device)
        return torch.tensor(flat, dtype=torch.float32).view(n, 2)


def _read_cache(path: Path, n: int):
    """The cached (n, 2) table, or None (with a warning) for a damaged file, which is then computed again; a file
    that would run code when loaded is refused."""
    try:
        table = safe_checkpoint_load(str(path))
    except UnsafeCheckpointError:
        raise UnsafeCheckpointError(f"{path}: refused to load: this reference log-probs cache holds objects other "
                                    f"than tensors (nothing in it ran); delete it to compute the log-probs again, "
                                    f"and find out who wrote it") from None
    except Exception as e:  # truncated or overwritten: a cache, so it is rebuilt
        log.warning("%s: damaged reference log-probs cache (%s: %s); computing them again", path, type(e).__name__,
                    str(e).strip()[:200])
        return None
    if not (isinstance(table, torch.Tensor) and tuple(table.shape) == (n, 2)):
        log.warning("%s: not a (%d, 2) table of reference log-probs; computing them again", path, n)
        return None
    return table


def _write_cache(path: Path, table: torch.Tensor) -> None:
    """Written aside and renamed; without room on the disk the run goes on with the table in memory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="tmp-ref-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(table, tmp)
        os.replace(tmp, path)
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        if not out_of_space(e, tmp):
            raise
        log.warning("%s: not cached: no space left on the device (%s free); the log-probs are kept in memory", path,
                    fmt_bytes(free_bytes(path)))
