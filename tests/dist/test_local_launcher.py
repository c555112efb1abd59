"""launch/local.sh on CPU with both launchers, run from another directory with a relative recipe
and output_dir: 2 gloo ranks each in bf16 under ZeRO-2, and the same weights whichever launcher started them.
(That bf16 under ZeRO-2/3 trains as a plain bf16 loop does: tests/dist/test_benchmark_smoke.py's gpu_checks zero.)"""

from __future__ import annotations

import os

import pytest

from tests.helpers import ROOT, _free_port, load_weights, max_abs_diff, read_metrics, run_group, write_recipe

pytestmark = pytest.mark.dist


def test_local_sh_torchrun_and_deepspeed_launchers_agree(tmp_path):
    """Alone proves: both launchers start the same ranks through launch/local.sh, and a bf16 run saves bf16."""
    write_recipe(tmp_path / "r.yaml", stage="sft", model={"name_or_path": "ftdist/tiny", "dtype": "bf16"},
                 data={"train": "ftdist/tiny-task", "max_length": 64},
                 train={"micro_batch_size": 4, "global_batch_size": 16, "max_steps": 3, "lr": 2e-3,
                        "log_every": 1, "progress_bar": False},
                 deepspeed={"zero_stage": 2}, checkpoint={"every_steps": 0}, logging={"tensorboard": False})
    for launcher in ("torchrun", "deepspeed"):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LAUNCHER": launcher, "MASTER_PORT": str(_free_port())}
        proc = run_group(["bash", str(ROOT / "launch" / "local.sh"), "2", "r.yaml", f"output_dir=run-{launcher}"],
                         400, env=env, cwd=tmp_path)
        assert proc.returncode == 0, f"{launcher}: {proc.stderr[-4000:]}"
        assert "2 ranks x micro 4 x accumulation 2" in proc.stdout + proc.stderr
        assert [r["step"] for r in read_metrics(tmp_path / f"run-{launcher}") if "loss" in r] == [1, 2, 3]
    diff = max_abs_diff(load_weights(tmp_path / "run-torchrun" / "final"),
                        load_weights(tmp_path / "run-deepspeed" / "final"))
    # the launcher only starts the processes: the same ranks do the same operations, bit for bit
    assert diff == 0.0
    import torch

    assert {v.dtype for v in load_weights(tmp_path / "run-torchrun" / "final").values()} == {torch.bfloat16}
