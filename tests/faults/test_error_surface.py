"""Bad input reaches the user as one line that names the file and, where there is one, the line: not as a
traceback from inside datasets, safetensors or the hub client."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.helpers import run_ftdist

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("name,content,words", [
    ("nonutf8.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9 au lait"}\n', ["line 2, column 14", "not UTF-8", "0xe9"]),
    ("empty.jsonl", b"", ["the file is empty (0 bytes)"]),
    ("blank.jsonl", b"\n\n  \n", ["no rows"]),
    ("header.csv", b"instruction,input,output\n", ["no rows (only a header line)"]),
    ("binary.jsonl", b'{"text": "ok"}\n\x00\x01\x02\xff', ["line 2", "binary content"]),
    ("broken.jsonl", b'{"text": "a"}\n{"text": "b"}\n\n{"text": "c"}\nnull, oops\n{"text": "d"}\n',
     ["line 5, column 5: not valid JSON (Extra data)"]),
    ("list.jsonl", b'{"text": "a"}\n["not", "an", "object"]\n', ["line 2: a JSON list, not an object"]),
    ("broken.json", b'[\n  {"text": "a"},\n  {"text" "b"}\n]\n',
     ["line 3, column 11: not valid JSON (Expecting ':' delimiter)"]),
])
def test_unreadable_data_files_are_named_with_their_line(tmp_path, name, content, words):
    from ftdist.data.loading import DataError, load_rows

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_rows(str(path))
    assert str(e.value).startswith(str(path))
    for w in words:
        assert w in str(e.value)


def test_a_bad_data_file_through_the_command_line_is_one_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"messages": [{"role": "user", "content": "d\xe9j\xe0 vu"}]}\n'.encode("latin-1"))
    proc = run_ftdist(1, "sft_tiny", [f"output_dir={tmp_path / 'run'}", f"data.train={path}", "data.eval=null",
                                      "train.max_steps=1"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"ftdist: error: {path}: line 1, column 45: not UTF-8 text" in proc.stderr


def test_a_damaged_weights_file_names_the_model_and_the_problem(tmp_path):
    from ftdist.config import load_config
    from ftdist.models.loading import ModelError, load_causal_lm, resolve_model_path

    model = tmp_path / "model"
    shutil.copytree(resolve_model_path("ftdist/tiny"), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk or an interrupted copy
    cfg = load_config(data={"model": {"name_or_path": str(model), "dtype": "fp32"}, "data": {"train": "x.jsonl"}})
    with pytest.raises(ModelError, match=rf"model.name_or_path='{model}': cannot load the model: SafetensorError"):
        load_causal_lm(cfg.model)


@pytest.mark.parametrize("name", ["models/llama-typo", "./llama", "../checkpoints/final", "a/b/c"])
def test_a_local_path_that_does_not_exist_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, name):
    from ftdist.models.loading import ModelError, _check_source

    monkeypatch.chdir(tmp_path)
    os.mkdir("models")  # models/llama-typo: its first part is a local directory, so a local path was meant
    with pytest.raises(ModelError, match="does not exist"):
        _check_source(name, "model")
