"""Engine modes beyond the equivalence tests: ZeRO-3 construction. (The deepspeed launcher and bf16 on 2 ranks:
tests/dist/test_local_launcher.py.)"""

import json
import os
import sys

import pytest

from tests.helpers import ROOT, _free_port, run_group

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
