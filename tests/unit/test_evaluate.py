"""ftdist eval's pure parts: the Wilson interval, the answer normaliser, the row readers and their errors."""

import json
import math
from pathlib import Path

import pytest

from ftdist.eval.rows import EvalError, choice_rows, normalise, parse_suites, qa_rows
from ftdist.eval.suites import accuracy_interval
from ftdist.evaluate import parse_models

pytestmark = pytest.mark.unit


def test_wilson_interval():
    # the closed form at k = 0: [0, z^2 / (n + z^2)]; at k = n/2 it is symmetric about 1/2
    z2 = 1.959964 ** 2
    lo, hi = accuracy_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2), rel=1e-12)
    lo, hi = accuracy_interval(5, 10)
    assert lo + hi == pytest.approx(1.0, rel=1e-12) and 0.23 < lo < 0.24  # 0.2366 (tables)
    assert accuracy_interval(10, 10)[1] == 1.0 and math.isnan(accuracy_interval(0, 0)[0])


def test_normalise_ignores_case_punctuation_and_eos_text():
    assert normalise("  The Answer is 1 2 3.<|end|>") == normalise("the answer is 1 2 3") == "the answer is 1 2 3"


def test_row_readers(tmp_path):
    f = tmp_path / "mc.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"question": "q", "options": ["a", "b", "c"], "answer": 2},
        {"question": "q", "choices": ["a", "b"], "answer": "B"},
        {"question": "q", "options": ["x", "y"], "answer": "x"}]) + "\n")
    assert [r[2] for r in choice_rows(str(f), 0)] == [2, 1, 0]
    assert len(choice_rows(str(f), 2)) == 2
    f.write_text(json.dumps({"question": "q", "options": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(EvalError, match=r"row 1: answer 5 is not an option"):
        choice_rows(str(f), 0)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"prompt": "2+2=", "answer": 4}]) + "\n")
    rows = qa_rows(str(qa), 0)
    assert rows[0][1] == [{"role": "user", "content": "hi"}] and rows[0][2] == "yo" and rows[1][2] == "4"
    qa.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(EvalError, match="row 1: needs a prompt and a reference"):
        qa_rows(str(qa), 0)


def test_arguments(tmp_path):
    with pytest.raises(EvalError, match="SUITE=FILE"):
        parse_suites(["bleu=x.jsonl"])
    with pytest.raises(EvalError, match="no such file"):
        parse_suites([f"choice={tmp_path}/nope.jsonl"])
    assert parse_models(["base=ftdist/tiny", "runs/sft"]) == [("base", "ftdist/tiny"), ("runs/sft", "runs/sft")]
    with pytest.raises(EvalError, match="named twice: a"):
        parse_models(["a=x", "a=y"])


def test_judge_templates_need_their_fields(tmp_path):
    from ftdist.eval.scorers import TEMPLATES, load_template

    assert "{answer_b}" in load_template(None, "pairwise.txt", ("question", "answer_a", "answer_b"))
    assert (TEMPLATES / "score.txt").exists()
    bad = tmp_path / "rubric.txt"
    bad.write_text("Rate: {answer}")
    with pytest.raises(EvalError, match=r"lacks \{question\}"):
        load_template(str(bad), "score.txt", ("question", "answer"))


def test_mean_interval_stays_within_bounds():
    from ftdist.eval.suites import mean_interval

    wins = [1.0] * 19 + [0.5]
    lo, hi = mean_interval(wins)
    assert hi > 1.0  # the normal interval of a mean near 1 crosses it
    assert mean_interval(wins, (0.0, 1.0)) == [lo, 1.0]
    assert mean_interval([3.0]) == [3.0, 3.0]


def test_shares_are_padded_to_the_same_length_when_synced():
    from ftdist.eval.suites import _share

    # 5 rows on 2 ranks: rank 0 rows 0, 2, 4; rank 1 rows 1, 3 and, synced, a repeat of row 1 that is not counted
    assert _share(5, (0, 2)) == ([0, 2, 4], 3) and _share(5, (1, 2)) == ([1, 3], 2)
    assert _share(5, (1, 2), synced=True) == ([1, 3, 1], 2)
    # fewer rows than ranks: a rank without rows still runs one forward (of row 0), counting none
    assert _share(1, (1, 2), synced=True) == ([0], 0) and _share(0, (1, 2), synced=True) == ([], 0)


def test_eval_section_is_checked_at_load(tmp_path):
    from ftdist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"eval.suites\[0\]: got 'bleu=x'"):
        load_config("sft_tiny", ["eval.suites=[bleu=x]"])
    with pytest.raises(ConfigError, match="set eval.judge_model"):
        load_config("sft_tiny", ["eval.suites=[judge=x.jsonl]"])
    with pytest.raises(ConfigError, match="not stage=rm"):
        load_config("rm_tiny", ["eval.suites=[perplexity=x.jsonl]"])
    with pytest.raises(ConfigError, match="stage=eval needs eval.models"):
        load_config(data={"stage": "eval", "eval": {"suites": ["perplexity=x.jsonl"]}})
    # an evaluation-only recipe needs no training data and no training keys
    cfg = load_config(data={"stage": "eval", "eval": {"models": ["ftdist/tiny"], "suites": ["perplexity=x.jsonl"]}})
    assert cfg.eval.models == ["ftdist/tiny"] and cfg.data.train is None
    # the suites are not part of the training: changing them does not block a resume
    from ftdist.config import resume_changes

    a = load_config("sft_tiny").to_dict()
    b = load_config("sft_tiny", ["eval.suites=[perplexity=y.jsonl]", "eval.max_new_tokens=5"]).to_dict()
    assert resume_changes(a, b) == []


