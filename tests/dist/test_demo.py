"""The README's demo: 2 gloo ranks, ZeRO-2, the tiny model learns digit sorting."""

import re
import sys

import pytest

from tests.helpers import ROOT, read_metrics, run_group

pytestmark = pytest.mark.dist


def test_demo_learns_the_task(tmp_path):
    out = run_group([sys.executable, "launch/demo.py", "--out", str(tmp_path)], 600)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = {m[0]: (float(m[1]), float(m[2]))
            for m in re.findall(r"^(before|after)\s+([\d.]+)\s+([\d.]+)%", out.stdout, re.M)}
    assert rows["before"][1] < 10 and rows["after"][1] >= 90, out.stdout
    assert rows["after"][0] < rows["before"][0] / 10
    metrics = read_metrics(tmp_path / "sft")
    assert metrics[-1]["eval/accuracy"] >= 0.9
    assert (tmp_path / "sft" / "final" / "model.safetensors").exists()
