"""`ftdist generate`: prompts as text and as conversations, greedy and sampled answers, several per prompt,
the same answers on 1 and 2 ranks, a run's final/ or one of its checkpoints, clear errors."""

import json
import subprocess

import pytest

from tests.helpers import ftdist_cmd, run_ftdist, run_group, run_inprocess

pytestmark = pytest.mark.dist

MAX_NEW = 12


def _prompts(path):
    rows = [{"prompt": "Sort the digits: 3 1 2"},
            {"prompt": [{"role": "user", "content": "Sort the digits: 9 4"}]},
            {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Sort: 5 2 7"}]},
            {"prompt": "Hello"}, {"prompt": "Sort the digits: 8 8 1"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _generate(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    if nproc == 1:
        return run_inprocess(["generate", *args])
    cmd = ftdist_cmd(nproc, "x", [])[:-2] + ["generate", *args]  # the launcher, then `-m ftdist`
    return run_group(cmd, 300)


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_answers_are_the_same_on_one_and_two_ranks(tmp_path):
    rows = _prompts(tmp_path / "p.jsonl")
    common = ["ftdist/tiny", "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", str(MAX_NEW),
              "--batch-size", "1"]  # one prompt per call: no padding, so the same arithmetic on any rank
    one = _generate(*common, "--out", str(tmp_path / "one.jsonl"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _generate(*common, "--out", str(tmp_path / "two.jsonl"), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _read(tmp_path / "one.jsonl"), _read(tmp_path / "two.jsonl")
    assert a == b and [r["index"] for r in a] == list(range(len(rows)))
    assert [r["prompt"] for r in a] == [r["prompt"] for r in rows]  # as the file gives it
    for r in a:
        assert r["finish_reason"] in ("eos", "length") and 0 <= r["new_tokens"] <= MAX_NEW
        assert (r["finish_reason"] == "length") == (r["new_tokens"] == MAX_NEW)


def test_samples_per_prompt_follow_the_seed(tmp_path):
    _prompts(tmp_path / "p.jsonl")
    common = ["ftdist/tiny", "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", str(MAX_NEW),
              "--temperature", "1.0", "--top-k", "50", "-n", "3", "--batch-size", "2"]
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        proc = _generate(*common, "--seed", seed, "--out", str(tmp_path / f"{name}.jsonl"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = _read(tmp_path / f"{name}.jsonl")
    assert [(r["index"], r["sample"]) for r in runs["a"]] == [(i, k) for i in range(5) for k in range(3)]
    assert runs["a"] == runs["b"]  # the same seed: the same samples
    assert [r["response"] for r in runs["a"]] != [r["response"] for r in runs["c"]]


def test_a_runs_final_model_and_checkpoint_and_errors(tmp_path):
    run = tmp_path / "run"
    run_ftdist(1, "sft_tiny", [f"output_dir={run}", "data.eval=null", "train.max_steps=2", "checkpoint.every_steps=1",
                               "checkpoint.keep_last=2", "train.progress_bar=false"])
    _prompts(tmp_path / "p.jsonl")
    for extra, name in (([], "final"), (["--step", "1"], "step1")):
        proc = _generate(str(run), *extra, "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", "4",
                         "--out", str(tmp_path / f"{name}.jsonl"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(_read(tmp_path / f"{name}.jsonl")) == 5
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "hi"}) + "\n")
    proc = _generate("ftdist/tiny", "--prompts", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "x.jsonl"))
    assert proc.returncode == 2 and "no 'prompt' or 'messages' column (columns: question)" in proc.stderr
    proc = _generate(str(run), "--step", "9", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "--step 9" in proc.stderr and "Traceback" not in proc.stderr
    proc = _generate("ftdist/tiny", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "final.jsonl"))
    assert proc.returncode == 2 and "exists" in proc.stderr


@pytest.mark.parametrize("case", ["no_model", "adapter_without_base", "empty_prompts", "bad_row"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    _prompts(tmp_path / "p.jsonl")
    model, prompts = "ftdist/tiny", str(tmp_path / "p.jsonl")
    if case == "no_model":
        model, expect = str(tmp_path / "nope"), "no such model directory"
    elif case == "adapter_without_base":
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                                 "base_model_name_or_path": "/models/gone"}))
        model, expect = str(adapter), "pass --base"
    elif case == "empty_prompts":
        (tmp_path / "empty.jsonl").write_text("")
        prompts, expect = str(tmp_path / "empty.jsonl"), "empty"
    else:
        (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": [{"role": "wizard", "content": "x"}]}) + "\n")
        prompts, expect = str(tmp_path / "bad.jsonl"), "bad.jsonl: row 1:"
    out = tmp_path / "out.jsonl"
    proc = _generate(model, "--prompts", prompts, "--out", str(out))
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ftdist: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and expect in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists() and not list(tmp_path.glob(".out.jsonl*"))
