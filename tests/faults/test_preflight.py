"""What a recipe asks that this machine or its files cannot give is refused in one line before the tokenizer, the
data or the model loads (models/preflight.py): it used to fail after loading, or as a traceback."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.faults

QUICK = ["data.eval=null", "train.max_steps=1", "train.progress_bar=false", "logging.tensorboard=false",
         "checkpoint.every_steps=0", "train.global_batch_size=2", "train.micro_batch_size=2", "model.dtype=fp32"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A GPT-2-shaped base model (64 positions, no chat template) and a file of text rows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ftdist.config import ModelConfig
    from ftdist.models.loading import load_tokenizer

    root = tmp_path_factory.mktemp("base")
    tok = load_tokenizer(ModelConfig())
    tok.chat_template = None
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"plain text row {i} to continue pretraining on"}) + "\n"
                            for i in range(4)))
    return root / "gpt2", text


def _train(capsys, tmp_path, *overrides) -> tuple[int, str]:
    from ftdist.cli import main

    rc = main(["train", "sft_tiny", f"output_dir={tmp_path / 'run'}", *QUICK, *overrides])
    return rc, capsys.readouterr().err


def _refused(rc: int, err: str) -> str:
    """The one error line of a refused run; nothing of the model was loaded."""
    lines = [ln for ln in err.splitlines() if ln.startswith("ftdist: error")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "parameters" not in err  # the model-size line comes after the model loads
    return lines[0]


def test_text_rows_train_a_base_model_without_a_chat_template(gpt2, tmp_path, capsys):
    """data.format=text on a GPT-2-shaped base model: it used to be refused for lacking a chat template; and a
    data.max_length above its 64 positions is refused naming both numbers (it used to crash with an IndexError on
    the first long row)."""
    model, text = gpt2
    rc, err = _train(capsys, tmp_path, f"model.name_or_path={model}", f"data.train={text}", "data.format=text",
                     "data.max_length=64")
    assert rc == 0, err[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    rc, err = _train(capsys, tmp_path / "long", f"model.name_or_path={model}", f"data.train={text}",
                     "data.max_length=1536")
    assert _refused(rc, err) == (f"ftdist: error: data.max_length=1536 is above the 64 positions {model} takes "
                                 f"(max_position_embeddings in its config); set data.max_length <= 64, or null for 64")


def test_an_adapter_directory_as_the_model_points_to_merge(tmp_path, capsys):
    adapter = tmp_path / "sft" / "final"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "ftdist/tiny"}))
    line = _refused(*_train(capsys, tmp_path, f"model.name_or_path={adapter}", "data.train=ftdist/tiny-task"))
    assert line.startswith(f"ftdist: error: model.name_or_path: {adapter} is a LoRA adapter (adapter_config.json, no "
                           f"config.json), not a whole model: merge it into its base first (ftdist merge --adapter "
                           f"{adapter} --out DIR)")
    assert "DPO (or any stage) from an SFT adapter needs this merge too" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a GPU")
def test_fp16_on_a_cpu_is_refused_before_loading(tmp_path, capsys):
    line = _refused(*_train(capsys, tmp_path, "data.train=ftdist/tiny-task", "model.dtype=fp16"))
    assert line == ("ftdist: error: model.dtype=fp16 needs a GPU (DeepSpeed's fp16 mode with loss scaling does not "
                    "run on the CPU); use model.dtype=bf16 or fp32 here")


def test_a_missing_source_of_a_mixture_is_named_by_its_key(tmp_path, capsys):
    gone = tmp_path / "gone.jsonl"
    line = _refused(*_train(capsys, tmp_path, f"data.train=[ftdist/tiny-task, {{path: {gone}, weight: 0.5}}]"))
    assert line == f"ftdist: error: data.train[1]: {gone}: data file not found"


def test_wandb_without_its_package_or_a_key_is_one_line(tmp_path, capsys, monkeypatch):
    """The decision (run/metrics.wandb_problem) for each environment, and the command line with this one."""
    from ftdist.run.metrics import wandb_problem

    netrc = tmp_path / "netrc"
    assert "pip install 'ftdist[wandb]'" in wandb_problem({}, installed=False, netrc_file=str(netrc))
    no_key = wandb_problem({}, installed=True, netrc_file=str(netrc))
    assert "set WANDB_API_KEY (or run `wandb login`), or WANDB_MODE=offline" in no_key
    assert wandb_problem({"WANDB_API_KEY": "k"}, installed=True, netrc_file=str(netrc)) is None
    assert wandb_problem({"WANDB_MODE": "offline"}, installed=True, netrc_file=str(netrc)) is None
    assert wandb_problem({"WANDB_MODE": "online"}, installed=True, netrc_file=str(netrc)) == no_key
    netrc.write_text("machine api.wandb.ai\n  login user\n  password k\n")  # what `wandb login` writes
    assert wandb_problem({}, installed=True, netrc_file=str(netrc)) is None
    assert wandb_problem({"WANDB_BASE_URL": "https://wandb.example.com"}, installed=True,
                         netrc_file=str(netrc)) == no_key  # a key for another server
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    line = _refused(*_train(capsys, tmp_path, "data.train=ftdist/tiny-task", "logging.wandb=true"))
    assert line == "ftdist: error: " + wandb_problem()
    import sys
    import types

    # the package looked up: a module already imported counts (find_spec refuses one without __spec__, as a
    # stand-in is), a blocked import (None in sys.modules) does not
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace())
    assert wandb_problem({"WANDB_API_KEY": "k"}, netrc_file=str(netrc)) is None
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert "pip install 'ftdist[wandb]'" in wandb_problem({"WANDB_API_KEY": "k"}, netrc_file=str(netrc))


def test_ppo_is_checked_before_anything_loads(tmp_path, capsys, monkeypatch):
    """stage=ppo runs preflight in its controller before the tokenizer, the prompts or any actor: a LoRA adapter
    as the model, a missing mixture source, logging.wandb without its package or key, each one line before the
    run directory is claimed. The precision is left to the actors' devices: fp16 is not refused here."""
    from ftdist.cli import main
    from ftdist.config import load_config
    from ftdist.models.preflight import preflight
    from ftdist.run.metrics import wandb_problem

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "ftdist/tiny"}))
    gone = tmp_path / "gone.jsonl"
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    for override, words in [(f"model.name_or_path={adapter}", f"model.name_or_path: {adapter} is a LoRA adapter"),
                            (f"data.train=[ftdist/tiny-task/prompts, {{path: {gone}, weight: 0.5}}]",
                             f"data.train[1]: {gone}: data file not found"),
                            ("logging.wandb=true", wandb_problem())]:
        rc = main(["train", "grpo_tiny", f"output_dir={tmp_path / 'run'}", "data.eval=null", override])
        assert _refused(rc, capsys.readouterr().err).startswith(f"ftdist: error: {words}")
        assert not (tmp_path / "run").exists()  # refused before the run directory was claimed
    assert preflight(load_config("grpo_tiny", ["model.dtype=fp16"])).model.dtype == "fp16"
