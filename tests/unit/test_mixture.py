"""Data mixtures: data.train / data.eval as a list of sources with their own settings, weights and sample counts."""

import collections
import json

import numpy as np
import pytest

from ftdist.config import ConfigError, DataSource, load_config
from ftdist.data.mixture import capped, mixture_fingerprint, select_rows, source_configs
from ftdist.run.outputs import dump_config

pytestmark = pytest.mark.unit


def _counts(rows) -> collections.Counter:
    return collections.Counter(rows.tolist())


# -- the selection: which rows of a source of n usable rows a weight or sample count takes ---------------------
def test_no_share_takes_every_row_once_in_order():
    assert select_rows(7).tolist() == list(range(7))


def test_weight_below_one_is_a_subsample_without_replacement():
    rows = select_rows(10, weight=0.5, seed=[3, 0])
    assert len(rows) == 5 and len(set(rows.tolist())) == 5  # round(0.5 x 10) rows, none twice
    assert all(0 <= r < 10 for r in rows)


@pytest.mark.parametrize("n", [1, 4, 10, 13])
def test_weight_two_takes_every_row_exactly_twice(n):
    rows = select_rows(n, weight=2.0, seed=[0, 1])
    assert _counts(rows) == {i: 2 for i in range(n)}


def test_weight_above_one_is_whole_repeats_plus_a_subsample_for_the_fraction():
    rows = select_rows(10, weight=2.5, seed=[42, 0])
    counts = _counts(rows)
    assert len(rows) == 25 and set(counts) == set(range(10))  # round(2.5 x 10) rows; every row at least twice
    assert sorted(collections.Counter(counts.values()).items()) == [(2, 5), (3, 5)]  # the .5: 5 distinct rows once more


def test_samples_more_or_fewer_than_the_source_has():
    many = _counts(select_rows(4, samples=11, seed=[1, 2]))  # 11 = 2 x 4 + 3
    assert sum(many.values()) == 11 and sorted(collections.Counter(many.values()).items()) == [(2, 1), (3, 3)]
    few = select_rows(10, samples=4, seed=[1, 2])
    assert len(few) == 4 and len(set(few.tolist())) == 4
    assert _counts(select_rows(4, samples=8)) == {i: 2 for i in range(4)}


def test_selection_is_determined_by_the_seed():
    a = select_rows(1000, weight=0.3, seed=[42, 0])
    assert np.array_equal(a, select_rows(1000, weight=0.3, seed=[42, 0]))
    # 300 of 1000 rows: two seeds drawing the same set has probability 1 / C(1000, 300), i.e. never
    assert not np.array_equal(a, select_rows(1000, weight=0.3, seed=[43, 0]))
    assert not np.array_equal(a, select_rows(1000, weight=0.3, seed=[42, 1]))  # the source's place counts too


def test_weight_and_samples_together_are_refused():
    with pytest.raises(ValueError):
        select_rows(5, weight=1.0, samples=3)


def test_capped_keeps_a_seeded_subsample_in_order():
    assert capped(5, 0, seed=1).tolist() == list(range(5)) and capped(5, 9, seed=1).tolist() == list(range(5))
    kept = capped(100, 10, seed=1)
    assert len(set(kept.tolist())) == 10 and kept.tolist() == sorted(kept.tolist())
    assert np.array_equal(kept, capped(100, 10, seed=1))


# -- the recipe ---------------------------------------------------------------------------------------------------
MIX = ["a.jsonl", {"path": "org/chat", "split": "train_sft", "columns": {"messages": "conversations"},
                   "weight": 0.5},
       {"path": "b.csv", "format": "alpaca", "samples": 100, "filter": ["score >= 3"], "max_samples": 50}]


def _data(train, **data):
    return load_config(data={"data": {"train": train, **data}})


