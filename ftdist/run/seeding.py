"""Seeds and RNG state: one seed for the run, derived seeds for sampling, and the per-rank RNG state
that checkpoints save and restore."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from (run seed, iteration, rank, ...): resumed runs sample exactly what a straight run does."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    # plain ints and tensors only, so that loading works with torch.load(weights_only=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": list(py_keys),
        "python_version": py_version,
        "python_gauss": py_gauss,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
