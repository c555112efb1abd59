"""A few training steps on data mixtures: data.train as a list of files with their own formats, columns and
shares. The data summary names every source with what was read and taken; the run trains on the mixture's rows."""

import csv
import json
import re

import pytest

from tests.helpers import read_metrics, run_ftdist, write_recipe

pytestmark = pytest.mark.dist

SEED = 42


@pytest.fixture(scope="module")
def tok():
    from ftdist.config import ModelConfig
    from ftdist.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig())


def _digits(i: int, n: int = 3) -> list[str]:
    return [str((i * 7 + k * 3) % 10) for k in range(n)]  # n one-digit numbers: every row of a file alike in size


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _per_row(stats, counts) -> int:
    """Tokens of one row of a file whose rows are all the same size (checked: the taken tokens then follow)."""
    assert len(set(counts)) == 1, counts
    assert stats.tokens == counts[0] * stats.rows
    return counts[0]


def _source_line(summary: str, label: str) -> re.Match:
    m = re.search(rf"  {re.escape(label)}: read (\d+) (?:rows|pairs), (\d+) tokens[^;]*; took (\d+) (?:rows|pairs), "
                  rf"(\d+) tokens", summary)
    assert m, summary
    return m


def test_sft_on_a_mixture_of_a_chat_file_and_an_alpaca_csv(tmp_path, tok):
    from ftdist.config import load_config
    from ftdist.data.tokenize import tokenize_sft

    chat = _write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Sort the digits: " + " ".join(_digits(i))},
                      {"role": "assistant", "content": " ".join(sorted(_digits(i)))}]} for i in range(6)])
    alpaca = _write_csv(tmp_path / "tasks.csv", ["question", "digits", "answer"],
                        [["Sort the digits", " ".join(_digits(i, 4)), " ".join(sorted(_digits(i, 4)))]
                         for i in range(10)])
    columns = {"instruction": "question", "input": "digits", "output": "answer"}
    weight = 1.5
    mixture = [chat, {"path": alpaca, "format": "alpaca", "columns": columns, "weight": weight}]
    # what each file gives read alone, as a single data.train (the path a plain source has always taken)
    alone = []
    for path, extra in ((chat, {}), (alpaca, {"format": "alpaca", "columns": columns})):
        cfg = load_config(data={"data": {"train": path, "max_length": 64, **extra}})
        ds, stats = tokenize_sft(path, tok, cfg.data, None)
        alone.append((stats.rows, stats.tokens, _per_row(stats, [len(x) for x in ds["input_ids"]])))
    (n_chat, tok_chat, _), (n_alp, tok_alp, per_alp) = alone
    taken_alp = round(weight * n_alp)
    total_rows = n_chat + taken_alp
    global_batch = 3

    def recipe(name, train):
        return str(write_recipe(tmp_path / name, stage="sft", seed=SEED,
                                model={"name_or_path": "ftdist/tiny", "dtype": "fp32"},
                                data={"train": train, "max_length": 64},
                                train={"micro_batch_size": global_batch, "global_batch_size": global_batch,
                                       "max_steps": 2, "log_every": 1, "progress_bar": False},
                                deepspeed={"zero_stage": 0}))

    out = tmp_path / "run"
    proc = run_ftdist(1, recipe("mix.yaml", mixture), [f"output_dir={out}"], timeout=300)
    log = proc.stderr
    assert f"train: mixture of 2 sources, {total_rows} rows, {tok_chat + taken_alp * per_alp} tokens" in log
    assert _source_line(log, f"data.train[0] {chat}").groups() == tuple(map(str, (n_chat, tok_chat, n_chat,
                                                                                  tok_chat)))
    line = _source_line(log, f"data.train[1] {alpaca}")
    assert line.groups() == tuple(map(str, (n_alp, tok_alp, taken_alp, taken_alp * per_alp)))
    assert f"(weight {weight:g})" in log
    # the loop plans its epochs over the mixture's rows: whole steps of global_batch rows
    assert f"({total_rows // global_batch} per epoch)" in log
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]
    # config.yaml holds the mixture as given
    assert load_config(str(out / "config.yaml")).data.train == load_config(data={"data": {"train": mixture}}).data.train
    # another share is other training data: resuming the run with it is refused
    reweighted = [chat, {**mixture[1], "weight": 2 * weight}]
    again = run_ftdist(1, recipe("reweighted.yaml", reweighted), [f"output_dir={out}"], timeout=300, check=False)
    assert again.returncode == 2 and "is not the data" in again.stderr, again.stderr[-3000:]


def test_dpo_on_a_mixture_of_two_preference_files(tmp_path, tok):
    from ftdist.config import load_config
    from ftdist.data.preference import tokenize_preference

    def msg(role, text):
        return [{"role": role, "content": text}]

    chat = _write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": msg("user", "Sort the digits: " + " ".join(_digits(i))),
         "chosen": msg("assistant", " ".join(sorted(_digits(i)))),
         "rejected": msg("assistant", " ".join(sorted(_digits(i), reverse=True)))} for i in range(8)])
    text = _write_csv(tmp_path / "text_pairs.csv", ["question", "good", "bad"],
                      [["Sort: " + " ".join(_digits(i)), " " + " ".join(sorted(_digits(i))),
                        " " + " ".join(sorted(_digits(i), reverse=True))] for i in range(4)])
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    samples = 6  # more than the file's 4 pairs: every pair once, and 2 of them twice
    mixture = [chat, {"path": text, "columns": columns, "samples": samples}]
    common = {"format": "preference", "max_length": 64, "max_prompt_length": 48}
    alone = []
    for path, extra in ((chat, {}), (text, {"columns": columns})):
        cfg = load_config(data={"stage": "dpo", "data": {"train": path, **common, **extra}})
        ds, stats, _ = tokenize_preference(path, tok, cfg.data, None)
        counts = [2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"],
                                                                  ds["rejected_ids"])]
        alone.append((stats.rows, stats.tokens, _per_row(stats, counts)))
    (n_chat, tok_chat, _), (n_text, tok_text, per_text) = alone
    total = n_chat + samples

    recipe = write_recipe(tmp_path / "dpo.yaml", stage="dpo", seed=SEED,
                          model={"name_or_path": "ftdist/tiny", "dtype": "fp32"},
                          data={"train": mixture, **common},
                          train={"micro_batch_size": 2, "global_batch_size": 2, "max_steps": 2, "log_every": 1,
                                 "progress_bar": False},
                          deepspeed={"zero_stage": 0})
    out = tmp_path / "run"
    log = run_ftdist(1, str(recipe), [f"output_dir={out}"], timeout=300).stderr
    assert f"train: mixture of 2 sources, {total} pairs, {tok_chat + samples * per_text} tokens" in log
    assert _source_line(log, f"data.train[0] {chat}").groups() == tuple(map(str, (n_chat, tok_chat, n_chat,
                                                                                  tok_chat)))
    assert _source_line(log, f"data.train[1] {text}").groups() == tuple(map(str, (n_text, tok_text, samples,
                                                                                  samples * per_text)))
    assert f"({total // 2} per epoch)" in log
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all("rewards/margins" in r for r in steps)
