"""Checkpoints: SIGKILL after the step-4 checkpoint, resume, and end where an uninterrupted run ends;
half-written checkpoints are skipped; the run directory holds what its contract names. (final/ equal to the
weights rebuilt from the engine's ZeRO shards: tests/dist/test_export.py; final/ after every ZeRO stage equal to
a plain PyTorch loop: tests/dist/test_sft_equivalence.py.)"""

import json
import os
import signal
import subprocess
import time

import pytest

from tests.helpers import ROOT, ftdist_cmd, load_weights, max_abs_diff, read_metrics, run_ftdist, write_recipe

pytestmark = pytest.mark.dist

RECIPE = dict(
    stage="sft",
    model={"name_or_path": "ftdist/tiny", "dtype": "fp32"},
    data={"train": "ftdist/tiny-task", "eval": "ftdist/tiny-task/eval", "max_length": 64},
    train={"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 8, "lr": 2e-3, "warmup_ratio": 0.25,
           "progress_bar": False, "eval_every": 0},
    deepspeed={"zero_stage": 2},
    checkpoint={"every_steps": 4, "keep_last": 2},
    logging={"tensorboard": True},
)


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in os.listdir(f"/proc/{p}/task") if os.path.exists(f"/proc/{p}/task") else []:
            try:
                kids = [int(x) for x in open(f"/proc/{p}/task/{task}/children").read().split()]
            except OSError:
                kids = []
            out += kids
            todo += kids
    return out


def _wait_gone(pid: int, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            state = open(f"/proc/{pid}/stat").read().split()[2]
        except OSError:
            return
        if state == "Z":
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} survived SIGKILL")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    base = tmp_path_factory.mktemp("straight")
    recipe = write_recipe(base / "r.yaml", **RECIPE)
    run_ftdist(2, str(recipe), [f"output_dir={base / 'run'}", "data.eval=null"])
    return base / "run"


def test_killed_then_resumed_matches_straight_run(straight, tmp_path):
    """Alone proves: a 2-rank run killed (launcher and ranks) after a checkpoint resumes bit-identically."""
    recipe = write_recipe(tmp_path / "r.yaml", **RECIPE)
    run_dir = tmp_path / "run"
    cmd = ftdist_cmd(2, str(recipe), [f"output_dir={run_dir}", "data.eval=null"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FTDIST_HANG_AFTER_CHECKPOINT": "4"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    manifest = run_dir / "checkpoints" / "step-4" / "manifest.json"
    deadline = time.time() + 240
    while not manifest.exists():
        assert proc.poll() is None, "run ended before its step-4 checkpoint"
        assert time.time() < deadline, "no step-4 checkpoint in time"
        time.sleep(0.2)
    time.sleep(1.0)  # ranks are now past the checkpoint, waiting
    victims = _descendants(proc.pid)
    assert len(victims) >= 2  # the two ranks
    for pid in [proc.pid, *victims]:  # the launcher and every rank at once, as a node failure would
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    for pid in victims:
        _wait_gone(pid)
    assert not (run_dir / "final").exists()

    # a half-written later checkpoint (no manifest) must be skipped, not loaded
    fake = run_dir / "checkpoints" / "step-6"
    (fake / "engine").mkdir(parents=True)
    (fake / "trainer_state.json").write_text(json.dumps({"step": 6}))

    out = run_ftdist(2, str(recipe), [f"output_dir={run_dir}", "data.eval=null"])
    assert "skipping incomplete checkpoint" in out.stderr
    assert "resumed from" in out.stderr and "step-4" in out.stderr
    # the resumed run restores every state and then does the same fp32 operations in the same order as the
    # straight run (same ranks, micro-batches, kernels and thread count; tests/conftest.py pins MKL's code
    # path): bit-identical, on any host. Any difference means some state was not restored.
    assert max_abs_diff(load_weights(run_dir / "final"), load_weights(straight / "final")) == 0.0
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps[-4:] == [5, 6, 7, 8]
    # keep_last=2: step-4 and step-8 remain (the final step is always saved); the directory without a manifest
    # is nobody's checkpoint that this run can prove it wrote, so pruning leaves it alone
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == ["step-4", "step-6", "step-8"]


def test_run_directory_contract(straight):
    assert (straight / "config.yaml").exists()
    assert any((straight / "tensorboard").iterdir())
    records = read_metrics(straight)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"):
        assert all(r[key] is not None for r in train), key
    assert train[-1]["tokens"] > train[0]["tokens"] > 0
    assert 0 <= train[0]["lr"] < train[1]["lr"] < train[2]["lr"]  # warmup: the first step runs at lr 0
    assert train[-1]["loss"] < train[0]["loss"]
    assert (straight / "final" / "config.json").exists()
    assert list((straight / "final").glob("*.safetensors"))
    assert (straight / "final" / "tokenizer_config.json").exists()
