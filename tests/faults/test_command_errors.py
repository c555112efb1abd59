"""Every command behind one error boundary: a bad argument of each kind (a missing path, a bad key, a damaged or
crafted file, an unwritable output) ends as one line `ftdist: error: ...` with the command's exit code, never as
a traceback; an unexpected exception ends as one line naming the file its traceback went to. In-process
(`ftdist.cli.main`), on the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ftdist.cli import main

pytestmark = pytest.mark.faults

EVAL = ["--suite", "perplexity=ftdist/tiny-task/eval", "--max-samples", "2"]


class _RunsCode:
    """Pickled, it would run a shell command when loaded: a crafted weights file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A truncated model, a model and an adapter with crafted pickles, a run with a crafted checkpoint."""
    import torch

    from ftdist.config import load_config
    from ftdist.engine.checkpoint import begin_checkpoint, commit_checkpoint
    from ftdist.models.loading import resolve_model_path
    from ftdist.run.outputs import dump_config

    d = tmp_path_factory.mktemp("bad")
    tiny = Path(resolve_model_path("ftdist/tiny"))
    shutil.copytree(tiny, d / "trunc")
    weights = d / "trunc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk or an interrupted copy
    evil = _RunsCode(d / "code-ran")
    shutil.copytree(tiny, d / "crafted")
    (d / "crafted" / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": evil}, d / "crafted" / "pytorch_model.bin")
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(tiny), "r": 4,
         "lora_alpha": 4, "target_modules": ["q_proj"]}))
    torch.save({"x": evil}, d / "adapter" / "adapter_model.bin")
    run = d / "run"
    run.mkdir()
    dump_config(load_config("sft_tiny", [f"output_dir={run}"]), run / "config.yaml")
    tmp = begin_checkpoint(run / "checkpoints", 1, "r1")
    (tmp / "engine").mkdir()
    torch.save({"module": evil}, tmp / "engine" / "mp_rank_00_model_states.pt")
    commit_checkpoint(tmp, run / "checkpoints", 1, {"step": 1}, 0, "r1")  # a valid manifest: only the load refuses
    (d / "p.jsonl").write_text(json.dumps({"prompt": "Sort the digits: 3 1"}) + "\n")
    yield d
    assert not (d / "code-ran").exists()  # every crafted file was refused without running its code


@pytest.fixture(scope="module")
def read_only(tmp_path_factory) -> Path:
    """A directory on a read-only file system (a read-only tmpfs: root ignores permission bits, not this)."""
    d = tmp_path_factory.mktemp("ro")
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(d)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"root without the right to mount a read-only file system: {mounted.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


CASES = [  # id, argv ({d}: the files above, {ro}: the read-only directory), exit code, the line names
    ("train-missing-recipe", ["train", "{d}/none.yaml"], 2, "{d}/none.yaml"),
    ("train-bad-key", ["train", "sft_tiny", "train.lrr=1"], 2, "train.lrr"),
    ("train-read-only-output", ["train", "sft_tiny", "output_dir={ro}/run", "data.eval=null"], 2,
     "output_dir {ro}/run: cannot write in {ro} (Read-only file system)"),
    ("train-no-recipe", ["train"], 2, "ftdist train: the following arguments are required"),
    ("eval-missing-model", ["eval", "{d}/none", *EVAL], 2, "{d}/none: no such model directory"),
    ("eval-bad-suite", ["eval", "ftdist/tiny", "--suite", "bleu=x.jsonl"], 2, "SUITE=FILE"),
    ("eval-truncated-weights", ["eval", "{d}/trunc", *EVAL], 2, "{d}/trunc/model.safetensors: damaged"),
    ("eval-crafted-checkpoint", ["eval", "{d}/run", "--step", "1", *EVAL], 2, "mp_rank_00_model_states.pt: refused"),
    ("eval-read-only-out", ["eval", "ftdist/tiny", *EVAL, "--out", "{ro}/eval"], 2, "--out {ro}/eval: cannot write"),
    ("eval-missing-reward-model", ["eval", "ftdist/tiny", "--suite", "reward=ftdist/tiny-task/eval_prompts",
                                   "--reward-model", "{d}/rm"], 2, "--reward-model: {d}/rm does not exist"),
    ("eval-split-of-one-file", ["eval", "ftdist/tiny", "--suite", "perplexity@test=ftdist/tiny-task/eval"], 2,
     "is one file, with one split"),
    ("eval-unknown-template", ["eval", "ftdist/tiny", *EVAL, "--chat-template", "nope"], 2, "--chat-template='nope'"),
    ("eval-max-length-above-positions", ["eval", "ftdist/tiny", *EVAL, "--max-length", "4096"], 2,
     "--max-length=4096 is above the 512 positions ftdist/tiny takes (max_position_embeddings in its config); set "
     "--max-length <= 512, or leave it out for 512"),
    ("eval-recipe-max-length-above-positions", ["train", "sft_tiny", "stage=eval", "eval.models=[ftdist/tiny]",
                                                "eval.suites=[perplexity=ftdist/tiny-task/eval]", "eval.max_samples=2",
                                                "eval.max_length=4096", "output_dir={d}/eval-run"], 2,
     "eval.max_length=4096 is above the 512 positions ftdist/tiny takes (max_position_embeddings in its config); "
     "set eval.max_length <= 512, or null for 512"),
    ("generate-missing-prompts", ["generate", "ftdist/tiny", "--prompts", "{d}/none.jsonl", "--out", "{d}/a.jsonl"],
     2, "{d}/none.jsonl"),
    ("generate-truncated-weights", ["generate", "{d}/trunc", "--prompts", "{d}/p.jsonl", "--out", "{d}/a.jsonl"], 2,
     "{d}/trunc/model.safetensors: damaged"),
    ("generate-crafted-weights", ["generate", "{d}/crafted", "--prompts", "{d}/p.jsonl", "--out", "{d}/a.jsonl"], 2,
     "{d}/crafted/pytorch_model.bin: refused"),
    ("generate-crafted-adapter", ["generate", "{d}/adapter", "--prompts", "{d}/p.jsonl", "--out", "{d}/a.jsonl"], 2,
     "{d}/adapter/adapter_model.bin: refused"),
    ("generate-read-only-out", ["generate", "ftdist/tiny", "--prompts", "{d}/p.jsonl", "--out", "{ro}/a/b.jsonl"],
     2, "--out {ro}/a/b.jsonl: cannot write in {ro}"),
    ("chat-missing-model", ["chat", "{d}/none"], 2, "{d}/none: no such model directory"),
    ("chat-truncated-weights", ["chat", "{d}/trunc"], 2, "{d}/trunc/model.safetensors: damaged"),
    ("export-not-a-run", ["export", "{d}/trunc", "--out", "{d}/x"], 2, "no config.yaml"),
    ("export-missing-step", ["export", "{d}/run", "--step", "9", "--out", "{d}/x"], 2, "--step 9"),
    ("export-crafted-checkpoint", ["export", "{d}/run", "--out", "{d}/x"], 2, "mp_rank_00_model_states.pt: refused"),
    ("export-read-only-out", ["export", "{d}/run", "--out", "{ro}/x"], 2, "--out {ro}/x: cannot write"),
    ("merge-missing-adapter", ["merge", "--adapter", "{d}/none", "--out", "{d}/m"], 2, "{d}/none: no such directory"),
    ("merge-crafted-adapter", ["merge", "--adapter", "{d}/adapter", "--out", "{d}/m"], 2,
     "{d}/adapter/adapter_model.bin: refused"),
    ("merge-crafted-base", ["merge", "--base", "{d}/crafted", "--adapter", "{d}/adapter", "--out", "{d}/m"], 2,
     "{d}/crafted/pytorch_model.bin: refused"),
    ("merge-read-only-out", ["merge", "--adapter", "{d}/adapter", "--out", "{ro}/m"], 2, "--out {ro}/m: cannot write"),
    ("plan-bad-number", ["plan", "--model", "7b", "--nodes", "0"], 2, "--nodes: got 0"),
    ("plan-unknown-model", ["plan", "--model", "nope"], 2, "neither a preset"),
    ("plan-read-only-recipe", ["plan", "--model", "7b", "--emit-recipe", "{ro}/r.yaml"], 2,
     "--emit-recipe {ro}/r.yaml: cannot write"),
    ("recipes-extra-argument", ["recipes", "extra"], 2, "ftdist recipes: unrecognized arguments: extra"),
]


def _one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("ftdist: error")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("argv,code,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_command_ends_a_bad_argument_in_one_line(argv, code, words, files, read_only, capsys):
    fill = {"d": files, "ro": read_only}
    assert main([a.format(**fill) for a in argv]) == code
    line = _one_error_line(capsys)
    assert line.startswith("ftdist: error: ") and words.format(**fill) in line, line


def test_ranks_other_than_0_name_themselves(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert main(["plan", "--model", "nope"]) == 2
    assert _one_error_line(capsys).startswith("ftdist: error (rank 1): ")


def test_an_unexpected_failure_is_one_line_with_its_traceback_in_a_file(tmp_path, monkeypatch, capsys):
    """Not one of ftdist's errors (a bug): one line naming the exception and where its traceback is; in the run's
    error.log when the command has a run directory, else in a temporary file."""
    import ftdist.cli
    import ftdist.infer

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(ftdist.infer, "load_prompts", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR read again
    assert main(["generate", "ftdist/tiny", "--prompts", "p.jsonl", "--out", str(tmp_path / "a.jsonl")]) == 1
    line = _one_error_line(capsys)
    assert line.startswith("ftdist: error: `ftdist generate` failed: KeyError: 'boom' (the traceback is in ")
    log = Path(line.rsplit(" ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path and "Traceback" in log.read_text() and "in broken" in log.read_text()

    out = tmp_path / "run"

    def run_fails(cfg, end_process_when_done=False):
        out.mkdir()
        (out / "run.json").write_text("{}")  # the run directory is this run's: its error.log is the place
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(ftdist.cli, "run_stage", run_fails)
    assert main(["train", "sft_tiny", f"output_dir={out}"]) == 1
    line = _one_error_line(capsys)
    assert line == (f"ftdist: error: `ftdist train` failed: ZeroDivisionError: division by zero (the traceback is "
                    f"in {out / 'error.log'})")
    text = (out / "error.log").read_text()
    assert text.startswith("--- ") and f"ftdist train sft_tiny output_dir={out}" in text and "in run_fails" in text


def test_chat_leaves_out_a_line_that_is_not_utf8_and_goes_on(monkeypatch, capsys):
    import io
    import sys

    typed = "caf\xe9\nSort the digits: 2 1\n/exit\n".encode("latin-1")  # a terminal in Latin-1, not UTF-8
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(typed), encoding="utf-8"))
    assert main(["chat", "ftdist/tiny", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.count("that line is not UTF-8 text and was left out") == 1 and out.count("assistant> ") == 1
    assert "Traceback" not in err


def test_a_full_disk_under_evals_results_is_one_line_and_leaves_no_half_file(tmp_path, capsys):
    from tests.helpers import fill_disk, small_disk

    with small_disk(tmp_path / "disk", 256 << 10) as disk:
        fill_disk(disk)
        assert main(["eval", "ftdist/tiny", *EVAL, "--out", str(disk / "eval")]) == 1  # the run failed, not the input
        line = _one_error_line(capsys)
        assert line.startswith(f"ftdist: error: {disk / 'eval' / 'eval.json'}: no space left on the device while "
                               f"writing eval.json ("), line
        assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def bad_templates(tmp_path_factory) -> dict:
    """For each failing chat template (a syntax error; one that raises for a user turn starting with 'x'): a Jinja
    file, and a copy of the tiny model whose tokenizer carries that template as its own."""
    from transformers import AutoTokenizer

    from ftdist.models.loading import resolve_model_path
    from tests.unit.test_data_checks import RAISES, SYNTAX

    out = {}
    for name, text in (("syntax", SYNTAX), ("raises", RAISES)):
        d = tmp_path_factory.mktemp(name)
        (d / "chat.jinja").write_text(text)
        shutil.copytree(resolve_model_path("ftdist/tiny"), d / "model")
        tok = AutoTokenizer.from_pretrained(d / "model")
        tok.chat_template = text
        tok.save_pretrained(d / "model")
        out[name] = d
    return out


@pytest.mark.parametrize("kind,problem,row", [
    ("syntax", "line 2: not a valid Jinja template: unexpected '}'", ""),
    ("raises", "line 2: the template raised an error: roles must alternate", "row 1: "),
])
def test_a_failing_chat_template_is_one_line_naming_it_in_every_command(kind, problem, row, bad_templates, tmp_path,
                                                                        capsys, monkeypatch):
    """generate, eval (the model's own template and --chat-template), PPO's prompts and chat: the template's
    failure is one line naming the template and its line (a failure for one conversation also names file and
    row), before any generation; chat leaves out a line the template refuses and goes on."""
    import io
    import sys

    d = bad_templates[kind]
    jinja, model = d / "chat.jinja", d / "model"
    conv = [{"role": "user", "content": "x Sort the digits: 2 1"}]
    prompts, qa, chats = tmp_path / "p.jsonl", tmp_path / "qa.jsonl", tmp_path / "chats.jsonl"
    prompts.write_text(json.dumps({"prompt": conv}) + "\n")
    qa.write_text(json.dumps({"prompt": conv, "reference": "1 2"}) + "\n")
    chats.write_text(json.dumps({"messages": conv + [{"role": "assistant", "content": "1 2"}]}) + "\n")
    at = row and f"{{data}}: {row}"  # where the template raised: the file and row
    cases = [
        (["generate", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "a.jsonl")],
         f"{at.format(data=prompts)}the chat template of {model}, {problem}"),
        (["eval", str(model), "--suite", f"exact_match={qa}"], f"{at.format(data=qa)}the chat template of {model}, "
                                                               f"{problem}"),
        (["eval", "ftdist/tiny", "--suite", f"exact_match={qa}", "--chat-template", str(jinja)],
         f"{at.format(data=qa)}--chat-template={jinja}, {problem}"),
        (["eval", "ftdist/tiny", "--suite", f"perplexity={chats}", "--chat-template", str(jinja)],
         f"{at.format(data=chats)}--chat-template={jinja}, {problem}"),
        (["train", "grpo_tiny", f"output_dir={tmp_path / 'ppo'}", f"data.train={prompts}", "data.eval=null",
          f"data.chat_template={jinja}"], f"{at.format(data=prompts)}data.chat_template={jinja}, {problem}"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys)
        assert line == f"ftdist: error: {words}", line
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "ppo" / "checkpoints").exists()

    monkeypatch.setattr(sys, "stdin", io.StringIO("x 2 1\nSort the digits: 2 1\n/exit\n"))
    if kind == "syntax":  # every conversation fails: the command stops
        assert main(["chat", str(model), "--max-new-tokens", "2", "--temperature", "0"]) == 2
        assert _one_error_line(capsys) == f"ftdist: error: the chat template of {model}, {problem}"
        return
    assert main(["chat", str(model), "--max-new-tokens", "2", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert (f"(that line was left out: the chat template of {model}, {problem}; /reset or /system may help)"
            in out and out.count("assistant> ") == 1)  # the next line was answered
