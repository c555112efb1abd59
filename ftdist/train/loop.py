"""The one training loop: epochs, step plans, logging, evaluation, checkpoints.

Every stage (SFT, RM, DPO, ORPO) is a Task (train/task.py) run by `train()`; each
optimizer step goes through `optimizer_step` (train/step.py), which owns the loss
normalisation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch

from ftdist.config import Config, ConfigError, resume_changes
from ftdist.data.batching import plan_epoch
from ftdist.data.loading import data_fingerprint
from ftdist.engine.checkpoint import (export_final, find_latest, load_checkpoint, read_trainer_state,
                                      refuse_foreign_checkpoints, resolve_resume, save_checkpoint)
from ftdist.engine.dist import (all_reduce_sum, barrier, from_main, init_distributed, placement_summary,
                                rank_batches, rank_hosts, run_on_main_then_others)
from ftdist.engine.universal import reshard_refusal, to_universal
from ftdist.errors import UserError
from ftdist.models.loading import count_parameters, load_tokenizer
from ftdist.models.preflight import preflight
from ftdist.run import rundir, testing
from ftdist.run.logs import fmt_metrics, setup_logging
from ftdist.run.metrics import MetricsWriter, Progress
from ftdist.run.outputs import dump_config
from ftdist.run.seeding import seed_everything
from ftdist.run.lifecycle import StopRequest, end_process
from ftdist.train.step import NonFiniteError, optimizer_step
from ftdist.train.task import make_task

log = logging.getLogger("ftdist")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # data position inside the epoch
    tokens: int = 0  # real (non-pad) tokens seen
    elapsed_s: float = 0.0
    skipped_steps: int = 0  # steps whose update was skipped for non-finite numbers (train.on_nonfinite=skip)


def _grad_accum(cfg: Config, world_size: int) -> int:
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x world size ({world_size}); allowed: a multiple of {per_step}")
    return t.global_batch_size // per_step


def train(cfg: Config, end_process_when_done: bool = False, suite_eval=None) -> dict:
    """Runs the recipe; returns the last metrics ({"stopped_at": step} after a stop request).

    end_process_when_done: with several ranks, end the process at the end instead of returning (the
    command line; see run/lifecycle.end_process), with exit code 0, or 3 after a stop request.
    suite_eval: called at every evaluation after the task's own metrics, as suite_eval(engine, tokenizer) ->
    (metrics, samples); the samples go to output_dir/samples/step_N.jsonl (eval/training.py: the recipe's
    eval.suites; the entry points pass it, this package does not import eval).
    """
    # first: a preemption signal during start-up (model load, op builds) must not kill a rank
    with StopRequest() as stop:
        info = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
        setup_logging(info.is_main)
        if info.world_size > 1:
            hosts = rank_hosts()
            if info.is_main:
                log.info("process group: %d ranks (%s) on %s", info.world_size, info.backend,
                         placement_summary(hosts))
        run_id, held = _claim_output_dir(cfg, info)
        try:
            result, engine = _train(cfg, info, stop, run_id, suite_eval)
        finally:
            if held is not None:
                held.release()
        if end_process_when_done and info.world_size > 1:
            end_process(3 if "stopped_at" in result else 0)  # `engine` is still referenced: nothing is torn down
    return result


def _checked_resume(cfg: Config, ckpt_root: Path, run_id: str, now: dict) -> Optional[tuple[Path, Optional[Path]]]:
    """The checkpoint to resume, if the run it continues is this one: same recipe (up to what RESUME_SAFE_KEYS
    allows), same training data; else a ConfigError that names what differs. Returns (checkpoint, universal
    directory or None): a ZeRO checkpoint saved by another number of ranks is converted for this one."""
    path = resolve_resume(cfg.checkpoint.resume, ckpt_root, run_id)
    if path is None:
        return None
    saved = read_trainer_state(path)
    if "config" not in saved:  # written before checkpoints recorded their recipe
        log.warning("%s does not record its recipe; resuming without comparing it", path)
        return path, None
    again = "start a new run instead (another output_dir, or checkpoint.resume=never)"
    universal = None
    if saved["world_size"] != now["world_size"] and cfg.deepspeed.zero_stage > 0:
        why_not = reshard_refusal(cfg)
        if why_not is not None:
            raise ConfigError(f"{path} was saved by {saved['world_size']} ranks and this run has "
                              f"{now['world_size']}: ZeRO's optimizer state is split per rank and {why_not}; "
                              f"resume with {saved['world_size']} ranks, or {again}")
    changed = resume_changes(saved["config"], now["config"])
    if changed:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:6]) + ("; ..." if len(changed) > 6 else "")
        raise ConfigError(f"the recipe changed since {path} was saved ({listed}); these cannot change within a run "
                          f"(the optimizer, schedule and data order come from the checkpoint): restore them to "
                          f"resume, or {again}")
    if saved["data"] != now["data"]:
        if not cfg.checkpoint.resume_with_new_data:
            raise ConfigError(f"data.train ({cfg.data.train}) is not the data {path} was trained on (its content "
                              f"changed): the saved data position would point into other data. Set "
                              f"checkpoint.resume_with_new_data=true to resume anyway, or {again}")
        log.warning("data.train changed since %s; resuming at its data position in the new data "
                    "(checkpoint.resume_with_new_data=true)", path)
    if saved["world_size"] != now["world_size"] and cfg.deepspeed.zero_stage > 0:
        t0 = time.time()
        universal = to_universal(path / "engine", Path(cfg.output_dir) / "cache" / "universal" / path.name)
        log.info("%s was saved by %d ranks: converted to DeepSpeed's universal checkpoint for %d ranks in %.1fs",
                 path, saved["world_size"], now["world_size"], time.time() - t0)
    return path, universal


def _on_main(info, fn):
    """fn() on rank 0 only; every rank gets its result, or raises its error as a ConfigError (any of ftdist's
    UserErrors: no rank is left waiting)."""
    answer = None
    if info.is_main:
        try:
            answer = ("ok", fn())
        except UserError as e:
            answer = ("error", str(e))
    kind, value = from_main(answer)
    if kind == "error":
        raise ConfigError(value)
    return value


def _claim_output_dir(cfg: Config, info):
    """Rank 0 makes output_dir this run's (or refuses) and takes its lock; every rank learns the run id."""
    held = None

    def claim():
        nonlocal held
        run_id = rundir.claim(cfg.output_dir, cfg.overwrite_output_dir, fresh=cfg.checkpoint.resume == "never")
        held = rundir.lock(cfg.output_dir, run_id)
        try:
            refuse_foreign_checkpoints(Path(cfg.output_dir) / "checkpoints", run_id, cfg.overwrite_output_dir)
        except BaseException:  # refused: the lock goes with the refusal (a notebook's next run may take it)
            held.release()
            held = None
            raise
        return run_id

    return _on_main(info, claim), held