def test_a_list_of_sources_loads_and_each_source_falls_back_to_data_keys():
    cfg = _data(MIX, eval=["e.jsonl", {"path": "org/chat", "split": "test_sft[:20]"}], columns={"text": "body"},
                shuffle_seed=7, eval_split="dev")
    src = source_configs(cfg.data, "train")
    assert [s.spec for s in src] == ["a.jsonl", "org/chat", "b.csv"]
    assert [(s.weight, s.samples) for s in src] == [(None, None), (0.5, None), (None, 100)]
    a, hub, csv = (s.cfg for s in src)
    assert (a.train, a.split, a.columns, a.format, a.shuffle_seed, a.max_samples) == (
        "a.jsonl", "train", {"text": "body"}, "auto", 7, 0)
    assert (hub.train, hub.split, hub.columns) == ("org/chat", "train_sft", {"messages": "conversations"})
    assert (csv.format, csv.filter, csv.max_samples, csv.columns) == ("alpaca", ["score >= 3"], 50, {"text": "body"})
    ev = source_configs(cfg.data, "eval")
    assert [(s.spec, s.cfg.eval, s.cfg.eval_split, s.cfg.train) for s in ev] == [
        ("e.jsonl", "e.jsonl", "dev", None), ("org/chat", "org/chat", "test_sft[:20]", None)]
    assert [s.label for s in ev] == ["data.eval[0] e.jsonl (split dev)", "data.eval[1] org/chat (split test_sft[:20])"]


def test_a_plain_string_is_the_recipe_unchanged():
    cfg = _data("a.jsonl", eval="e.jsonl")
    (train,), (ev,) = source_configs(cfg.data, "train"), source_configs(cfg.data, "eval")
    assert train.cfg is cfg.data and ev.cfg is cfg.data and train.index is None and train.spec == "a.jsonl"
    assert source_configs(_data("a.jsonl").data, "eval") == []


@pytest.mark.parametrize("train,words", [
    ([{"path": "a.jsonl", "wieght": 2}], ["data.train[0].wieght", "did you mean 'data.train[0].weight'", "samples"]),
    (["a.jsonl", {"path": "b.jsonl", "weight": 0}], ["data.train[1].weight", "got 0", "> 0"]),
    (["a.jsonl", {"path": "b.jsonl", "weight": -1.5}], ["data.train[1].weight", "> 0"]),
    (["a.jsonl", {"path": "b.jsonl", "weight": "half"}], ["data.train[1].weight", "'half'", "float"]),
    ([{"path": "a.jsonl", "weight": 1, "samples": 5}], ["data.train[0]", "weight=1.0 and samples=5", "one of them"]),
    ([{"path": "a.jsonl", "samples": 0}], ["data.train[0].samples", ">= 1"]),
    ([{"path": "a.jsonl", "samples": 2.5}], ["data.train[0].samples", "2.5", "int"]),
    ([{"weight": 2}], ["data.train[0]", "missing key 'path'"]),
    ([], ["data.train", "empty"]),
    ([{"path": "a.jsonl", "filter": ["score ~ 3"]}], ["data.train[0].filter", "column op value"]),
    ([{"path": "a.jsonl", "format": "xml"}], ["data.train[0].format", "'xml'", "'alpaca'"]),
    ([{"path": "a.jsonl", "columns": ["a"]}], ["data.train[0].columns", "dict"]),
])
def test_bad_sources_name_the_key(train, words):
    with pytest.raises(ConfigError) as e:
        _data(train)
    for w in words:
        assert w in str(e.value)


def test_bad_eval_source_and_a_preference_stage_format_name_the_key():
    with pytest.raises(ConfigError, match=r"data.eval\[1\].weight: got -1.0, must be a number > 0"):
        _data("a.jsonl", eval=["e.jsonl", {"path": "f.jsonl", "weight": -1}])
    with pytest.raises(ConfigError, match=r"data.train\[1\].format: got 'messages' for stage=dpo"):
        load_config("dpo_tiny", data={"data": {"train": ["p.jsonl", {"path": "q.jsonl", "format": "messages"}]}})


