"""Logging set-up for every entry point: rank 0 informs, the other ranks only warn."""

from __future__ import annotations

import logging


LOG_FORMAT, DATE_FORMAT = "%(asctime)s %(levelname)s ftdist: %(message)s", "%H:%M:%S"


def setup_logging(is_main: bool) -> None:
    import warnings

    # library deprecation chatter on every rank drowns the progress bar
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format=LOG_FORMAT, datefmt=DATE_FORMAT)
    logging.getLogger("ftdist").setLevel(logging.INFO if is_main else logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fmt_metrics(d: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