def micro_overhead(cfg: Config) -> Optional[float]:
    """What one more forward/backward costs, in padded tokens, for train.group_by_length=step (None: off).
    Measured on CPU for 7-27M-parameter models: a forward/backward of T tokens takes about (T + 32) token-times.
    On a GPU, a micro-batch below a few thousand tokens is launch-bound; under ZeRO-3 each one also gathers
    every parameter (twice), so extra micro-batches there must save far more."""
    if cfg.train.group_by_length != "step":
        return None
    base = 2048.0 if torch.cuda.is_available() else 32.0
    return base * (16 if cfg.deepspeed.zero_stage == 3 else 1)


def _train(cfg: Config, info, stop: StopRequest, run_id: str, suite_eval=None):
    cfg = _on_main(info, lambda: preflight(cfg))  # before the tokenizer, the data and the model load
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if info.is_main:
        dump_config(cfg, out / "config.yaml")
    grad_accum = _grad_accum(cfg, info.world_size)

    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    task = make_task(cfg, tokenizer, info)
    cache_dir = cfg.data.cache_dir or str(out / "cache")
    # rank 0 tokenises and caches, however long that takes; the others wait, then load the cache
    def tokenise() -> str:
        testing.before_data()
        return task.prepare_data(cache_dir, show_progress=cfg.train.progress_bar)

    summary = run_on_main_then_others(tokenise, lambda: task.prepare_data(cache_dir, show_progress=False))
    if info.is_main:
        log.info("data %s", summary)

    lengths = task.train_lengths()

    def epoch_plan(epoch: int):
        return plan_epoch(lengths, seed=cfg.seed, epoch=epoch, micro_batch_size=cfg.train.micro_batch_size,
                          grad_accum=grad_accum, world_size=info.world_size, rank=info.rank,
                          packing=task.packing, capacity=task.capacity, group_by_length=cfg.train.group_by_length,
                          micro_overhead=micro_overhead(cfg), token_budget=task.micro_tokens)

    steps_per_epoch = len(epoch_plan(0))
    if steps_per_epoch == 0:
        raise ConfigError(f"data.train has {len(lengths)} samples, fewer than one optimizer step needs "
                          f"(train.global_batch_size={cfg.train.global_batch_size} rows); lower the batch size")
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else max(1, math.ceil(cfg.train.epochs * steps_per_epoch))

    from ftdist.engine.engine import Engine

    engine = Engine(task.build_model, cfg, info, grad_accum=grad_accum, total_steps=total_steps)
    trainable, total = count_parameters(engine.module)
    log.info("model: %s parameters, %s trainable (%.2f%%); %d ranks x micro %d x accumulation %d = %d rows/step; "
             "%d steps (%d per epoch)", f"{total:,}", f"{trainable:,}", 100 * trainable / max(total, 1),
             info.world_size, cfg.train.micro_batch_size, grad_accum, cfg.train.global_batch_size,
             total_steps, steps_per_epoch)

    ckpt_root = out / "checkpoints"
    # LoRA checkpoints also carry the adapter in PEFT format, usable without DeepSpeed
    extra_save = (lambda d: engine.export_hf(str(d / "adapter"), tokenizer)) if engine.is_peft else None

    # what a resume checks against: the recipe, the number of ranks and the training data's content
    saved_with = {"config": cfg.to_dict(), "world_size": info.world_size, "data": task.data_fingerprint() if isinstance(cfg.data.train, list) else data_fingerprint(cfg.data.train, cfg.data)}

    def save(step: int) -> None:
        save_checkpoint(engine, ckpt_root, step, {**asdict(state), **saved_with}, cfg.checkpoint.keep_last, run_id,
                        extra_save=extra_save)

    state = TrainState()
    resumed = _on_main(info, lambda: _checked_resume(cfg, ckpt_root, run_id, saved_with))
    resume = resumed[0] if resumed is not None else None
    if resumed is not None:
        saved = load_checkpoint(engine, *resumed)
        if resumed[1] is not None:
            barrier()  # every rank has read the converted state: it goes
            if info.is_main:
                shutil.rmtree(resumed[1], ignore_errors=True)
                with contextlib.suppress(OSError):
                    resumed[1].parent.rmdir()  # cache/universal, when empty
        state = TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})
        log.info("resumed from %s at step %d (epoch %d, position %d)", resume, state.step, state.epoch,
                 state.step_in_epoch)

    writer = MetricsWriter(str(out), info.is_main, cfg.logging, cfg.to_dict(),
                           resumed_at=state.step if resume is not None else None)
    def run_eval(step: int) -> dict:
        ev = evaluate(engine, task, cfg)
        if suite_eval is not None:
            engine.train(False)
            metrics, samples = suite_eval(engine, tokenizer)
            engine.train(True)
            ev.update(metrics)
            writer.log_samples(step, samples)
        return ev

    if state.step == 0:
        ev = run_eval(0)
        if ev:
            writer.log({"step": 0, "epoch": 0.0, **ev})
            log.info("eval before training: %s", fmt_metrics(ev))

    progress = Progress(total_steps, state.step, info.is_main and cfg.train.progress_bar)
    t_start = time.time()
    step0, elapsed0 = state.step, state.elapsed_s
    last_saved = -1
    tok_window, t_window = 0, time.time()
    tokens0 = state.tokens
    nonfinite_in_a_row = 0
    engine.train()
    while state.step < total_steps:
        plan = epoch_plan(state.epoch)
        while state.step_in_epoch < len(plan) and state.step < total_steps:
            micro = [task.collate(rows, "train") for rows in plan.steps[state.step_in_epoch]]
            real, padded = map(sum, zip(*(task.tokens(b) for b in micro)))
            lr = engine.lr  # the rate this step uses; the scheduler advances inside the step
            result = optimizer_step(engine, micro, [task.units(b) for b in micro], lambda b: task.loss(engine, b),
                                    counters={"real": real, "padded": padded})
            real, padded = result.counters["real"], result.counters["padded"]
            # every rank sees the same all-reduced values, so every rank decides the same here
            bad = result.nonfinite(fp16=cfg.model.dtype == "fp16")
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if bad else 0
            if bad and (cfg.train.on_nonfinite == "stop" or nonfinite_in_a_row >= cfg.train.max_nonfinite_steps):
                times = "" if cfg.train.on_nonfinite == "stop" else f" ({nonfinite_in_a_row} steps in a row)"
                raise NonFiniteError(
                    f"step {state.step + 1}: {bad}{times}: training stopped before saving anything of this step "
                    f"(newest checkpoint: {find_latest(ckpt_root, run_id, warn=False) or 'none'}); lower train.lr, "
                    f"set train.max_grad_norm, or check the data of this step")
            if bad:
                state.skipped_steps += 1
                log.warning("step %d: %s: update skipped (train.on_nonfinite=skip)", state.step + 1, bad)
            state.step += 1
            state.step_in_epoch += 1
            state.tokens += int(real)
            tok_window += real
            state.elapsed_s = elapsed0 + time.time() - t_start
            metrics = result.means
            if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                now = time.time()
                record = {"step": state.step, "epoch": round(state.epoch + state.step_in_epoch / len(plan), 4),
                          **metrics, "lr": lr, "grad_norm": result.grad_norm, "tokens": state.tokens,
                          "tokens_per_s": tok_window / max(now - t_window, 1e-9),
                          "padding_fraction": 1 - real / max(padded, 1), "micro_batches": len(micro),
                          "elapsed_s": round(state.elapsed_s, 3),
                          "skipped_steps": state.skipped_steps}
                if torch.device(engine.device).type == "cuda":  # this rank's peak since the start, as PyTorch's allocator saw it
                    record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(engine.device) / 1e9, 3)
                writer.log(record)
                tok_window, t_window = 0, now
            testing.after_step()
            progress.update(1, loss=metrics.get("loss", float("nan")),
                            tok_s=int((state.tokens - tokens0) / max(time.time() - t_start, 1e-9)))
            if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and state.step < total_steps:
                ev = run_eval(state.step)
                if ev:
                    writer.log({"step": state.step, "epoch": state.epoch, **ev})
                    progress.write(f"step {state.step}: {fmt_metrics(ev)}")
            want_stop = all_reduce_sum([float(stop.requested)], engine.device)[0] > 0
            if (cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0) or want_stop:
                save(state.step)
                last_saved = state.step
                testing.after_checkpoint(state.step)
            if want_stop:
                progress.close()
                log.warning("stop requested by signal: checkpoint saved at step %d; exiting for requeue", state.step)
                writer.close()
                return {"stopped_at": state.step}, engine
        if state.step_in_epoch >= len(plan):
            state.epoch += 1
            state.step_in_epoch = 0
    progress.close()

    if last_saved != state.step:
        save(state.step)
    ev = run_eval(state.step)
    if ev:
        writer.log({"step": state.step, "epoch": state.epoch, **ev})
        log.info("eval after training: %s", fmt_metrics(ev))
    if cfg.train.save_final:
        export_final(engine, lambda d: task.export(engine, d), out / "final")
    writer.close()
    if info.is_main:
        # what this process did; a resumed run also says where it started
        resumed_at = f" (resumed at step {step0}; {state.step} of {total_steps} done in all)" if resume else ""
        log.info("done: %d steps, %s tokens in %.1fs%s; model in %s", state.step - step0,
                 f"{state.tokens - tokens0:,}", state.elapsed_s - elapsed0, resumed_at,
                 out / "final" if cfg.train.save_final else f"{out / 'checkpoints'} (train.save_final=false)")
    return {"step": state.step, **ev}, engine


@torch.no_grad()
def evaluate(engine, task, cfg) -> dict:
    """The Task's loss metrics over the eval rows (means over its units, all ranks), then its own extras."""
    rows = task.eval_rows()
    if not rows:
        return {}
    engine.train(False)
    sums: dict[str, torch.Tensor] = {}
    units = 0
    for chunk in rank_batches(len(rows), cfg.train.micro_batch_size, engine.info):
        batch = task.collate([rows[i] for i in chunk or [0]], "eval")
        _, m = task.loss(engine, batch)
        if chunk:  # an empty share still runs the forward (collective under ZeRO-3), and is not counted
            units += task.units(batch)
            for key, v in m.items():
                sums[key] = sums[key] + v if key in sums else v
    keys = sorted(sums)
    totals = all_reduce_sum([units] + [sums[k] for k in keys], engine.device)
    means = {f"eval/{k}": v / max(totals[0], 1.0) for k, v in zip(keys, totals[1:])}
    means.update(task.extra_eval(engine, means))
    engine.train(True)
    return means
