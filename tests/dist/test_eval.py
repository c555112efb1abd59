"""`ftdist eval` end to end on the tiny model: perplexity equals the exponential of an independently computed
mean NLL, exact match counts answers equal to the model's own greedy ones, multiple choice picks the option of
highest log-likelihood; two models side by side in one table, eval.json and samples.jsonl."""

import json
import math
import subprocess

import pytest
import torch

from tests.helpers import run_inprocess

pytestmark = pytest.mark.dist

MAX_NEW = 6


def _eval(*args: str) -> subprocess.CompletedProcess:
    return run_inprocess(["eval", *args])


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_eval_suites_and_side_by_side(tmp_path):
    from ftdist.infer import load_model
    from ftdist.models.generate import generate

    model, tok = load_model("ftdist/tiny", device=torch.device("cpu"))
    conv = [{"role": "user", "content": "Sort the digits: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]
    conv2 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Sort: 9 7 8"},
             {"role": "assistant", "content": "7 8 9"}, {"role": "user", "content": "and 2 1"},
             {"role": "assistant", "content": "1 2"}]
    ppl = _write(tmp_path / "ppl.jsonl", [{"messages": conv}, {"messages": conv2}])
    # the first two references are the model's own greedy answers: exactly 2 of 3 rows match
    prompts = ["Sort the digits: 9 4", "Hello"]
    _, response = generate(model, tok, prompts, max_new_tokens=MAX_NEW, device=torch.device("cpu"))
    greedy = []
    for ids in response.tolist():
        ids = ids[:ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
        greedy.append(tok.decode(ids, skip_special_tokens=True))
    qa = _write(tmp_path / "qa.jsonl", [{"prompt": prompts[0], "answer": greedy[0]},
                                         {"prompt": prompts[1], "answer": greedy[1]},
                                         {"prompt": "Sort the digits: 5 5", "answer": "zq zq zq zq zq zq zq zq"}])
    mc = _write(tmp_path / "mc.jsonl", [{"question": "Sort 2 1", "options": ["1 2", "2 1", "banana"], "answer": 0},
                                         {"question": "Sort 4 3", "options": ["3 4", "cat"], "answer": "B"}])
    out = tmp_path / "out"
    proc = _eval("base=ftdist/tiny", "again=ftdist/tiny", "--suite", f"perplexity={ppl}", "--suite",
                 f"exact_match={qa}", "--suite", f"choice={mc}", "--max-new-tokens", str(MAX_NEW), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | perplexity (n=2) | exact_match (n=3) | choice (n=2)")
    assert [r.split("|")[1].strip() for r in table[1:]] == ["base", "again"]  # after the header
    res = json.loads((out / "eval.json").read_text())["results"]
    assert res["base"] == res["again"]  # the same model, deterministic: the same numbers
    r = res["base"]

    # perplexity: the NLL of the target tokens (the assistant turns and their EOS, as training counts them), summed
    # in float64 here against float32 sums there over ~30 tokens: relative 1e-5 covers the rounding
    from ftdist.config import load_config
    from ftdist.data.tokenize import tokenize_sft

    ds, _ = tokenize_sft(ppl, tok, load_config(data={"data": {"train": ppl, "max_length": 2048}}).data, None)
    nll, n = 0.0, 0
    for x, y in zip(ds["input_ids"], ds["labels"]):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0].double(), -1)
        for t in range(1, len(x)):
            if y[t] != -100:
                nll, n = nll - float(lp[t - 1, y[t]]), n + 1
    assert r["perplexity"]["target_tokens"] == n
    assert r["perplexity"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)

    assert r["exact_match"]["exact_match"] == pytest.approx(2 / 3) and r["exact_match"]["rows"] == 3
    lo, hi = r["exact_match"]["exact_match_ci95"]
    assert lo < 2 / 3 < hi

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * (2 + 3 + 2)  # two models x the rows of the three suites
    picks = [s for s in samples if s["model"] == "base" and s["suite"] == "choice"]
    for s in picks:  # the pick is the option of highest summed log-prob
        assert s["pick"] == max(range(len(s["options"])), key=s["logprobs"].__getitem__)
    assert r["choice"]["acc"] == pytest.approx(sum(s["pick"] == s["answer"] for s in picks) / 2)


def test_eval_errors_name_the_problem(tmp_path):
    proc = _eval("ftdist/tiny", "--suite", "bleu=x.jsonl")
    assert proc.returncode == 2 and "SUITE=FILE" in proc.stderr and "Traceback" not in proc.stderr
    bad = _write(tmp_path / "mc.jsonl", [{"question": "q", "options": ["a"], "answer": 0}])
    proc = _eval("ftdist/tiny", "--suite", f"choice={bad}")
    assert proc.returncode == 2 and "row 1: needs `question`" in proc.stderr


def test_reward_and_judge_suites(tmp_path):
    """A reward model trained by ftdist scores the greedy answers: the mean is that of the scores recomputed with
    transformers' own sequence-classification pooling (one text at a time, no padding); the same model twice
    ties on every prompt, so its win rate is exactly 1/2, and the judge's pairwise preference between identical
    answers, asked in both orders, is 1/2 up to float rounding (P(A) and P(B) of one prompt sum to 1)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.helpers import run_ftdist

    rm = tmp_path / "rm"
    run_ftdist(1, "rm_tiny", [f"output_dir={rm}", "data.eval=null", "train.max_steps=2", "train.progress_bar=false",
                              "checkpoint.every_steps=0"])
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": "Sort the digits: 3 1 2"}]},
                                                  {"prompt": [{"role": "user", "content": "Sort the digits: 9 4"}]},
                                                  {"prompt": "Hello"}])
    out = tmp_path / "out"
    proc = _eval("base=ftdist/tiny", "again=ftdist/tiny", "--suite", f"reward={prompts}", "--suite",
                 f"judge={prompts}", "--reward-model", str(rm / "final"), "--judge-model", "ftdist/tiny",
                 "--max-new-tokens", str(MAX_NEW), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())["results"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]

    model = AutoModelForSequenceClassification.from_pretrained(rm / "final", num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(rm / "final")
    base = [s for s in samples if s["model"] == "base" and s["suite"] == "reward"]
    scores = []
    for s in base:
        conv = (s["prompt"] if isinstance(s["prompt"], list) else None)
        text = (tok.apply_chat_template(conv + [{"role": "assistant", "content": s["answer"]}], tokenize=False)
                if conv else s["prompt"] + s["answer"])
        with torch.no_grad():
            scores.append(float(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]))
    # float32 forwards of the same tokens, batched with right padding there and alone here: within 1e-4
    assert res["base"]["reward"]["reward"] == pytest.approx(sum(scores) / len(scores), abs=1e-4)
    assert [s["score"] for s in base] == pytest.approx(scores, abs=1e-4)
    assert res["again"]["reward"]["win_rate_vs_base"] == 0.5
    assert res["again"]["judge"]["pairwise_vs_base"] == pytest.approx(0.5, abs=1e-6)
    for s in samples:
        if s["suite"] == "judge":
            assert 1.0 <= s["score"] <= 10.0


def test_two_ranks_give_the_numbers_of_one(tmp_path):
    """Each rank evaluates every second row; with one row per forward (--batch-size 1) every row's arithmetic is
    the same on any rank, and rank 0 sums the rows in row order: the same numbers exactly. The two-rank run is a
    `stage: eval` recipe launched as training is, with the model ZeRO-3-sharded over the ranks: its gathered
    weights are the same fp32 numbers, so the arithmetic, and the numbers, are the same."""
    from tests.helpers import run_ftdist, write_recipe

    conv = [{"role": "user", "content": "Sort the digits: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]
    ppl = _write(tmp_path / "ppl.jsonl", [{"messages": conv}] * 3 + [{"messages": conv[:1] + [
        {"role": "assistant", "content": "3 2 1 0"}]}])
    mc = _write(tmp_path / "mc.jsonl", [{"question": f"Sort {i} 1", "options": ["1 2", "2 1", "x"], "answer": i % 3}
                                         for i in range(5)])
    qa = _write(tmp_path / "qa.jsonl", [{"prompt": f"Sort the digits: {i} 4", "answer": "4"} for i in range(5)])
    args = ["ftdist/tiny", "--suite", f"perplexity={ppl}", "--suite", f"choice={mc}", "--suite", f"contains={qa}",
            "--batch-size", "1", "--max-new-tokens", "4"]
    one = _eval(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    # the two ranks run the same evaluation as a `stage: eval` recipe (the path sbatch and Ray submissions take)
    # and ZeRO-3-sharded (deepspeed.zero_stage: 3): each rank holds half of every weight, every forward gathers them
    recipe = write_recipe(tmp_path / "eval.yaml", stage="eval", output_dir=str(tmp_path / "two"),
                          deepspeed={"zero_stage": 3},
                          eval={"models": ["ftdist/tiny"], "suites": [f"perplexity={ppl}", f"choice={mc}",
                                                                      f"contains={qa}"],
                                "batch_size": 1, "max_new_tokens": 4})
    proc = run_ftdist(2, str(recipe), [])
    assert "ftdist/tiny: ZeRO-3-sharded over 2 ranks" in proc.stderr
    assert (tmp_path / "two" / "config.yaml").exists()
    a = json.loads((tmp_path / "one" / "eval.json").read_text())["results"]
    b = json.loads((tmp_path / "two" / "eval.json").read_text())["results"]
    assert a == b and a["ftdist/tiny"]["choice"]["rows"] == 5 and a["ftdist/tiny"]["perplexity"]["rows"] == 4
    assert (tmp_path / "one" / "samples.jsonl").read_text() == (tmp_path / "two" / "samples.jsonl").read_text()


def test_suites_during_training_match_ftdist_eval(tmp_path):
    """eval.suites on 2 ranks under ZeRO-3 (each rank its share of 5 rows, the shorter share padded so that every
    rank runs as many collective forwards and synced generate calls): the numbers logged after the last step are
    `ftdist eval`'s on the final model, and samples/step_N.jsonl holds the same answers."""
    from tests.helpers import read_metrics, run_ftdist

    conv = [{"role": "user", "content": "Sort the digits: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]
    ppl = _write(tmp_path / "ppl.jsonl", [{"messages": conv}] * 4 + [{"messages": conv[:1] + [
        {"role": "assistant", "content": "3 2 1 0"}]}])
    mc = _write(tmp_path / "mc.jsonl", [{"question": f"Sort {i} 1", "options": ["1 2", "2 1"], "answer": i % 2}
                                         for i in range(5)])
    qa = _write(tmp_path / "qa.jsonl", [{"prompt": f"Sort the digits: {i} 4", "answer": "4"} for i in range(5)])
    run = tmp_path / "run"
    suites = f"eval.suites=[perplexity={ppl},choice={mc},contains={qa}]"
    run_ftdist(2, "sft_tiny", [f"output_dir={run}", "deepspeed.zero_stage=3", "train.max_steps=2",
                               "train.eval_every=1", "train.eval_accuracy=false", "train.progress_bar=false",
                               "checkpoint.every_steps=0", suites, "train.eval_max_samples=5", "eval.batch_size=1",
                               "eval.max_new_tokens=4"])
    evals = [r for r in read_metrics(run) if "eval/contains/contains" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0.jsonl", "step_1.jsonl", "step_2.jsonl"]
    last = evals[-1]
    assert last["eval/perplexity/rows"] == last["eval/choice/rows"] == last["eval/contains/rows"] == 5

    out = tmp_path / "out"
    proc = _eval(str(run), "--suite", f"perplexity={ppl}", "--suite", f"choice={mc}", "--suite", f"contains={qa}",
                 "--max-samples", "5", "--max-length", "128", "--batch-size", "1", "--max-new-tokens", "4",
                 "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())["results"][str(run)]
    # the same fp32 weights (ZeRO-3's gathered shards, final/ written from them) and one row per forward: the
    # per-row sums agree to float32 rounding of ~10 terms, well within relative 1e-5
    assert last["eval/perplexity/perplexity"] == pytest.approx(res["perplexity"]["perplexity"], rel=1e-5)
    assert last["eval/perplexity/target_tokens"] == res["perplexity"]["target_tokens"]
    assert last["eval/choice/acc"] == res["choice"]["acc"] and last["eval/contains/contains"] == res["contains"]["contains"]
    during = [json.loads(line) for line in (run / "samples" / "step_2.jsonl").read_text().splitlines()]
    after = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    pick = (lambda rows, suite, key: [(r["row"], r[key]) for r in rows if r["suite"] == suite])
    assert pick(during, "contains", "answer") == pick(after, "contains", "answer")
    assert pick(during, "choice", "pick") == pick(after, "choice", "pick")
    assert [r for r, _ in pick(during, "contains", "answer")] == [0, 1, 2, 3, 4]  # each row once, padding dropped


def test_lm_eval_task_on_local_data_matches_choice(tmp_path):
    """An lm-evaluation-harness task on a local JSONL (its YAML in a directory given with --lm-eval-include) runs
    through lm-eval's Python API, offline: its per-option log-likelihoods and accuracy are those of the `choice`
    suite on the same rows (both score ' option' after 'Question: ...\\nAnswer:')."""
    rows = [{"question": "Sort 2 1", "choices": ["1 2", "2 1", "banana"], "label": 0},
            {"question": "Sort 4 3", "choices": ["3 4", "cat"], "label": 1},
            {"question": "Sort 9 8", "choices": ["8 9", "9 8"], "label": 0},
            {"question": "Sort 7 5", "choices": ["5 7", "7 5", "x y"], "label": 2}]
    data = _write(tmp_path / "mc.jsonl", rows)
    mc = _write(tmp_path / "mc_ours.jsonl", [{"question": r["question"], "options": r["choices"], "answer": r["label"]}
                                             for r in rows])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + data + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    out = tmp_path / "out"
    proc = _eval("tiny=ftdist/tiny", "--suite", f"choice={mc}", "--suite", "lm_eval:tiny_mc", "--lm-eval-include",
                 str(tasks), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lm_eval:tiny_mc (n=4)" in proc.stdout
    res = json.loads((out / "eval.json").read_text())["results"]["tiny"]
    assert res["lm_eval:tiny_mc"]["rows"] == 4 and res["lm_eval:tiny_mc"]["acc"] == res["choice"]["acc"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    ours = {s["row"]: s["logprobs"] for s in samples if s["suite"] == "choice"}
    theirs = {s["row"]: [r[0] for r in s["response"]] for s in samples if s["suite"] == "lm_eval:tiny_mc"}
    assert sorted(theirs) == [0, 1, 2, 3]
    for row, lps in ours.items():
        # the same tokens through the same float32 model, batched and padded differently: summed log-probs of a
        # few tokens (each ~-10) agree to float32 rounding, well within 1e-4
        assert theirs[row] == pytest.approx(lps, abs=1e-4)
    bad = _eval("ftdist/tiny", "--suite", "lm_eval:no_such_task_xyz", "--lm-eval-include", str(tasks))
    assert bad.returncode == 2 and "no such lm-evaluation-harness task" in bad.stderr and "Traceback" not in bad.stderr