def test_a_mixture_round_trips_through_config_yaml_and_overrides(tmp_path):
    cfg = _data(MIX, eval=["e.jsonl"])
    dump_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "wieght" not in text and "split: null" not in text  # a source lists the keys it sets, nothing else
    again = load_config(str(tmp_path / "config.yaml"))
    assert again.data == cfg.data and again.to_dict() == cfg.to_dict()
    assert isinstance(again.data.train[1], DataSource) and again.data.train[1].weight == 0.5
    over = load_config(None, ["data.train=[a.jsonl, {path: b.csv, samples: 3}]"])
    assert over.data.train == ["a.jsonl", DataSource(path="b.csv", samples=3)]
    assert load_config(None, ["data.train=c.jsonl"]).data.train == "c.jsonl"  # a string stays a string


def test_print_config_shows_the_mixture(tmp_path, capsys):
    import yaml

    from ftdist.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"train": MIX}}))
    assert main(["train", str(recipe), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["train"] == MIX


# -- the resume check: the training data's content -----------------------------------------------------------
def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_fingerprint_covers_every_source_and_its_share(tmp_path):
    from ftdist.data.loading import data_fingerprint

    a = _write(tmp_path / "a.jsonl", [{"text": "one"}])
    b = _write(tmp_path / "b.jsonl", [{"text": "two"}])
    single = _data(a).data
    assert mixture_fingerprint(single) == data_fingerprint(a, single)  # a plain source: as before mixtures

    def fp(*train):
        return mixture_fingerprint(_data(list(train)).data)

    base = fp(a, {"path": b, "weight": 2})
    assert base == fp(a, {"path": b, "weight": 2.0})
    others = {fp(a, {"path": b, "weight": 3}), fp(a, {"path": b, "samples": 2}), fp(a, b), fp(b, {"path": a, "weight": 2}),
              fp(a, {"path": b, "weight": 2, "columns": {"text": "body"}})}
    assert base not in others and len(others) == 5
    _write(tmp_path / "b.jsonl", [{"text": "changed"}])
    assert fp(a, {"path": b, "weight": 2}) != base


# -- the tasks: every source tokenised on its own, then its rows taken -----------------------------------------
@pytest.fixture(scope="module")
def tok():
    from ftdist.config import ModelConfig
    from ftdist.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig())


def _chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Sort the digits: {i} {9 - i} 5"},
            {"role": "assistant", "content": " ".join(sorted(f"{i}{9 - i}5"))}]


def test_sft_task_takes_each_source_s_rows_and_caches_each_source_alone(tmp_path, tok):
    from ftdist.train.sft import SFTTask

    chat = _write(tmp_path / "chat.jsonl", [{"messages": _chat(i)} for i in range(6)])
    text = _write(tmp_path / "notes.jsonl", [{"body": f"note number {i}"} for i in range(4)])
    cache = str(tmp_path / "cache")
    alone = {}
    for path, data in ((chat, {}), (text, {"format": "text", "columns": {"text": "body"}})):
        task = SFTTask(_data(path, **data), tok, None)
        task.prepare_data(cache, False)
        alone[path] = [tuple(task.train[i][0]) for i in range(len(task.train))]
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 2

    mixed = SFTTask(_data([chat, {"path": text, "format": "text", "columns": {"text": "body"}, "weight": 2}]), tok,
                    None)
    summary = mixed.prepare_data(cache, False)
    rows = collections.Counter(tuple(mixed.train[i][0]) for i in range(len(mixed.train)))
    assert sum(rows.values()) == 6 + 2 * 4
    assert rows == collections.Counter(alone[chat] + 2 * alone[text])  # chat rows once, every note twice
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == entries  # the same cache keys as alone
    assert summary.splitlines()[0].startswith("train: mixture of 2 sources, 14 rows, ")
    assert "data.train[1] " + text + ": read 4 rows" in summary and "took 8 rows" in summary
    assert "(weight 2)" in summary


