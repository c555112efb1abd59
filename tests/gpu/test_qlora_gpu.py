"""QLoRA on CUDA: single-GPU dev mode with the real paged optimizer, and ZeRO-3 over two GPUs (skipped without)."""

import json

import pytest
import torch

from tests.helpers import read_metrics, run_ftdist

pytestmark = pytest.mark.gpu

TINY = ["model.name_or_path=ftdist/tiny", "data.train=ftdist/tiny-task", "data.max_length=64", "train.max_steps=4",
        "train.progress_bar=false", "train.log_every=1", "checkpoint.every_steps=0"]


def test_qlora_7b_recipe_on_one_gpu_without_launcher(tmp_path):
    run = tmp_path / "run"
    out = run_ftdist(1, "qlora_7b", [f"output_dir={run}", *TINY])
    assert "paged optimizers need CUDA" not in out.stderr  # the real PagedAdamW32bit
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert json.loads((run / "final" / "adapter_config.json").read_text())["r"] == 64


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_qlora_zero3_on_two_gpus(tmp_path):
    run = tmp_path / "run"
    run_ftdist(2, "qlora_tiny", [f"output_dir={run}", "deepspeed.zero_stage=3", "model.dtype=bf16",
                                 "model.quantization.compute_dtype=bf16", "data.eval=null", "train.micro_batch_size=4",
                                 "train.global_batch_size=16", *TINY[2:]])
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert losses[-1] < losses[0]
    from tests.helpers import load_weights

    assert all(v.numel() > 0 for v in load_weights(run / "final").values())
