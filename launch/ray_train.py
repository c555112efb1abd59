"""Ray shell around `ftdist train`: what launch/ray_submit.sh runs on the cluster as a Ray job.

    python launch/ray_train.py RECIPE [key=value ...]

SFT, RM and DPO recipes run as a Ray Train TorchTrainer: each worker runs the ordinary loop
(`ftdist.train.loop.train`; a `stage: eval` recipe: the evaluation, each worker its share of the rows) inside the process group that Ray Train set up (gloo on CPU, NCCL on
GPUs). When a worker dies, Ray Train restarts the whole worker group (FailureConfig), and the
restarted loop resumes from the newest complete ftdist checkpoint in output_dir
(checkpoint.resume=auto). That needs output_dir on storage every node sees (a shared
filesystem); a relative output_dir is taken relative to the directory the job was submitted from
(FTDIST_SUBMIT_DIR, set by ray_submit.sh), not to Ray's unpacked copy of the code.
A PPO recipe runs its driver here instead; the driver starts its own actors on this cluster.

Environment (ray_submit.sh passes every FTDIST_* variable of the submitting shell):
  FTDIST_RAY_WORKERS          training workers (default: the cluster's GPUs, else 2)
  FTDIST_RAY_CPUS_PER_WORKER  CPUs reserved per worker (default 1)
  FTDIST_RAY_MAX_FAILURES     worker-group restarts before the job fails (default 3)
  FTDIST_PID_DIR              test hook: each worker writes rank{R}.pid there, so tests can kill one
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _worker(config: dict) -> None:
    import ray.train

    from ftdist.cli import run_stage
    from ftdist.config import load_config
    from ftdist.run.testing import record_pid

    record_pid(ray.train.get_context().get_world_rank())
    # a restarted worker group (maybe on other nodes) is the same job: it takes the run directory's lock over
    os.environ.setdefault("FTDIST_JOB_ID", ray.get_runtime_context().get_job_id())
    # Ray Train exports RANK/WORLD_SIZE/LOCAL_RANK and has initialised the process group;
    # init_distributed reuses it
    run_stage(load_config(config["recipe"], config["overrides"]))  # training, or a stage: eval recipe


def _absolute_output_dir(cfg) -> str:
    out = Path(cfg.output_dir).expanduser()
    if not out.is_absolute():
        out = Path(os.environ.get("FTDIST_SUBMIT_DIR") or os.getcwd()) / out
    return str(out)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    recipe, overrides = argv[0], list(argv[1:])

    from ftdist.config import load_config
    from ftdist.errors import RunError, UserError, print_error

    try:
        cfg = load_config(recipe, overrides)  # a bad recipe stops here, before any worker starts
    except UserError as e:
        print_error(str(e))
        return e.exit_code
    output_dir = _absolute_output_dir(cfg)
    overrides.append(f"output_dir={output_dir}")

    if cfg.stage == "ppo":
        from ftdist.cli import main as cli_main

        return cli_main(["train", recipe, *overrides])

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ftdist.run import rundir

    try:  # before Ray Train writes its own records into output_dir/ray
        rundir.claim(output_dir, cfg.overwrite_output_dir)
    except (UserError, RunError) as e:  # a used directory, a full disk
        print_error(str(e))
        return e.exit_code

    ray.init()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = int(os.environ.get("FTDIST_RAY_WORKERS") or gpus or 2)
    use_gpu = gpus > 0 and cfg.dist.backend != "gloo"
    resources = {"CPU": float(os.environ.get("FTDIST_RAY_CPUS_PER_WORKER", "1"))}
    if use_gpu:
        resources["GPU"] = 1.0
    max_failures = int(os.environ.get("FTDIST_RAY_MAX_FAILURES", "3"))
    print(f"ftdist: {cfg.stage} on Ray: {workers} worker(s) ({'GPU' if use_gpu else 'CPU'}), "
          f"up to {max_failures} restart(s) from the newest checkpoint; output_dir {output_dir}", flush=True)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"recipe": recipe, "overrides": overrides},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=None if cfg.dist.backend == "auto" else cfg.dist.backend,
                                 timeout_s=cfg.dist.timeout_s),
        run_config=RunConfig(name="ray", storage_path=output_dir,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    trainer.fit()
    done = f"results in {output_dir}/eval.json" if cfg.stage == "eval" else f"model in {output_dir}/final"
    print(f"ftdist: done; {done}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
