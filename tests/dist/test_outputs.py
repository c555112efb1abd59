"""What a run writes at the end: final/ unless train.save_final=false."""

import pytest

from tests.helpers import read_metrics, run_ftdist

pytestmark = pytest.mark.dist


def test_save_final_false_leaves_the_checkpoint_only(tmp_path):
    out = tmp_path / "run"
    proc = run_ftdist(1, "sft_tiny", [f"output_dir={out}", "train.save_final=false", "train.max_steps=2",
                                      "data.eval=null", "train.progress_bar=false", "train.log_every=1"])
    assert not (out / "final").exists() and not list(out.glob(".tmp-final*"))
    assert (out / "checkpoints" / "step-2" / "manifest.json").exists()
    assert "train.save_final=false" in proc.stderr
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]
