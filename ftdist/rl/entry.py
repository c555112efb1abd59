"""`ftdist train RECIPE` with `stage: ppo`: connect to Ray, start the actor groups, run the driver.

The command is one plain process (the controller); the ranks are Ray actors.
With RAY_ADDRESS set it joins that cluster (e.g. `ray job submit -- ftdist train
ppo_7b`); otherwise it starts a local Ray on 127.0.0.1 without a dashboard.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ftdist.config import Config, ConfigError
from ftdist.run.lifecycle import RunFailure
from ftdist.run.outputs import dump_config

log = logging.getLogger("ftdist")


def _absolute(path):
    """Actors may start in another working directory: local paths are made absolute here."""
    return str(Path(path).resolve()) if path is not None and os.path.exists(path) else path


def _resolved(cfg: Config) -> Config:
    """The recipe with absolute paths, checked before anything loads (models/preflight.py: the models are models,
    not adapters; the data sources exist; logging.wandb has its package and key; data.max_length fits the model,
    null resolved). The precision is not checked here: the actors' devices decide it."""
    import dataclasses

    from ftdist.models.preflight import preflight

    model = dataclasses.replace(cfg.model, name_or_path=_absolute(cfg.model.name_or_path))
    ppo = dataclasses.replace(cfg.ppo, reward_model=_absolute(cfg.ppo.reward_model))
    out = dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).resolve()), model=model, ppo=ppo)
    out.notes = cfg.notes  # what loading the recipe decided, logged by preflight
    return preflight(out)


def train(cfg: Config) -> dict:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("stage=ppo runs as one controller process that starts its own Ray actor groups; "
                          "launch it without torchrun/srun/deepspeed (set the ranks with ppo.policy_ranks etc.)")
    from ftdist.run import rundir
    from ftdist.run.logs import setup_logging

    setup_logging(True)
    cfg = _resolved(cfg)
    from ftdist.engine.checkpoint import refuse_foreign_checkpoints

    run_id = rundir.claim(cfg.output_dir, cfg.overwrite_output_dir, fresh=cfg.checkpoint.resume == "never")
    held = rundir.lock(cfg.output_dir, run_id)
    try:
        refuse_foreign_checkpoints(Path(cfg.output_dir) / "checkpoints", run_id, cfg.overwrite_output_dir)
        return _train(cfg, run_id)
    finally:
        held.release()


def _train(cfg: Config, run_id: str) -> dict:
    from ftdist.engine.checkpoint import resolve_resume
    from ftdist.models.loading import load_tokenizer
    from ftdist.rl.prompts import load_prompt_sources
    from ftdist.rl.workers import load_reward_fn
    from ftdist.run.metrics import MetricsWriter
    from ftdist.run.seeding import seed_everything

    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    dump_config(cfg, out / "config.yaml")
    # everything a user can get wrong is checked here, before any actor starts
    if cfg.ppo.reward_fn is not None:
        load_reward_fn(cfg.ppo.reward_fn)
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    prompts, mixed = load_prompt_sources(cfg.data, "train", tokenizer, cfg.seed)
    for line in filter(None, mixed.split("\n")):
        log.info("data %s", line)
    eval_prompts = (load_prompt_sources(cfg.data, "eval", tokenizer, cfg.seed, cfg.train.eval_max_samples)[0]
                    if cfg.data.eval else None)
    if len(prompts) < cfg.ppo.rollout_batch_size:
        log.warning("data.train has %d prompts, fewer than ppo.rollout_batch_size=%d: prompts repeat within an "
                    "iteration", len(prompts), cfg.ppo.rollout_batch_size)
    resume = resolve_resume(cfg.checkpoint.resume, out / "checkpoints", run_id)
    log.info("ppo: %s, %d prompts, %d iterations of %d prompts x %d samples", cfg.ppo.algorithm, len(prompts),
             cfg.ppo.iterations, cfg.ppo.rollout_batch_size, cfg.ppo.samples_per_prompt)

    from ftdist.rl import ray_shells as rs
    from ftdist.rl.driver import PPODriver

    ranks, _ = rs.role_requirements(cfg)
    started = rs.connect(rs.logical_cpus(ranks, cfg.ppo.cpus_per_actor))
    groups, pgs = {}, []
    writer = None
    try:
        groups, pgs = rs.started_groups(cfg)
        driver = PPODriver(cfg, groups, prompts, eval_prompts, tokenizer.pad_token_id, run_id)
        if resume is not None:
            driver.load_checkpoint(resume)
            log.info("resumed from %s at iteration %d", resume, driver.iteration)
        writer = MetricsWriter(str(out), True, cfg.logging, cfg.to_dict(),
                               resumed_at=driver.iteration if resume is not None else None)
        placement = rs.group_placement(groups)  # where Ray put each group: the run log and metrics.jsonl
        log.info("placement: %s", "; ".join(f"{k.split('/', 1)[1]} on {v}" for k, v in placement.items()))
        writer.log({"step": driver.iteration, **placement})
        result = driver.run(writer)
        if "stopped_at" in result:
            log.warning("stop requested by signal: checkpoint saved at iteration %d; exiting for requeue",
                        result["stopped_at"])
            return result
        if cfg.train.save_final:
            driver.export(str(out / "final"))
        log.info("done: %s; policy in %s", driver.summary(),
                 out / "final" if cfg.train.save_final else "the last checkpoint (train.save_final=false)")
        return result
    except RunFailure as e:
        if e.details:
            (out / "error.log").write_text(e.details)
            raise RunFailure(f"{e} (the actor's traceback: {out / 'error.log'})") from None
        raise
    finally:
        if writer is not None:
            writer.close()
        rs.shutdown(list(groups.values()), pgs, started)
