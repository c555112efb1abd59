"""Evaluation suites shared by `ftdist eval`, `stage: eval` recipes and evaluation during training."""
