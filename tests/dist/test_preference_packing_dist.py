"""Packed pair micro-batches (data.packing for dpo, orpo, rm) on 2 gloo ranks under ZeRO-2 and ZeRO-3, full and
LoRA: one optimizer step through the real plan, Task loss and step function gives the padded step's metrics and
gradient (tests/dist/pairs_packing_worker.py runs every case in one torchrun)."""

import os
import sys

import pytest
import torch

from tests.helpers import GRAD_RTOL, ROOT, _free_port, run_group

pytestmark = pytest.mark.dist
CASES = [f"{stage}_{variant}_zero{z}" for z in (3, 2) for stage in ("dpo", "orpo", "rm") for variant in ("full", "lora")]


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    base = tmp_path_factory.mktemp("pairs_packing")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "dist" / "pairs_packing_worker.py"), str(base / "res.pt"), str(base / "cache")]
    proc = run_group(cmd, 400, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(base / "res.pt", weights_only=False)


@pytest.mark.parametrize("name", CASES)
def test_packed_step_equals_padded_step(steps, name):
    padded, packed = steps[name]["padded"], steps[name]["packed"]
    assert packed["pairs"] == padded["pairs"] and len(set(padded["pairs"])) == 8  # the step's pairs, both ranks
    assert packed["real"] == padded["real"]  # the same tokens (all ranks): both sequences of the same pairs
    assert packed["padded"] == packed["real"] < padded["padded"]  # no padding left
    assert packed["micro_batches"] < padded["micro_batches"]  # short pairs: one packed micro-batch holds them all
    # the means over the step's 8 pairs: the same fp32 sums grouped differently (~1e-6 relative), 10x margin;
    # abs for the rewards, ~0 at the first step
    assert packed["means"].keys() == padded["means"].keys()
    for key, value in padded["means"].items():
        assert packed["means"][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    # the step's gradient, read off the SGD update; both runs sum the same per-token terms in another grouping
    # (batch shapes, micro-batches, then the ZeRO reduction): GRAD_RTOL of its size (tests/helpers.py)
    names = sorted(padded["update"])
    assert names == sorted(packed["update"])
    g = torch.cat([padded["update"][n].flatten() for n in names])
    gk = torch.cat([packed["update"][n].flatten() for n in names])
    assert g.norm() > 1e-2
    assert float((gk - g).norm()) <= GRAD_RTOL * float(g.norm())
