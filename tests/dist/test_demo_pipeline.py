"""`make demo`'s SFT stage and the demo pipeline SFT -> reward model -> DPO on the tiny task (2 gloo ranks, CPU)
learn at every stage.

One run proves both: the pipeline's SFT stage is the SFT-only demo (the same recipe, overrides and before/after
table); it takes ~150 s on 2 cores because it is three real 2-rank trainings, each to its accuracy bar."""

import re
import sys

import pytest

from tests.helpers import read_metrics, run_group

pytestmark = pytest.mark.dist


def test_demo_pipeline_sft_rm_dpo(tmp_path):
    """Alone proves: the README's demo commands run end to end and each stage reaches its accuracy."""
    out = run_group([sys.executable, "launch/demo.py", "--stages", "sft,rm,dpo", "--out", str(tmp_path)], 1200)
    assert out.returncode == 0, out.stderr[-4000:]
    # the SFT table of `make demo`: eval loss and accuracy before and after
    rows = {m[0]: (float(m[1]), float(m[2]))
            for m in re.findall(r"^(before|after)\s+([\d.]+)\s+([\d.]+)%", out.stdout, re.M)}
    assert rows["before"][1] < 10 and rows["after"][1] >= 90, out.stdout
    assert rows["after"][0] < rows["before"][0] / 10
    assert read_metrics(tmp_path / "sft")[-1]["eval/accuracy"] >= 0.9
    assert (tmp_path / "sft" / "final" / "model.safetensors").exists()
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
