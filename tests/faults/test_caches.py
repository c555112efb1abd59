"""Caches follow content, not paths or file times: tokenised data, and precomputed DPO reference log-probs."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.faults


def _rows(answer: str) -> str:
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"Sort the digits: {d}"},
                                            {"role": "assistant", "content": answer}]}) + "\n" for d in "123")


def test_tokenised_data_is_redone_when_the_content_changes_at_the_same_size_and_time(tmp_path):
    from ftdist.config import load_config
    from ftdist.data.tokenize import tokenize_sft
    from ftdist.models.loading import load_tokenizer

    data = tmp_path / "data.jsonl"
    data.write_text(_rows("1 2 3"))
    cfg = load_config(data={"data": {"train": str(data), "max_length": 64}})
    tok = load_tokenizer(cfg.model)
    first, _ = tokenize_sft(str(data), tok, cfg.data, str(tmp_path / "cache"))
    stat = data.stat()
    data.write_text(_rows("3 2 1"))  # same length, other answers
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old modification time
    assert data.stat().st_size == stat.st_size and data.stat().st_mtime_ns == stat.st_mtime_ns
    second, _ = tokenize_sft(str(data), tok, cfg.data, str(tmp_path / "cache"))
    assert first["input_ids"] != second["input_ids"]
    assert tok.decode(second["input_ids"][0]).count("3 2 1") == 1


def test_precomputed_reference_log_probs_follow_the_reference_weights(tmp_path):
    from ftdist.config import load_config
    from ftdist.models.loading import resolve_model_path
    from ftdist.train.reference import Reference

    model = tmp_path / "ref"
    shutil.copytree(resolve_model_path("ftdist/tiny"), model)
    cfg = load_config(data={"stage": "dpo", "model": {"name_or_path": str(model)},
                            "data": {"train": "ftdist/tiny-task/train_pref"}, "dpo": {"reference": "precomputed"}})
    task = SimpleNamespace(cfg=cfg, cache_dir=str(tmp_path / "cache"))
    data = SimpleNamespace(key="pairs-v1")
    before = Reference(task)._cache_file("train", data)
    weights = model / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01  # other weights at the same path, same size
    weights.write_bytes(bytes(blob))
    after = Reference(task)._cache_file("train", data)
    assert before != after and before.parent == after.parent
