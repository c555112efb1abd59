"""Rank 0 tokenises while the other ranks wait for its cache: however long that takes (longer than the
process-group timeout here), and when it fails, every rank stops with rank 0's error instead of timing out."""

import time

import pytest

from tests.helpers import read_metrics, run_ftdist, start_ranks

pytestmark = pytest.mark.dist

TIMEOUT_S = 5  # dist.timeout_s: every collective of these tiny runs takes well under a second
SLOW_S = 3 * TIMEOUT_S  # rank 0's data preparation takes this much longer than usual


def test_other_ranks_wait_longer_than_the_collective_timeout(tmp_path):
    out = tmp_path / "run"
    proc = run_ftdist(2, "sft_tiny", [f"output_dir={out}", "data.eval=null", "train.max_steps=2", "train.log_every=1",
                                      f"dist.timeout_s={TIMEOUT_S}", "train.progress_bar=false"],
                      env={"FTDIST_SLOW_DATA_S": str(SLOW_S)})
    assert proc.returncode == 0
    assert f"FTDIST_SLOW_DATA_S={SLOW_S}" in proc.stdout + proc.stderr  # the delay did happen
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]


def test_a_data_error_on_rank_0_stops_every_rank_with_it(tmp_path):
    """Ranks started by hand (srun-style): torchrun would kill rank 1 as soon as rank 0 exits, hiding what it does."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}]}\n')
    t0 = time.monotonic()
    procs = start_ranks(2, ["sft_tiny", f"output_dir={tmp_path / 'run'}", f"data.train={bad}", "data.eval=null",
                            "dist.timeout_s=600", "dist.backend=gloo", "train.progress_bar=false"], tmp_path)
    try:
        codes = [p.wait(timeout=120) for p in procs]  # far below dist.timeout_s: nobody waited for a timeout
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert time.monotonic() - t0 < 120
    for rank in (0, 1):
        log = (tmp_path / f"rank{rank}.log").read_text()
        assert codes[rank] != 0, log[-3000:]
        lines = [ln for ln in log.splitlines() if ln.startswith("ftdist: error")]
        assert lines and f"{bad}: row 2:" in lines[0], log[-3000:]
        assert "Traceback" not in log
