"""Evaluation metrics of an SFT run with label smoothing: perplexity is exp of the plain NLL, not of the
smoothed loss the run trains on."""

import math

import pytest

from tests.helpers import read_metrics, run_ftdist

pytestmark = pytest.mark.dist


def test_perplexity_comes_from_the_unsmoothed_nll(tmp_path):
    out = tmp_path / "run"
    run_ftdist(1, "sft_tiny", [f"output_dir={out}", "train.label_smoothing=0.1", "train.max_steps=1",
                               "train.eval_accuracy=false", "train.progress_bar=false", "train.eval_max_samples=64"])
    evals = [r for r in read_metrics(out) if "eval/loss" in r]
    assert len(evals) == 2  # before and after training
    for r in evals:
        # smoothed loss - nll = eps * (mean over the vocabulary of -log p - nll): 0.1 x at least ~0.01 nats even
        # for the near-uniform model at the start, far above the float64 rounding of either (~1e-15); perplexity
        # is exp(nll) to the rounding of exp (relative 1e-15; 1e-12 allowed)
        assert abs(r["eval/loss"] - r["eval/nll"]) > 1e-4 and r["eval/nll"] > 0
        assert r["eval/perplexity"] == pytest.approx(math.exp(r["eval/nll"]), rel=1e-12)
    train = [r for r in read_metrics(out) if "loss" in r]
    assert train and abs(train[0]["nll"] - train[0]["loss"]) > 1e-4
