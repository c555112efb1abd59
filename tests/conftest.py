import os
import sys
import tempfile

import pytest
import torch

# one cache for the embedded tiny model and task across the whole session (subprocesses inherit it)
os.environ.setdefault("FTDIST_CACHE", os.path.join(tempfile.gettempdir(), "ftdist-test-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# the environment's own tools first, as in an activated venv: DeepSpeed JIT-builds its CPU ops with
# whichever `ninja` is on PATH, and a system ninja of another version (a different command hash in
# .ninja_log) makes every switch rebuild the op for a minute, under a lock all ranks wait on
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


def pytest_sessionstart(session):
    # an op build killed part-way (a timed-out test, a killed earlier run) leaves a lock that every later
    # DeepSpeed start would wait on for ever; none of this suite's builds is running yet
    from ftdist.engine.engine import clear_stale_build_locks

    clear_stale_build_locks(max_age_s=0)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
