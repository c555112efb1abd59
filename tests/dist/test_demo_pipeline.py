"""The demo pipeline SFT -> reward model -> DPO on the tiny task (2 gloo ranks, CPU) learns at every stage."""

import re
import sys

import pytest

from tests.helpers import ROOT, read_metrics, run_group

pytestmark = pytest.mark.dist


def test_demo_pipeline_sft_rm_dpo(tmp_path):
    out = run_group([sys.executable, "launch/demo.py", "--stages", "sft,rm,dpo", "--out", str(tmp_path)], 1200)
    assert out.returncode == 0, out.stderr[-4000:]
    # columns: RM held-out accuracy, DPO reward accuracy, task accuracy (then any the table grows)
    table = {m[0]: tuple(m[1].split()) for m in re.findall(r"^(sft|rm|dpo)((?:[ \t]+\S+){3,})$", out.stdout, re.M)}
    assert set(table) == {"sft", "rm", "dpo"}, out.stdout

    def pct(s):
        return float(s.rstrip("%"))

    assert table["sft"][:2] == ("-", "-") and pct(table["sft"][2]) >= 90
    assert pct(table["rm"][0]) >= 85  # held-out pairs ranked right by the reward model
    assert pct(table["dpo"][1]) >= 85  # held-out implicit-reward accuracy
    assert pct(table["dpo"][2]) >= 85  # DPO keeps the task
    rm = [m for m in read_metrics(tmp_path / "rm") if "eval/accuracy" in m]
    assert rm[-1]["eval/accuracy"] == pytest.approx(pct(table["rm"][0]) / 100, abs=1e-3)
    assert (tmp_path / "rm" / "final" / "config.json").exists()
    assert "ForSequenceClassification" in (tmp_path / "rm" / "final" / "config.json").read_text()
