import os
import tempfile

import pytest
import torch

# one cache for the embedded tiny model and task across the whole session (subprocesses inherit it)
os.environ.setdefault("FTDIST_CACHE", os.path.join(tempfile.gettempdir(), "ftdist-test-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
