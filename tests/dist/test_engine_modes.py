"""Launchers and engine modes beyond the equivalence tests: the deepspeed launcher, bf16, ZeRO-3 construction."""

import json
import os
import sys

import pytest

from tests.helpers import ROOT, _free_port, read_metrics, run_group, write_recipe

pytestmark = pytest.mark.dist


def test_zero3_builds_the_model_partitioned(tmp_path):
    """No rank ever materialises the whole model: each holds about 1/world of the parameters from the start."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "probe"
    proc = run_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                      "tests/dist/zero3_probe.py", str(out)], 300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"probe.{r}").read_text()) for r in (0, 1)]
    full = reports[0]["full"]
    assert full == 918_656
    for r in reports:
        assert r["visible"] == 0  # parameters are placeholders outside a gather
        assert full / 2 <= r["held"] <= full / 2 + 1000  # its shard (partitions are padded a little)


def test_deepspeed_launcher_bf16(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", stage="sft", output_dir=str(tmp_path / "run"),
                          model={"dtype": "bf16"}, data={"train": "ftdist/tiny-task", "max_length": 64},
                          train={"micro_batch_size": 8, "global_batch_size": 32, "max_steps": 12, "lr": 2e-3,
                                 "warmup_ratio": 0.0, "progress_bar": False},
                          deepspeed={"zero_stage": 2}, logging={"tensorboard": False})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ds = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    proc = run_group([ds, "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "ftdist", "train",
                      str(recipe)], 300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 ranks x micro 8 x accumulation 2" in proc.stdout + proc.stderr
    train = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(train) == 12 and train[-1]["loss"] < 0.7 * train[0]["loss"]
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in weights.values())
