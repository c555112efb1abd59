"""metrics.jsonl, TensorBoard, optional W&B, and the rank-0 progress bar."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Mapping, Optional

from ftdist.config import ConfigError

# WANDB_MODE values that log without the service (offline: to files for `wandb sync`), so no key is needed
WANDB_KEYLESS_MODES = ("offline", "dryrun", "disabled")


def wandb_problem(environ: Optional[Mapping[str, str]] = None, installed: Optional[bool] = None,
                  netrc_file: Optional[str] = None) -> Optional[str]:
    """Why logging.wandb=true would fail in this environment (one line saying what fixes it), or None.

    installed: whether the wandb package can be imported (default: looked up); a key is WANDB_API_KEY or the
    api.wandb.ai entry `wandb login` writes to ~/.netrc (netrc_file, default $NETRC or ~/.netrc)."""
    environ = os.environ if environ is None else environ  # read at the call: the process's environment now
    if installed is None:
        installed = _importable("wandb")
    if not installed:
        return ("logging.wandb=true but the wandb package is not installed: pip install 'ftdist[wandb]' (or pip "
                "install wandb), or set logging.wandb=false")
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_MODE", "").lower() in WANDB_KEYLESS_MODES:
        return None
    if _netrc_has_key(netrc_file or environ.get("NETRC") or os.path.expanduser("~/.netrc"),
                      environ.get("WANDB_BASE_URL", "https://api.wandb.ai")):
        return None
    return ("logging.wandb=true but no W&B API key was found: set WANDB_API_KEY (or run `wandb login`), or "
            "WANDB_MODE=offline to log to files only (`wandb sync` uploads them later)")


def _importable(name: str) -> bool:
    """Whether `import name` succeeds. A module already imported counts, whatever it is: find_spec raises
    ValueError for one without __spec__ (a stand-in placed in sys.modules); None there blocks the import."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, a broken module entry
        return False


def _netrc_has_key(path: str, base_url: str) -> bool:
    import netrc
    from urllib.parse import urlparse

    try:
        return netrc.netrc(path).authenticators(urlparse(base_url).hostname or base_url) is not None
    except (OSError, netrc.NetrcParseError):  # no file, or one that cannot be read: no key from it
        return False


class MetricsWriter:
    """Rank 0 writes; other ranks hold a writer that does nothing, so call sites need no rank checks.

    resumed_at: the step a resumed run continues from; records of later steps (logged by the run before it
    died, after its last checkpoint) are dropped, so every step appears once.
    """

    def __init__(self, output_dir: str, enabled: bool, logging_cfg=None, config_dict: Optional[dict] = None,
                 resumed_at: Optional[int] = None):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None and self.path.exists():
            self._drop_after(resumed_at)
        if logging_cfg is not None and logging_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                self.tb = None
        if logging_cfg is not None and logging_cfg.wandb:
            problem = wandb_problem()
            if problem is not None:
                raise ConfigError(problem)
            import wandb

            self.wandb = wandb.init(project=logging_cfg.wandb_project, config=config_dict, dir=output_dir,
                                    resume="allow", name=os.path.basename(os.path.abspath(output_dir)))

    def _drop_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut off when the run died
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        step = record.get("step", 0)
        for k, v in record.items():
            if k in ("step",) or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.tb is not None:
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if k != "step"}, step=step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """An evaluation's samples (prompt, answer, reference, score of every row) as samples/step_N.jsonl, written
        whole then renamed; with W&B, also a table `eval/samples` (one row per sample, the union of their keys
        as columns)."""
        if not self.enabled or not samples:
            return
        out = self.path.parent / "samples" / f"step_{step}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        os.replace(tmp, out)
        if self.wandb is not None:
            import wandb

            columns = list(dict.fromkeys(k for s in samples for k in s))
            cell = (lambda v: v if isinstance(v, (int, float, str)) or v is None else json.dumps(v, ensure_ascii=False))
            table = wandb.Table(columns=columns, data=[[cell(s.get(c)) for c in columns] for s in samples])
            self.wandb.log({"eval/samples": table}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """tqdm on rank 0 with loss and tokens/s; tqdm computes the ETA from the step rate."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train"):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
        self.t0 = time.time()

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in postfix.items()},
                                 refresh=False)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
