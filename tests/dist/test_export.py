"""`ftdist export RUN --step N`: a mid-run checkpoint as a Hugging Face model, from ZeRO-3 shards of 2 ranks and
from a one-rank ZeRO-0 state; a LoRA run's as its PEFT adapter; clear errors for a missing step."""

import json
import subprocess

import pytest

from tests.helpers import load_weights, max_abs_diff, run_ftdist, run_inprocess

pytestmark = pytest.mark.dist

COMMON = ["data.eval=null", "train.max_steps=2", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
          "model.dtype=fp32", "train.progress_bar=false"]


def _export(*args: str) -> subprocess.CompletedProcess:
    return run_inprocess(["export", *args])


@pytest.mark.parametrize("nproc,zero", [(2, 3), (1, 0)])
def test_export_of_the_last_step_equals_final(tmp_path, nproc, zero):
    """The step-2 checkpoint of a 2-step run holds the weights final/ was written from: both are the fp32 weights
    after step 2, copied without arithmetic, so they are equal exactly; step 1's differ. Under ZeRO-3 the export
    rebuilds the weights from the engine's own shards (zero_to_fp32) while final/ was gathered from the live
    partitions: their equality is also the proof that final/ holds what the engine trained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    run_ftdist(nproc, "sft_tiny", [f"output_dir={run}", f"deepspeed.zero_stage={zero}", *COMMON])
    for step in (1, 2):
        proc = _export(str(run), "--step", str(step), "--out", str(tmp_path / f"step{step}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
    final = load_weights(run / "final")
    assert max_abs_diff(load_weights(tmp_path / "step2"), final) == 0.0
    assert max_abs_diff(load_weights(tmp_path / "step1"), final) > 0.0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "step2")  # a plain Hugging Face directory
    tok = AutoTokenizer.from_pretrained(tmp_path / "step2")
    assert model.config.vocab_size >= len(tok) and tok.chat_template


def test_export_of_a_lora_run_is_its_adapter_and_errors_name_the_steps(tmp_path):
    run = tmp_path / "run"
    run_ftdist(1, "sft_tiny", [f"output_dir={run}", "model.lora.r=4", *COMMON])
    proc = _export(str(run), "--out", str(tmp_path / "latest"))  # --step latest
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = run / "checkpoints" / "step-2" / "adapter"
    assert json.loads((tmp_path / "latest" / "adapter_config.json").read_text()) == \
        json.loads((saved / "adapter_config.json").read_text())
    assert (tmp_path / "latest" / "adapter_model.safetensors").read_bytes() == \
        (saved / "adapter_model.safetensors").read_bytes()
    proc = _export(str(run), "--step", "7", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "--step 7" in proc.stderr and "complete: 1, 2" in proc.stderr
    proc = _export(str(run), "--out", str(tmp_path / "latest"))
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert "Traceback" not in proc.stderr
