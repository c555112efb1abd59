import os
import sys
import tempfile

# one intra-op thread, whatever the host's core count: thread count changes how torch splits a reduction, and
# so its rounding; launch/test.sh sets the same, this covers a bare `pytest` (subprocesses inherit it)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# one cache for the embedded tiny model and task across the whole session (subprocesses inherit it)
os.environ.setdefault("FTDIST_CACHE", os.path.join(tempfile.gettempdir(), "ftdist-test-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# MKL may pick a kernel by the memory alignment of its operands, so two runs doing the same operations could
# round differently; strict conditional numerical reproducibility makes them bit-identical (the resume tests
# compare a resumed run with a straight one exactly). Subprocesses, Slurm jobs and Ray workers inherit it.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# the environment's own tools first, as in an activated venv: DeepSpeed JIT-builds its CPU ops with
# whichever `ninja` is on PATH, and a system ninja of another version (a different command hash in
# .ninja_log) makes every switch rebuild the op for a minute, under a lock all ranks wait on
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


def pytest_sessionstart(session):
    # an op build killed part-way (a timed-out test, a killed earlier run) leaves a lock that every later
    # DeepSpeed start would wait on for ever; none of this suite's builds is running yet
    from ftdist.engine.engine import clear_stale_build_locks

    clear_stale_build_locks(max_age_s=0)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ppo_warm(tmp_path_factory) -> dict:
    """An SFT-warmed tiny policy (about 60% exact answers greedy, 35% reward when sampling) and a pool of 16
    prompts, for the PPO/GRPO tests (tests/ray, tests/multinode): {"base": dir, "policy": model, "pool": file}."""
    from pathlib import Path

    from ftdist.data.tiny_task import bundled_task_dir
    from tests.helpers import run_ftdist

    base = tmp_path_factory.mktemp("ppo")
    run_ftdist(1, "sft_tiny", [f"output_dir={base / 'sft'}", "train.max_steps=100", "data.eval=null",
                               "train.progress_bar=false", "checkpoint.every_steps=0", "logging.tensorboard=false"],
               timeout=600)
    rows = (Path(bundled_task_dir()) / "prompts.jsonl").read_text().splitlines()[:16]
    pool = base / "pool.jsonl"
    pool.write_text("\n".join(rows) + "\n")
    return {"base": base, "policy": base / "sft" / "final", "pool": pool}


# what a one-process `ftdist train` run in this process (ftdist.cli.main in-process) writes into os.environ to
# form its process group: left behind, every later subprocess would inherit the same rendezvous port and fail
# to bind it (EADDRINUSE), or take itself for rank 0 of another launcher's world
_PROCESS_GROUP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _process_group_env_restored():
    before = {k: os.environ.get(k) for k in _PROCESS_GROUP_ENV}
    yield
    from ftdist.engine.dist import destroy_process_group

    destroy_process_group()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
