"""The logic of each PPO actor group, as plain in-process classes (no Ray here).

Every worker is one rank of its own group: `init_distributed` reads the RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT that the actor group set for it, so the
policy, critic, reference and reward groups are separate process groups and
separate DeepSpeed worlds. Methods take and return CPU tensors (Experience shards
and plain dicts), which is what Ray ships between groups as object refs; the same
classes run in one process in tests.

The critic is the reward-model architecture (models/heads.py: the model's body
with a one-output `score` layer on every position), started from the reward
model or from the policy with a new head; its value of the prefix before each
response token is read at the same columns as the log-probs (experience.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import math
from collections import defaultdict
from pathlib import Path

import torch

from ftdist.algos.ppo import entropy_from_logits, kl_penalty, policy_loss, value_loss
from ftdist.algos.reward import gather_last
from ftdist.algos.sft import masked_mean
from ftdist.config import ConfigError
from ftdist.engine.checkpoint import load_engine_state, save_engine_state
from ftdist.engine.dist import device_for, init_distributed
from ftdist.run.logs import setup_logging
from ftdist.run.seeding import derive_seed, seed_everything
from ftdist.rl.experience import (Experience, Rollout, action_logprobs, action_values, position_ids)
from ftdist.train.step import optimizer_step


def update_steps(cfg) -> int:
    """Optimizer steps of a whole run (the learning-rate schedule's length)."""
    p = cfg.ppo
    return p.iterations * p.ppo_epochs * (p.rollout_batch_size * p.samples_per_prompt // p.mini_batch_size)


def engine_config(cfg, lr: float):
    """The recipe as the Engine reads it: a mini-batch is one optimizer step, at this group's learning rate."""
    train = dataclasses.replace(cfg.train, global_batch_size=cfg.ppo.mini_batch_size, lr=lr)
    return dataclasses.replace(cfg, train=train)


def load_reward_fn(spec: str):
    module_name, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"ppo.reward_fn: cannot load {spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"ppo.reward_fn: {spec!r} is not a function")
    return fn


def call_reward_fn(fn, prompts: list[str], responses: list[str], extras: dict[str, list]) -> torch.Tensor:
    """fn(prompts, responses, **columns) -> (B,) float32; only the columns its signature names are passed."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in extras.items() if takes_any or k in params}
    scores = list(fn(prompts, responses, **kwargs))
    name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__name__', '?')}"
    if len(scores) != len(responses):
        raise ValueError(f"reward function {name} returned {len(scores)} scores for {len(responses)} responses")
    bad = [s for s in scores if not isinstance(s, (int, float)) or not math.isfinite(float(s))]
    if bad:
        raise ValueError(f"reward function {name} returned {bad[0]!r}; every score must be a finite number")
    return torch.tensor([float(s) for s in scores], dtype=torch.float32)


def _inputs(exp: Experience, device) -> dict:
    am = exp.attention_mask.to(device)
    return {"input_ids": exp.sequences.to(device), "attention_mask": am, "position_ids": position_ids(am)}


class _Worker:
    """One rank of a group: its process group, logging and seeds."""

    def __init__(self, cfg, distributed: bool = True):
        self.cfg, self.p = cfg, cfg.ppo
        self.info = init_distributed(cfg.dist.backend, cfg.dist.timeout_s) if distributed else None
        setup_logging(self.info is None or self.info.is_main)
        seed_everything(cfg.seed)
        self.device = device_for(self.info) if distributed else torch.device("cpu")
        self.micro = cfg.train.micro_batch_size

    def _per_chunk(self, exp: Experience, fn) -> torch.Tensor:
        """fn over micro-batches of rows of similar length, each trimmed of its all-padding columns; the results
        ((b,) or (b, R') per micro-batch) back in the rows' order on the CPU, (B,) or (B, R)."""
        order = exp.by_length()
        parts = []
        for start in range(0, exp.batch_size, self.micro):
            y = fn(exp.select(order[start:start + self.micro]).trimmed()).float().cpu()
            parts.append(torch.nn.functional.pad(y, (0, exp.num_actions - y.size(1))) if y.dim() == 2 else y)
        ordered = torch.cat(parts)
        out = torch.empty_like(ordered)
        out[order] = ordered
        return out


class _TrainedWorker(_Worker):
    """A worker around a trainable Engine: the shared optimizer step, and its share of a checkpoint."""

    def _build_engine(self, build, lr: float):
        from ftdist.engine.engine import Engine

        self.grad_accum = self.p.mini_batch_size // (self.micro * self.info.world_size)
        return Engine(build, engine_config(self.cfg, lr), self.info, grad_accum=self.grad_accum,
                      total_steps=update_steps(self.cfg))

    def save(self, state_dir: str) -> None:
        """Collective over the group: this rank's engine shards and RNG state (the driver commits the checkpoint)."""
        save_engine_state(self.engine, Path(state_dir))

    def load(self, state_dir: str) -> None:
        load_engine_state(self.engine, Path(state_dir))

    def _update(self, exp: Experience, iteration: int, loss_fn) -> dict[str, float]:
        """ppo_epochs passes over this rank's shard in seeded mini-batches; one optimizer step per mini-batch.

        loss_fn(micro) returns the token means of a micro-batch (the algos' form); they become sums over its
        response tokens here, and the step function divides by the mini-batch's tokens over all ranks.
        """
        per_rank = self.p.mini_batch_size // self.info.world_size

        def token_sums(micro: Experience):
            micro = micro.to(self.device)
            n = micro.action_mask.sum()
            loss, metrics = loss_fn(micro)
            return loss * n, {k: v.detach() * n for k, v in metrics.items()}

        sums: dict[str, float] = defaultdict(float)
        tokens = 0.0
        grad_norms = []
        self.engine.train()
        for epoch in range(self.p.ppo_epochs):
            gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, iteration, epoch))
            order = torch.randperm(exp.batch_size, generator=gen)
            for start in range(0, exp.batch_size, per_rank):
                # this step's rows: micro-batches of rows of similar length, trimmed (the step's gradient is
                # the sum over its micro-batches, whatever their order)
                step_rows = exp.select(order[start:start + per_rank])
                step_rows = step_rows.select(step_rows.by_length())
                micro = [m.trimmed() for m in step_rows.chunks(self.micro)]
                result = optimizer_step(self.engine, micro, [float(m.action_mask.sum()) for m in micro], token_sums)
                for k, v in result.sums.items():
                    sums[k] += v
                tokens += result.units
                if result.grad_norm is not None:
                    grad_norms.append(result.grad_norm)
        out = {k: v / max(tokens, 1.0) for k, v in sums.items()}
        out["lr"] = self.engine.lr
        if grad_norms:
            out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        return out


class PolicyWorker(_TrainedWorker):
    """Generates rollouts, gives log-probs, runs the clipped PPO update. Weights never leave the group."""

    def __init__(self, cfg):
        super().__init__(cfg)
        from ftdist.models.adapters import apply_lora
        from ftdist.models.loading import load_causal_lm, load_tokenizer

        from ftdist.rl.rollout import rollout_engine

        self.tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)

        def build():
            return apply_lora(load_causal_lm(cfg.model), cfg.model)

        self.engine = self._build_engine(build, cfg.train.lr)
        # ppo.ref_ranks=0: the reference sits beside the policy on its ranks (partitioned like it under ZeRO-3)
        self.reference = frozen_reference(cfg, self.info) if cfg.model.lora is None and cfg.ppo.ref_ranks == 0 else None
        self.rollout = rollout_engine(cfg.ppo.rollout_engine, self.engine, self.tokenizer, cfg, self.info, build=build)

    def generate(self, prompts: list[str], seed, refresh: bool = True) -> Rollout:
        """Sample (seed given) or greedy-decode (seed None) one response per prompt; stops at EOS.

        refresh=False: decode with the rollout engine's weights as they are (a rollout running beside an update
        must not copy weights the update is changing: the driver calls refresh_rollout first)."""
        return self.rollout.generate(prompts, seed, self.device, refresh=refresh)

    def refresh_rollout(self) -> None:
        """Bring the rollout engine's weights up to date now (collective under ZeRO-3)."""
        self.rollout.refresh()

    def _logits(self, exp: Experience) -> torch.Tensor:
        # log-probs of the tempered distribution that sampled the tokens, for policy and reference alike
        logits = self.engine.forward(**_inputs(exp, self.device), use_cache=False).logits  # (b, S, V)
        return logits.float() / self.p.temperature

    @torch.no_grad()
    def logprobs(self, exp: Experience, reference: bool = False) -> torch.Tensor:
        """(B, R) log-probs of the response tokens; reference=True (no reference group): the frozen reference this
        rank holds (ppo.ref_ranks=0), or the policy with its LoRA adapter off."""
        from ftdist.models.adapters import adapter_disabled

        if reference and self.reference is not None:
            return _reference_logprobs(self, self.reference, exp)
        was_training = self.engine.module.training
        self.engine.train(False)
        try:
            with adapter_disabled(self.engine.module) if reference else contextlib.nullcontext():
                return self._per_chunk(exp, lambda c: action_logprobs(self._logits(c), c.sequences.to(self.device),
                                                                      c.num_actions))
        finally:
            self.engine.train(was_training)

    def train(self, exp: Experience, iteration: int, kl_coef: float) -> dict[str, float]:
        p = self.p

        def loss_fn(micro: Experience):
            logits = self._logits(micro)  # (b, S, V)
            R, mask = micro.num_actions, micro.action_mask
            logp = action_logprobs(logits, micro.sequences, R)  # (b, R)
            loss, m = policy_loss(logp, micro.old_logp, micro.advantages, mask, p.clip_eps)
            metrics = {"policy_loss": loss.detach(), **m}
            response_logits = logits[:, -R - 1:-1]  # (b, R, V)
            if p.entropy_coef > 0:
                entropy = masked_mean(entropy_from_logits(response_logits), mask)
                loss = loss - p.entropy_coef * entropy
            else:
                with torch.no_grad():
                    entropy = masked_mean(entropy_from_logits(response_logits), mask)
            metrics["entropy"] = entropy.detach()
            if p.algorithm == "grpo" and kl_coef > 0:
                kl = masked_mean(kl_penalty(logp, micro.ref_logp, p.kl), mask)
                loss = loss + kl_coef * kl
                metrics["kl_loss"] = kl.detach()
            return loss, metrics

        stats = self._update(exp, iteration, loss_fn)
        self.rollout.sync_weights()
        return stats

    def load(self, state_dir: str) -> None:
        super().load(state_dir)
        self.rollout.sync_weights()

    def export(self, out_dir: str) -> None:
        """final/ in Hugging Face format with the tokenizer (collective under ZeRO-3)."""
        self.engine.export_hf(out_dir, self.tokenizer)


def critic_source(cfg) -> str:
    p = cfg.ppo
    use_rm = p.critic_init == "reward_model" or (p.critic_init == "auto" and p.reward_model is not None)
    return p.reward_model if use_rm else cfg.model.name_or_path


class CriticWorker(_TrainedWorker):
    """Values of every response prefix, and the clipped value update."""

    def __init__(self, cfg):
        super().__init__(cfg)
        from ftdist.models.heads import load_reward_model
        from ftdist.models.loading import load_tokenizer, side_model_config

        # every weight of the critic trains, so it loads in full precision even beside a quantised (QLoRA) policy
        model_cfg = side_model_config(cfg.model, critic_source(cfg), quantized=False, trained=True)
        pad = load_tokenizer(cfg.model, cfg.data.chat_template).pad_token_id
        self.engine = self._build_engine(
            lambda: load_reward_model(model_cfg, "sequence_classification", pad, seed=cfg.seed), cfg.ppo.critic_lr)

    def _values(self, exp: Experience) -> torch.Tensor:
        from ftdist.models.heads import token_values

        values = token_values(self.engine.forward, self.engine.module, _inputs(exp, self.device))  # (b, S)
        return action_values(values, exp.num_actions)  # (b, R)

    @torch.no_grad()
    def values(self, exp: Experience) -> torch.Tensor:
        self.engine.train(False)
        try:
            return self._per_chunk(exp, self._values)
        finally:
            self.engine.train(True)

    def train(self, exp: Experience, iteration: int) -> dict[str, float]:
        def loss_fn(micro: Experience):
            values = self._values(micro)  # (b, R)
            loss, m = value_loss(values, micro.values, micro.returns, micro.action_mask, self.p.value_clip_eps)
            return self.p.vf_coef * loss, {"value_loss": loss.detach(), **m}

        return self._update(exp, iteration, loss_fn)


def frozen_reference(cfg, info):
    """The starting policy, frozen (partitioned over the group's ranks under ZeRO-3): the same base, quantised as
    the policy is, so that the first KL is 0."""
    from ftdist.engine.engine import FrozenEngine
    from ftdist.models.loading import load_causal_lm, side_model_config

    model_cfg = side_model_config(cfg.model)
    return FrozenEngine(lambda: load_causal_lm(model_cfg), cfg, info, grad_accum=1)


@torch.no_grad()
def _reference_logprobs(worker: _Worker, frozen, exp: Experience) -> torch.Tensor:
    def one(c: Experience):
        logits = frozen.forward(**_inputs(c, worker.device), use_cache=False).logits  # (b, S, V)
        return action_logprobs(logits.float() / worker.p.temperature, c.sequences.to(worker.device), c.num_actions)

    return worker._per_chunk(exp, one)


class ReferenceWorker(_Worker):
    """Frozen log-probs of the starting policy (partitioned like the policy under ZeRO-3)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.frozen = frozen_reference(cfg, self.info)

    def logprobs(self, exp: Experience) -> torch.Tensor:
        return _reference_logprobs(self, self.frozen, exp)


class RewardWorker(_Worker):
    """Scores: a learned reward model at the last real token, or a Python function of the texts."""

    def __init__(self, cfg):
        learned = cfg.ppo.reward_fn is None
        super().__init__(cfg, distributed=learned)  # a reward function needs no process group
        self.fn = self.frozen = None
        if not learned:
            self.fn = load_reward_fn(cfg.ppo.reward_fn)
            return
        from ftdist.engine.engine import FrozenEngine
        from ftdist.models.heads import load_reward_model
        from ftdist.models.loading import load_tokenizer, side_model_config

        # another model than the policy: its own full-precision weights, so that it scores as it was trained to
        model_cfg = side_model_config(cfg.model, cfg.ppo.reward_model, quantized=False)
        pad = load_tokenizer(cfg.model, cfg.data.chat_template).pad_token_id
        self.frozen = FrozenEngine(lambda: load_reward_model(model_cfg, "sequence_classification", pad), cfg,
                                   self.info, grad_accum=1)

    @torch.no_grad()
    def score(self, exp: Experience) -> torch.Tensor:
        """(B,) float32."""
        if self.fn is not None:
            return call_reward_fn(self.fn, exp.prompts, exp.responses, exp.extras)
        from ftdist.models.heads import token_values

        def one(c: Experience):
            inputs = _inputs(c, self.device)
            values = token_values(self.frozen.forward, self.frozen.module, inputs)  # (b, S)
            return gather_last(values, inputs["attention_mask"])  # (b,)

        return self._per_chunk(exp, one)


WORKERS = {"policy": PolicyWorker, "critic": CriticWorker, "ref": ReferenceWorker, "reward": RewardWorker}
