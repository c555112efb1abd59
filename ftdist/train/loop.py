"""The one training loop: epochs, step plans, loss normalisation, logging, eval, checkpoints.

Every stage (SFT, RM, DPO, ORPO) is a Task (train/task.py) run by `train()`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ftdist.config import Config, ConfigError, dump_config
from ftdist.data.batching import plan_epoch
from ftdist.engine.dist import all_reduce_sum, barrier, init_distributed
from ftdist.models.loading import count_parameters, load_tokenizer
from ftdist.train.metrics import MetricsWriter, Progress
from ftdist.train.task import make_task

log = logging.getLogger("ftdist")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # data position inside the epoch
    tokens: int = 0  # real (non-pad) tokens seen
    elapsed_s: float = 0.0


class StopRequest:
    """SIGUSR1/SIGTERM (Slurm preemption): finish the step, checkpoint, exit."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside some Ray workers)
                pass

    def _handler(self, signum, frame):
        self.requested = True


def setup_logging(is_main: bool) -> None:
    import warnings

    # library deprecation chatter on every rank drowns the progress bar
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s ftdist: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ftdist").setLevel(logging.INFO if is_main else logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _grad_accum(cfg: Config, world_size: int) -> int:
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x world size ({world_size}); allowed: a multiple of {per_step}")
    return t.global_batch_size // per_step


def train(cfg: Config) -> dict:
    # first: a preemption signal during start-up (model load, op builds) must not kill a rank
    stop = StopRequest()
    info = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    setup_logging(info.is_main)
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    grad_accum = _grad_accum(cfg, info.world_size)

    tokenizer = load_tokenizer(cfg.model)
    task = make_task(cfg, tokenizer, info)
    cache_dir = cfg.data.cache_dir or str(out / "cache")
    # rank 0 tokenises and caches; the others wait, then load the cache
    if info.is_main:
        log.info("data %s", task.prepare_data(cache_dir, show_progress=cfg.train.progress_bar))
    barrier()
    if not info.is_main:
        task.prepare_data(cache_dir, show_progress=False)

    lengths = task.train_lengths()

    def epoch_plan(epoch: int):
        return plan_epoch(lengths, seed=cfg.seed, epoch=epoch, micro_batch_size=cfg.train.micro_batch_size,
                          grad_accum=grad_accum, world_size=info.world_size, rank=info.rank,
                          packing=task.packing, capacity=task.capacity)

    steps_per_epoch = len(epoch_plan(0))
    if steps_per_epoch == 0:
        raise ConfigError(f"data.train has {len(lengths)} samples, fewer than one optimizer step needs "
                          f"(train.global_batch_size={cfg.train.global_batch_size} rows); lower the batch size")
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else max(1, math.ceil(cfg.train.epochs * steps_per_epoch))

    from ftdist.engine.engine import Engine, model_init_context

    with model_init_context(cfg, info.world_size, grad_accum):
        model = task.build_model()
    trainable, total = count_parameters(model)
    log.info("model: %s parameters, %s trainable (%.2f%%); %d ranks x micro %d x accumulation %d = %d rows/step; "
             "%d steps (%d per epoch)", f"{total:,}", f"{trainable:,}", 100 * trainable / max(total, 1),
             info.world_size, cfg.train.micro_batch_size, grad_accum, cfg.train.global_batch_size,
             total_steps, steps_per_epoch)
    engine = Engine(model, cfg, info, grad_accum=grad_accum, total_steps=total_steps)

    from ftdist.engine.checkpoint import load_checkpoint, resolve_resume, save_checkpoint

    ckpt_root = out / "checkpoints"
    # LoRA checkpoints also carry the adapter in PEFT format, usable without DeepSpeed
    extra_save = (lambda d: engine.export_hf(str(d / "adapter"), tokenizer)) if engine.is_peft else None
    state = TrainState()
    resume = resolve_resume(cfg.checkpoint.resume, ckpt_root)
    if resume is not None:
        state = TrainState(**load_checkpoint(engine, resume, info.rank))
        log.info("resumed from %s at step %d (epoch %d, position %d)", resume, state.step, state.epoch,
                 state.step_in_epoch)

    writer = MetricsWriter(str(out), info.is_main, cfg.logging, cfg.to_dict())
    if state.step == 0:
        ev = evaluate(engine, task, cfg)
        if ev:
            writer.log({"step": 0, "epoch": 0.0, **ev})
            log.info("eval before training: %s", _fmt(ev))

    progress = Progress(total_steps, state.step, info.is_main and cfg.train.progress_bar)
    t_start = time.time()
    elapsed0 = state.elapsed_s
    last_saved = -1
    tok_window, t_window = 0, time.time()
    tokens0 = state.tokens
    engine.train()
    while state.step < total_steps:
        plan = epoch_plan(state.epoch)
        while state.step_in_epoch < len(plan) and state.step < total_steps:
            micro = [task.collate(rows, "train") for rows in plan.steps[state.step_in_epoch]]
            local = [sum(task.units(b) for b in micro), *map(sum, zip(*(task.tokens(b) for b in micro)))]
            units, real, padded = all_reduce_sum(local, engine.device)
            sums: dict[str, float] = {}
            lr = engine.lr  # the rate this step uses; the scheduler advances inside step()
            for b in micro:
                loss, m = task.loss(engine, b, max(units, 1.0))
                engine.backward(loss)
                engine.step()
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
            keys = sorted(sums)
            totals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], engine.device)))
            state.step += 1
            state.step_in_epoch += 1
            state.tokens += int(real)
            tok_window += real
            state.elapsed_s = elapsed0 + time.time() - t_start
            metrics = {k: v / max(units, 1.0) for k, v in totals.items()}
            if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                now = time.time()
                record = {"step": state.step, "epoch": round(state.epoch + state.step_in_epoch / len(plan), 4),
                          **metrics, "lr": lr, "grad_norm": engine.grad_norm(), "tokens": state.tokens,
                          "tokens_per_s": tok_window / max(now - t_window, 1e-9),
                          "padding_fraction": 1 - real / max(padded, 1), "elapsed_s": round(state.elapsed_s, 3)}
                writer.log(record)
                tok_window, t_window = 0, now
            progress.update(1, loss=metrics.get("loss", float("nan")),
                            tok_s=int((state.tokens - tokens0) / max(time.time() - t_start, 1e-9)))
            if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and state.step < total_steps:
                ev = evaluate(engine, task, cfg)
                if ev:
                    writer.log({"step": state.step, "epoch": state.epoch, **ev})
                    progress.write(f"step {state.step}: {_fmt(ev)}")
            want_stop = all_reduce_sum([float(stop.requested)], engine.device)[0] > 0
            if (cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0) or want_stop:
                save_checkpoint(engine, ckpt_root, state.step, asdict(state), info.rank, info.is_main,
                                cfg.checkpoint.keep_last, extra_save=extra_save)
                last_saved = state.step
                _fault_point(state.step)
            if want_stop:
                progress.close()
                log.warning("stop requested by signal: checkpoint saved at step %d; exiting for requeue", state.step)
                writer.close()
                return {"stopped_at": state.step}
        if state.step_in_epoch >= len(plan):
            state.epoch += 1
            state.step_in_epoch = 0
    progress.close()

    if last_saved != state.step:
        save_checkpoint(engine, ckpt_root, state.step, asdict(state), info.rank, info.is_main, cfg.checkpoint.keep_last,
                        extra_save=extra_save)
    ev = evaluate(engine, task, cfg)
    if ev:
        writer.log({"step": state.step, "epoch": state.epoch, **ev})
        log.info("eval after training: %s", _fmt(ev))
    task.export(engine, str(out / "final"))
    barrier()
    writer.close()
    if info.is_main:
        log.info("done: %d steps, %s tokens in %.1fs; model in %s", state.step, f"{state.tokens:,}",
                 state.elapsed_s, out / "final")
    return {"step": state.step, **ev}


