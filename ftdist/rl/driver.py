"""The PPO controller: one process that drives the actor groups through the phases of an iteration.

    1. draw       rollout_batch_size prompts (seeded order, resumable position)
    2. generate   samples_per_prompt responses each, on the policy ranks (their shard each)
    3. score      in parallel: reference log-probs, rewards, critic values, and the old policy's log-probs
                  unless the rollout engine recorded them as it sampled (fp32)
    4. advantages per-token KL penalty and the score at the last real token; GAE (or GRPO/RLOO/REINFORCE++)
    5. update     PPO epochs over mini-batches, policy and critic groups in parallel
    6. record     metrics.jsonl, progress bar, KL controller, evaluation and checkpoints

The weights stay where they are trained: the policy generates the next rollout
with the weights its own update just wrote (ppo.async_rollouts: from a copy taken
before the update, while the update runs). Only CPU tensors travel, as Ray object refs.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from ftdist.algos.ppo import AdaptiveKLController, FixedKLController
from ftdist.data.answers import exact_match
from ftdist.engine.checkpoint import (begin_checkpoint, checkpoint_space, commit_checkpoint, final_space, publish_dir,
                                      read_trainer_state)
from ftdist.rl import ray_shells as rs
from ftdist.rl.advantages import compute_advantages
from ftdist.rl.experience import Experience, merge_rollouts
from ftdist.rl.prompts import PromptSampler, PromptSet
from ftdist.run.lifecycle import RunFailure, StopRequest
from ftdist.run import testing
from ftdist.run.metrics import MetricsWriter, Progress
from ftdist.run.seeding import derive_seed

log = logging.getLogger("ftdist")


class PPODriver:
    def __init__(self, cfg, groups: dict[str, "rs.ActorGroup"], prompts: PromptSet, eval_prompts, pad_token_id: int,
                 run_id: str):
        self.cfg, self.p, self.groups, self.run_id = cfg, cfg.ppo, groups, run_id
        self.eval_prompts, self.pad = eval_prompts, pad_token_id
        self.sampler = PromptSampler(prompts, cfg.seed)
        p = self.p
        self.kl_ctl = (FixedKLController(p.kl_coef) if p.kl_target is None
                       else AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon))
        self.iteration, self.samples, self.elapsed = 0, 0, 0.0
        self.resumed_at: tuple | None = None  # (iteration, samples, elapsed) of the checkpoint this process loaded
        self.pending = None  # ppo.async_rollouts: (calls or their results, extras, draw position) of the next batch
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"

    def _get(self, *calls) -> list:
        return rs.get(*calls, timeout_s=self.p.call_timeout_s)

    # ---------------------------------------------------------------------------------- phases
    def _start_rollout(self, batch: PromptSet, iteration: int, refresh: bool = True) -> tuple:
        """The policy ranks' generate calls for a batch (not awaited), and the batch's other columns."""
        g = self.p.samples_per_prompt
        texts = [t for t in batch.texts for _ in range(g)]  # the G samples of a prompt stay contiguous
        extras = {k: [v for v in col for _ in range(g)] for k, col in batch.extras.items()}
        policy = self.groups["policy"]
        per_rank = len(texts) // policy.size
        shards = [texts[i * per_rank:(i + 1) * per_rank] for i in range(policy.size)]
        seeds = [derive_seed(self.cfg.seed, iteration, rank) for rank in range(policy.size)]
        return policy.starmap("generate", [(sh, sd, refresh) for sh, sd in zip(shards, seeds)]), extras

    def _finish_rollout(self, calls, extras) -> Experience:
        rollouts = calls if isinstance(calls, list) else self._get(calls)
        return Experience.from_rollout(merge_rollouts(rollouts, self.pad), extras)

    def generate(self, batch: PromptSet, iteration: int) -> Experience:
        return self._finish_rollout(*self._start_rollout(batch, iteration))

    def _settle(self) -> None:
        """Wait for the rollout running beside the update (before anything that may refresh the rollout weights)."""
        if self.pending is not None and not isinstance(self.pending[0], list):
            calls, extras, drawn_from = self.pending
            self.pending = (self._get(calls), extras, drawn_from)

    def score(self, exp: Experience) -> Experience:
        """Reference, reward, critic and old-policy passes run at the same time on their own groups."""
        tensors = exp.without_text()
        stored: dict[int, list] = {}  # groups of equal size share the same stored shards

        def shards(role: str) -> list:
            n = self.groups[role].size
            if n not in stored:
                stored[n] = rs.put_shards(tensors, n)
            return stored[n]

        pending = {}
        if exp.old_logp is None:  # the rollout engine gave no log-probs the training forward would give
            pending["old_logp"] = self.groups["policy"].map("logprobs", shards("policy"))
        if "ref" in self.groups:
            pending["ref_logp"] = self.groups["ref"].map("logprobs", shards("ref"))
        else:  # model.lora: the reference is the policy with its adapter switched off
            pending["ref_logp"] = self.groups["policy"].map("logprobs", shards("policy"), reference=True)
        if "critic" in self.groups:
            pending["values"] = self.groups["critic"].map("values", shards("critic"))
        reward = self.groups["reward"]
        # a reward function reads the texts; a reward model only the tokens
        scored = rs.put_shards(exp, reward.size) if self.p.reward_fn else shards("reward")
        pending["scores"] = reward.map("score", scored)
        for name, calls in pending.items():
            setattr(exp, name, torch.cat(self._get(calls)))
        return exp

    def update(self, exp: Experience, iteration: int, kl_coef: float) -> dict[str, float]:
        """Policy and critic train at the same time, each on its own shards of the batch."""
        tensors = exp.without_text()
        policy = self.groups["policy"]
        pending = {"policy": policy.map("train", rs.put_shards(tensors, policy.size), iteration, kl_coef)}
        if "critic" in self.groups:
            critic = self.groups["critic"]
            pending["critic"] = critic.map("train", rs.put_shards(tensors, critic.size), iteration)
        out = self._get(pending["policy"])[0]  # every rank returns the group's all-reduced statistics
        if "critic" in pending:
            critic_stats = self._get(pending["critic"])[0]
            out.update({f"critic/{k}" if k in ("lr", "grad_norm") else k: v for k, v in critic_stats.items()})
        return out

    # ------------------------------------------------------------------------------------- loop
    def iterate(self) -> dict:
        """One iteration, phase by phase; returns its metrics record."""
        p, it = self.p, self.iteration
        t0 = time.time()
        drawn_from = (self.sampler.epoch, self.sampler.position)
        try:
            if self.pending is not None:  # ppo.async_rollouts: generated beside the last update
                calls, extras, drawn_from = self.pending
                self.pending = None
                exp = self._finish_rollout(calls, extras)  # 2. generate (what of it did not overlap)
            else:
                batch = self.sampler.next_batch(p.rollout_batch_size)  # 1. draw
                exp = self.generate(batch, it)  # 2. generate
            t1 = time.time()
            exp = self.score(exp)  # 3. score
        except RunFailure:
            # nothing of this iteration has changed the policy or the critic yet: leave a checkpoint of the
            # last complete iteration to resume from, if the trained groups can still write theirs
            self.sampler.epoch, self.sampler.position = drawn_from
            self._save_what_is_left()
            raise
        t2 = time.time()
        kl_coef = self.kl_ctl.value
        exp, stats = compute_advantages(exp, p, kl_coef)  # 4. advantages
        if p.async_rollouts and it + 1 < p.iterations:
            # the next batch from the weights as they are now, generated while this one trains: its
            # importance ratio is against these weights (the log-probs its rollout records)
            self._get(self.groups["policy"].run("refresh_rollout"))
            next_from = (self.sampler.epoch, self.sampler.position)
            batch = self.sampler.next_batch(p.rollout_batch_size)
            self.pending = (*self._start_rollout(batch, it + 1, refresh=False), next_from)
        train_stats = self.update(exp, it, kl_coef)  # 5. update
        t3 = time.time()
        self.kl_ctl.update(stats["kl"], exp.batch_size)  # 6. record
        self.iteration, self.samples = it + 1, self.samples + exp.batch_size
        self.elapsed += t3 - t0
        tokens = int(exp.attention_mask.sum())
        epoch = self.sampler.epoch + self.sampler.position / len(self.sampler.prompts)
        return {"step": self.iteration, "epoch": round(epoch, 4), **stats, **train_stats,
                "loss": train_stats["policy_loss"], "tokens": tokens, "tokens_per_s": tokens / max(t3 - t0, 1e-9),
                "samples": self.samples, "samples_per_s": exp.batch_size / max(t3 - t0, 1e-9),
                "time/generate": t1 - t0, "time/score": t2 - t1, "time/train": t3 - t2,
                "elapsed_s": round(self.elapsed, 3)}

    def run(self, writer: MetricsWriter) -> dict:
        p, cfg = self.p, self.cfg
        evaluating = self.eval_prompts is not None
        if self.iteration == 0 and evaluating:
            self._log_eval(writer, 0)
        progress = Progress(p.iterations, self.iteration, cfg.train.progress_bar, desc="ppo")
        record: dict = {}
        with StopRequest() as stop:  # Slurm preemption: finish the iteration, checkpoint, exit for requeue
            while self.iteration < p.iterations:
                record = self.iterate()
                writer.log(record)
                progress.update(1, reward=record["reward_mean"], kl=record["kl"], len=record["response_len"])
                done = self.iteration == p.iterations
                if evaluating and p.eval_every and self.iteration % p.eval_every == 0 and not done:
                    self._log_eval(writer, self.iteration, progress)
                every = cfg.checkpoint.every_steps
                if (every and self.iteration % every == 0) or done or stop.requested:
                    self.save_checkpoint()
                if stop.requested and not done:
                    progress.close()
                    return {"stopped_at": self.iteration}
                testing.after_step()
        progress.close()
        final_eval = self._log_eval(writer, self.iteration) if evaluating else {}
        return {"step": self.iteration, **{k: record.get(k) for k in ("reward_mean", "kl")}, **final_eval}

    # ------------------------------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, float]:
        """Greedy responses to data.eval prompts: mean reward, and exact match against an 'answer' column."""
        self._settle()
        prompts: PromptSet = self.eval_prompts
        policy, reward = self.groups["policy"], self.groups["reward"]
        n = len(prompts)
        # pad the list so every rank of both groups gets an equal share (ZeRO-3 forwards are collective)
        unit = policy.size * reward.size
        index = [i % n for i in range(-(-n // unit) * unit)]
        texts = [prompts.texts[i] for i in index]
        per_rank = len(texts) // policy.size
        rollouts = self._get(policy.starmap("generate", [(texts[r * per_rank:(r + 1) * per_rank], None)
                                                      for r in range(policy.size)]))
        exp = Experience.from_rollout(merge_rollouts(rollouts, self.pad),
                                      {k: [v[i] for i in index] for k, v in prompts.extras.items()})
        scores = torch.cat(self._get(reward.map("score", rs.put_shards(exp if self.p.reward_fn else exp.without_text(),
                                                                     reward.size))))[:n]
        out = {"eval/reward_mean": float(scores.mean()),
               "eval/response_len": float(exp.response_lengths()[:n].float().mean())}
        answers = prompts.extras.get("answer")
        if answers is not None:
            hits = [exact_match(r, str(a)) for r, a in zip(exp.responses[:n], answers)]
            out["eval/accuracy"] = sum(hits) / n
        return out

    def _log_eval(self, writer, step: int, progress=None) -> dict:
        ev = self.evaluate()
        writer.log({"step": step, **ev})
        msg = f"eval at iteration {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items())
        progress.write(msg) if progress is not None else log.info(msg)
        return ev

    # ------------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        prompts = self.sampler.state()
        if self.pending is not None:  # a resumed run generates the pending batch again, from these prompts
            prompts = {**prompts, "epoch": self.pending[2][0], "position": self.pending[2][1]}
        return {"iteration": self.iteration, "samples": self.samples, "elapsed_s": self.elapsed,
                "kl_coef": self.kl_ctl.value, "prompts": prompts}

    def _save_what_is_left(self) -> None:
        try:
            path = self.save_checkpoint()
            log.warning("saved %s (the last complete iteration) before stopping", path)
        except RunFailure as e:
            log.warning("no checkpoint could be saved after the failure: %s", e)

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N/{policy,critic}/ (each group's engine state) + trainer_state.json, atomically."""
        with checkpoint_space(self.ckpt_root, self.iteration):  # an actor's full disk comes as its error's text
            tmp = begin_checkpoint(self.ckpt_root, self.iteration, self.run_id)
            trained = [r for r in ("policy", "critic") if r in self.groups]
            self._get(*[self.groups[r].run("save", str(tmp / r)) for r in trained])
            return commit_checkpoint(tmp, self.ckpt_root, self.iteration, self.state(),
                                     self.cfg.checkpoint.keep_last, self.run_id)

    def load_checkpoint(self, path: Path) -> None:
        trained = [r for r in ("policy", "critic") if r in self.groups]
        missing = [r for r in trained if not (path / r).is_dir()]
        if missing:
            raise RuntimeError(f"{path} has no {missing[0]}/ state (was it written with another ppo.algorithm?)")
        self._get(*[self.groups[r].run("load", str(path / r)) for r in trained])
        self.restore(read_trainer_state(path))

    def restore(self, state: dict) -> None:
        """The controller's side of a checkpoint: counters, KL coefficient, prompt position."""
        self.iteration, self.samples, self.elapsed = state["iteration"], state["samples"], state["elapsed_s"]
        self.resumed_at = (self.iteration, self.samples, self.elapsed)
        self.kl_ctl.value = state["kl_coef"]
        self.sampler.epoch, self.sampler.position = state["prompts"]["epoch"], state["prompts"]["position"]

    def summary(self) -> str:
        """What this process did (a resumed run counts from its checkpoint), and where the run stands."""
        it0, samples0, elapsed0 = self.resumed_at or (0, 0, 0.0)
        text = (f"{self.iteration - it0} iterations, {self.samples - samples0} samples in "
                f"{self.elapsed - elapsed0:.1f}s")
        if self.resumed_at is not None:
            text += f" (resumed at iteration {it0}; {self.iteration} of {self.p.iterations} done in all)"
        return text

    def export(self, out_dir: str) -> None:
        """final/ from the policy group, written aside and then put in place (never half of one)."""
        final = Path(out_dir)
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        with final_space(final, tmp):
            self._get(self.groups["policy"].run("export", str(tmp)))
            publish_dir(tmp, final)
        log.info("policy in %s", final)