def test_samples_go_to_a_file_per_step_and_a_wandb_table(tmp_path, monkeypatch):
    """samples/step_N.jsonl holds every sample; with W&B on, the same rows are logged as a wandb.Table (a stand-in
    module records what the writer hands to W&B's API: the writer's own contract, not W&B's behaviour)."""
    import sys
    import types

    logged = []

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class WandbRun:
        def log(self, record, step):
            logged.append((record, step))

        def finish(self):
            pass

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Table=Table, init=lambda **kw: WandbRun()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    from ftdist.config import LoggingConfig
    from ftdist.run.metrics import MetricsWriter

    w = MetricsWriter(str(tmp_path), True, LoggingConfig(tensorboard=False, wandb=True))
    samples = [{"suite": "exact_match", "row": 0, "prompt": [{"role": "user", "content": "hi"}], "answer": "a",
                "score": 1}, {"suite": "choice", "row": 0, "logprobs": [-1.0, -2.0], "score": 0}]
    w.log_samples(7, samples)
    w.log_samples(8, [])  # nothing evaluated: no file, nothing logged
    rows = [json.loads(line) for line in (tmp_path / "samples" / "step_7.jsonl").read_text().splitlines()]
    assert rows == samples and not (tmp_path / "samples" / "step_8.jsonl").exists()
    (record, step), = logged
    table = record["eval/samples"]
    assert step == 7 and table.columns == ["suite", "row", "prompt", "answer", "score", "logprobs"]
    assert table.data[0] == ["exact_match", 0, '[{"role": "user", "content": "hi"}]', "a", 1, None]
    assert table.data[1] == ["choice", 0, None, None, 0, "[-1.0, -2.0]"]


def test_lm_eval_proportions_get_the_wilson_interval_and_other_metrics_the_normal_one():
    from ftdist.eval.suites import aggregate, mean_interval

    # 1 right of 5: the normal interval 0.2 +- 1.96 * 0.2 = [-0.19, 0.59] leaves [0, 1]; Wilson's does not
    samples = [{"metrics": ["acc", "bleu"], "acc": a, "bleu": b} for a, b in zip([1, 0, 0, 0, 0], [0.5, 2, 3, 1, 4])]
    out = aggregate("lm_eval:task", samples)
    assert out["acc"] == 0.2 and out["acc_ci95"] == list(accuracy_interval(1, 5)) and out["acc_ci95"][0] > 0
    assert out["bleu_ci95"] == mean_interval([0.5, 2, 3, 1, 4]) and out["rows"] == 5


def _perplexity(capsys, tmp_path, name, *argv):
    from ftdist.cli import main

    code = main(["eval", "ftdist/tiny", *argv, "--out", str(tmp_path / name)])
    err = capsys.readouterr().err
    if code != 0:
        return code, [line for line in err.splitlines() if line.startswith("ftdist: error")]
    return code, json.loads((tmp_path / name / "eval.json").read_text())["results"]["ftdist/tiny"]["perplexity"]


def test_eval_reads_the_split_given_per_suite_or_for_all(tmp_path, capsys):
    import datasets

    conversation = [{"role": "user", "content": "Sort the digits: 3 1"}, {"role": "assistant", "content": "1 3"}]
    splits = {"train": [conversation] * 3, "test": [conversation[:1] + [{"role": "assistant", "content": "3"}]] * 2}
    saved = tmp_path / "saved"  # a datasets directory (save_to_disk)
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"messages": v}) for k, v in splits.items()}).save_to_disk(
        str(saved))
    repo = tmp_path / "repo"  # a directory laid out as a Hub dataset repository
    (repo / "data").mkdir(parents=True)
    for k, rows in splits.items():
        (repo / "data" / f"{k}.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))

    assert _perplexity(capsys, tmp_path, "a", "--suite", f"perplexity={saved}")[1]["rows"] == 3  # train: the default
    code, test_all = _perplexity(capsys, tmp_path, "b", "--suite", f"perplexity={saved}", "--split", "test")
    assert code == 0 and test_all["rows"] == 2 and test_all["split"] == "test"
    code, test_one = _perplexity(capsys, tmp_path, "c", "--suite", f"perplexity@test={saved}", "--split", "train")
    assert code == 0 and test_one == test_all  # the suite's own split wins over --split
    code, from_repo = _perplexity(capsys, tmp_path, "d", "--suite", f"perplexity@test={repo}")
    assert code == 0 and from_repo["perplexity"] == test_all["perplexity"] and from_repo["rows"] == 2
    code, lines = _perplexity(capsys, tmp_path, "e", "--suite", f"perplexity={saved}", "--split", "validation")
    assert code == 2 and len(lines) == 1 and "'validation'" in lines[0] and "--split SPLIT or SUITE@SPLIT=" in lines[0]
    assert "data.split" not in lines[0]  # eval does not read it


def test_one_chat_template_for_every_model(tmp_path, capsys):
    from ftdist.models.loading import resolve_model_path

    own = tmp_path / "own.jinja"
    own.write_text((Path(resolve_model_path("ftdist/tiny")) / "chat_template.jinja").read_text())
    suite = ["--suite", "perplexity=ftdist/tiny-task/eval", "--max-samples", "4"]
    _, default = _perplexity(capsys, tmp_path, "default", *suite)
    _, same = _perplexity(capsys, tmp_path, "same", *suite, "--chat-template", str(own))
    _, chatml = _perplexity(capsys, tmp_path, "chatml", *suite, "--chat-template", "chatml")
    assert same == default  # the model's own template given as a file: the same tokens, the same numbers
    # ChatML wraps each turn in its own markers: other prompt tokens, the same answers scored after them
    assert chatml["rows"] == 4 and chatml["perplexity"] != default["perplexity"]