def _fault_point(step: int) -> None:
    """FTDIST_HANG_AFTER_CHECKPOINT=N: wait after the step-N checkpoint, so tests can kill a run at a known point."""
    if os.environ.get("FTDIST_HANG_AFTER_CHECKPOINT") == str(step):
        log.warning("FTDIST_HANG_AFTER_CHECKPOINT=%d: waiting to be killed", step)
        while True:
            time.sleep(1)


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


@torch.no_grad()
def evaluate(engine, task, cfg) -> dict:
    rows = task.eval_rows()
    if not rows:
        return {}
    info = engine.info
    engine.train(False)
    bs = cfg.train.micro_batch_size
    mine = rows[info.rank::info.world_size]
    # equal number of forwards on every rank: ZeRO-3 gathers weights collectively in each one
    n_batches = -(-(-(-len(rows) // info.world_size)) // bs)
    sums: dict[str, float] = {}
    units = 0.0
    for k in range(n_batches):
        chunk = mine[k * bs:(k + 1) * bs]
        batch = task.collate(chunk or rows[:1], "eval")
        _, m = task.loss(engine, batch, 1.0)
        if chunk:
            units += task.units(batch)
            for key, v in m.items():
                sums[key] = sums.get(key, 0.0) + v
    keys = sorted(sums)
    totals = all_reduce_sum([units] + [sums.get(k, 0.0) for k in keys], engine.device)
    units = max(totals[0], 1.0)
    out = {f"eval/{k}": v / units for k, v in zip(keys, totals[1:])}
    if getattr(task, "name", "") == "sft" and "eval/loss" in out:
        out["eval/perplexity"] = math.exp(min(out["eval/loss"], 50.0))
    out.update(task.extra_eval(engine))
    engine.train(True)
    return out
