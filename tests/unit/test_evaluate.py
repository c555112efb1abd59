"""ftdist eval's pure parts: the Wilson interval, the answer normaliser, the row readers and their errors."""

import json
import math

import pytest

from ftdist.evaluate import EvalError, accuracy_interval, choice_rows, normalise, parse_models, parse_suites, qa_rows

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
    from ftdist.evaluate import TEMPLATES, load_template

    assert "{answer_b}" in load_template(None, "pairwise.txt", ("question", "answer_a", "answer_b"))
    assert (TEMPLATES / "score.txt").exists()
    bad = tmp_path / "rubric.txt"
    bad.write_text("Rate: {answer}")
    with pytest.raises(EvalError, match=r"lacks \{question\}"):
        load_template(str(bad), "score.txt", ("question", "answer"))


def test_mean_interval_stays_within_bounds():
    from ftdist.evaluate import mean_interval

    wins = [1.0] * 19 + [0.5]
    lo, hi = mean_interval(wins)
    assert hi > 1.0  # the normal interval of a mean near 1 crosses it
    assert mean_interval(wins, (0.0, 1.0)) == [lo, 1.0]
    assert mean_interval([3.0]) == [3.0, 3.0]