def test_pair_task_key_names_the_mixed_pairs(tmp_path, tok):
    from ftdist.train.pairs import PairTask

    rows = [{"prompt": f"Sort: {i} {9 - i}", "chosen": f" {min(i, 9 - i)} {max(i, 9 - i)}",
             "rejected": f" {max(i, 9 - i)} {min(i, 9 - i)}"} for i in range(5)]
    a, b = _write(tmp_path / "a.jsonl", rows), _write(tmp_path / "b.jsonl", rows[:3])
    cache = str(tmp_path / "cache")

    def key(train, seed=42):
        cfg = load_config(data={"stage": "dpo", "seed": seed, "data": {"train": train, "format": "preference"}})
        task = PairTask(cfg, tok, None)
        task.prepare_data(cache, False)
        return task.train.key, len(task.train)

    plain_a, plain_b = key(a), key(b)
    mix = key([a, {"path": b, "weight": 0.5}])
    assert plain_a[0].startswith("pref-a-") and mix[1] == 5 + round(0.5 * 3)
    assert mix == key([a, {"path": b, "weight": 0.5}])  # the same pairs: the same key (cached log-probs reused)
    others = {key([a, {"path": b, "weight": 1.5}])[0], key([a, {"path": b, "samples": 2}])[0], key([b, a])[0],
              key([a, {"path": b, "weight": 0.5}], seed=7)[0], key([a])[0]}
    assert mix[0] not in others | {plain_a[0], plain_b[0]} and len(others) == 5


def test_ppo_prompts_from_a_mixture(tmp_path, tok):
    from ftdist.rl.prompts import load_prompt_sources, load_prompts

    a = _write(tmp_path / "a.jsonl", [{"prompt": f"Sort: {i} 1", "answer": f"1 {i}"} for i in range(4)])
    b = _write(tmp_path / "b.jsonl", [{"question": [{"role": "user", "content": f"Sort: {i} 2"}], "level": i}
                                      for i in range(3)])
    cfg = load_config(data={"stage": "ppo", "ppo": {"reward_fn": "ftdist.data.tiny_task:sort_reward"},
                            "data": {"train": [a, {"path": b, "columns": {"prompt": "question"}, "samples": 5}],
                                     "eval": [a, b], "columns": {}}})
    prompts, lines = load_prompt_sources(cfg.data, "train", tok, cfg.seed)
    assert len(prompts) == 4 + 5
    assert prompts.texts[:4] == load_prompts(a, cfg.data, tok).texts  # the first source whole, in order
    b_alone = load_prompts(b, _data(b, columns={"prompt": "question"}).data, tok).texts
    assert set(prompts.texts[4:]) == set(b_alone)
    assert sorted(collections.Counter(prompts.texts[4:]).values()) == [1, 2, 2]
    # columns a source lacks are None on its prompts (the reward function sees every column)
    assert prompts.extras["answer"] == [f"1 {i}" for i in range(4)] + [None] * 5
    assert prompts.extras["level"][:4] == [None] * 4 and set(prompts.extras["level"][4:]) == {0, 1, 2}
    assert lines.splitlines() == [f"data.train[0] {a}: read 4 prompts; took 4",
                                  f"data.train[1] {b}: read 3 prompts; took 5 (samples 5)"]
    with pytest.raises(Exception, match="no 'prompt' column"):  # eval sources keep data.columns: b has no prompt
        load_prompt_sources(cfg.data, "eval", tok, cfg.seed)
    capped_eval, _ = load_prompt_sources(_data([a, a], eval=None).data, "train", tok, 0, max_rows=3)
    assert len(capped_eval) == 3
    single, lines = load_prompt_sources(_data(a).data, "train", tok, cfg.seed)
    assert single.texts == load_prompts(a, cfg.data, tok).texts and lines == ""


def test_weight_rounds_halves_up_and_a_share_of_no_rows_is_an_error(tmp_path):
    from ftdist.data.loading import DataError
    from ftdist.data.mixture import source_rows

    assert len(select_rows(5, weight=0.5)) == 3 and len(select_rows(5, weight=0.3)) == 2  # 2.5 -> 3, 1.5 -> 2
    src = source_configs(_data(["a.jsonl", {"path": "b.jsonl", "weight": 0.01}]).data)[1]
    with pytest.raises(DataError, match=r"data.train\[1\] b.jsonl \(split train\): weight 0.01 of its 10 usable "
                                        r"rows takes no rows"):
        source_rows(src, 10, seed=42)
