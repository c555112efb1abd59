"""The speed benchmarks run end to end in their tiny modes and print a table with every arm.

No timing is asserted: on shared CI machines a timing says nothing. What is checked is that each
arm really trained (tokens counted, a throughput), and that the packed arms process no padding
while TRL's padded default does.
"""

import re
import sys

import pytest

from tests.helpers import ROOT, run_group

pytestmark = pytest.mark.dist


def _run(script: str, *args: str) -> str:
    proc = run_group([sys.executable, str(ROOT / "benchmarks" / script), *args], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def _table(out: str) -> dict[str, list[str]]:
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| arm")
            and not line.startswith("| gradient")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)}


def test_sft_throughput_tiny_has_every_arm():
    table = _table(_run("sft_throughput.py", "--tiny", "--repeats", "1"))
    assert list(table) == ["ftdist", "trl", "trl_packing", "bare"]
    padding = {arm: float(cells[4].rstrip("%")) for arm, cells in table.items()}
    for arm, cells in table.items():
        assert float(cells[0]) > 0 and float(cells[2]) > 0, (arm, cells)  # tokens/s, tokens per CPU-s
    assert padding["ftdist"] == padding["bare"] == padding["trl_packing"] == 0.0
    assert padding["trl"] > 5.0  # padded batches of mixed lengths


def test_gpu_sft_tiny_reports_both_settings():
    out = _run("gpu_sft.py", "--tiny")
    table = _table(out)
    assert list(table) == ["off", "on"]  # gradient checkpointing
    import torch

    for setting, (tokens_per_s, mfu, padding) in table.items():
        assert float(tokens_per_s) > 0
        assert float(padding.rstrip("%")) <= 3.0  # best-fit packing leaves only a few percent
        if torch.cuda.is_available():
            assert re.fullmatch(r"\d+\.\d%", mfu) or mfu == "n/a"  # n/a: a GPU missing from the peak table
        else:
            assert mfu == "n/a"
    if not torch.cuda.is_available():
        assert "no GPU" in out
