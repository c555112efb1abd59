import json

import pytest

from ftdist.config import load_config
from ftdist.data.loading import DataError, RowError
from ftdist.data.tokenize import IGNORE_INDEX, encode_messages, tokenize_sft

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    from ftdist.models.loading import load_tokenizer
    from ftdist.config import ModelConfig

    return load_tokenizer(ModelConfig())


def _cfg(train, **data):
    return load_config(data={"data": {"train": str(train), **data}})


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Sort the digits: 3 1 2"},
        {"role": "assistant", "content": "1 2 3"}, {"role": "user", "content": "again: 9 8"},
        {"role": "assistant", "content": "8 9"}]


def test_labels_cover_assistant_turns_and_their_eos(tok):
    ids, labels, truncated = encode_messages(tok, CONV, max_length=512)
    assert not truncated and len(ids) == len(labels)
    trained = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    text = tok.decode(trained)
    assert text.replace(" ", "").replace(tok.eos_token, "|") == "123|89|"
    assert sum(1 for l in labels if l == tok.eos_token_id) == 2
    # everything before the first assistant token is masked
    first = labels.index(next(l for l in labels if l != IGNORE_INDEX))
    assert "Sort the digits" in tok.decode(ids[:first])


def test_train_on_prompt_trains_everything(tok):
    ids, labels, _ = encode_messages(tok, CONV, max_length=512, train_on_prompt=True)
    assert labels == ids


def test_truncation_counted(tok, tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}] * 3)
    full = len(encode_messages(tok, CONV, max_length=512)[0])
    ds, stats = tokenize_sft(str(f), tok, _cfg(f, max_length=full - 3).data, None)
    assert stats.truncated == 3 and max(len(x) for x in ds["input_ids"]) == full - 3


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet", "dir"])
def test_file_types_and_alpaca_with_column_mapping(tok, tmp_path, ext):
    import datasets

    rows = [{"q": f"Sort the digits: {i} 1", "extra": "", "a": f"1 {i}"} for i in range(2, 6)]
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"d.{ext}"
    {"jsonl": lambda: ds.to_json(str(path)), "json": lambda: path.write_text(json.dumps(rows)),
     "csv": lambda: ds.to_csv(str(path)), "parquet": lambda: ds.to_parquet(str(path)),
     "dir": lambda: ds.save_to_disk(str(path))}[ext]()
    cfg = _cfg(path, format="alpaca", columns={"instruction": "q", "input": "extra", "output": "a"})
    out, stats = tokenize_sft(str(path), tok, cfg.data, None)
    assert stats.rows == 4
    trained = [t for t, l in zip(out[0]["input_ids"], out[0]["labels"]) if l != IGNORE_INDEX]
    assert tok.decode(trained, skip_special_tokens=True).replace(" ", "") == "12"


def test_text_format_trains_on_all_tokens_with_eos(tok, tmp_path):
    f = _write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world 42"}])
    ds, _ = tokenize_sft(str(f), tok, _cfg(f).data, None)
    assert ds[0]["labels"] == ds[0]["input_ids"] and ds[0]["input_ids"][-1] == tok.eos_token_id


@pytest.mark.parametrize("row,problem", [
    ({"messages": []}, "empty conversation"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": 3}]}, "must be a string"),
    ({"messages": "hi"}, "must be a list"),
    ({"other": 1}, "missing field 'messages'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
])
def test_malformed_row_names_file_and_row(tok, tmp_path, row, problem):
    good = {"messages": CONV[1:3]}
    f = _write_jsonl(tmp_path / "bad.jsonl", [good, good, row, good])
    with pytest.raises(RowError) as e:
        tokenize_sft(str(f), tok, _cfg(f, format="messages").data, None)
    assert str(f) in str(e.value) and "row 3" in str(e.value) and problem in str(e.value)
    ds, stats = tokenize_sft(str(f), tok, _cfg(f, format="messages", on_error="skip").data, None)
    assert stats.skipped == 1 and stats.rows == 3 and len(ds) == 3


def test_missing_file_and_undetectable_format(tok, tmp_path):
    with pytest.raises(DataError, match="not found"):
        tokenize_sft(str(tmp_path / "nope.jsonl"), tok, _cfg("x").data, None)
    f = _write_jsonl(tmp_path / "odd.jsonl", [{"foo": "bar"}])
    with pytest.raises(DataError, match="cannot detect the data format"):
        tokenize_sft(str(f), tok, _cfg(f).data, None)


def test_tokenised_data_is_cached_and_reused(tok, tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}] * 5)
    cfg = _cfg(f)
    ds1, _ = tokenize_sft(str(f), tok, cfg.data, str(tmp_path / "cache"))
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1
    f.write_text("garbage that would fail to parse\n")  # a different mtime/size invalidates the cache...
    with pytest.raises(DataError):
        tokenize_sft(str(f), tok, cfg.data, str(tmp_path / "cache"))
    _write_jsonl(tmp_path / "d2.jsonl", [{"messages": CONV}] * 5)
    (tmp_path / "d2.jsonl").rename(f)
    st = entries[0]
    ds2, _ = tokenize_sft(str(f), tok, cfg.data, str(tmp_path / "cache"))
    assert ds2["input_ids"] == ds1["input_ids"]
    assert st.exists()


def test_data_filter_keeps_rows_where_every_condition_holds(tok, tmp_path):
    from ftdist.config import ConfigError

    rows = [{"messages": CONV[1:3], "score": s, "status": st, "in_gsm8k_train": g, "source": src}
            for s, st, g, src in [(9, "win", False, "a"), (7, "win", False, "a"), (8, "tie", False, "b"),
                                  (10, "win", True, "c"), (8, "win", False, "b"), (None, "win", False, "a")]]
    path = _write_jsonl(tmp_path / "f.jsonl", rows)
    filters = ["score >= 8", "status != tie", "in_gsm8k_train == false", "source in [a, b]"]
    ds, stats = tokenize_sft(str(path), tok, _cfg(path, filter=filters).data, None)
    # kept: rows 1 and 5; 2 (score 7), 3 (tie), 4 (gsm8k, source c) and 6 (no score) are left out
    assert len(ds) == stats.rows == 2 and stats.filtered == 4 and "4 left out by data.filter" in stats.summary()
    one, _ = tokenize_sft(str(path), tok, _cfg(path, filter=["source not in [a, b]"]).data, None)
    assert len(one) == 1
    with pytest.raises(DataError, match=r"data.filter 'scor >= 8': no column 'scor' \(columns: messages, score"):
        tokenize_sft(str(path), tok, _cfg(path, filter=["scor >= 8"]).data, None)
    with pytest.raises(RowError, match=r"row 1: data.filter 'status >= 3': cannot compare 'win' with 3"):
        tokenize_sft(str(path), tok, _cfg(path, filter=["status >= 3"]).data, None)
    for bad in ("score", "score ~= 3", "source in a"):
        with pytest.raises(ConfigError, match="data.filter"):
            _cfg(path, filter=[bad])
    # the tokenised cache is keyed on the filter too
    cache = str(tmp_path / "cache")
    a, _ = tokenize_sft(str(path), tok, _cfg(path, filter=filters).data, cache)
    b, _ = tokenize_sft(str(path), tok, _cfg(path).data, cache)
    assert (len(a), len(b)) == (2, 6)


@pytest.mark.parametrize("name", ["chatml", "llama3", "llama2", "mistral", "zephyr", "tinyllama"])
def test_built_in_chat_templates_train_on_assistant_turns_only(name):
    """A base model's tokenizer with data.chat_template=NAME: masked assistant-only SFT as with its own template."""
    from ftdist.config import ModelConfig
    from ftdist.models.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig(), name)
    ids, labels, _ = encode_messages(tok, CONV, 512)
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    # two assistant turns, each its content, the template's own end-of-turn markup (e.g. <|im_end|>, which the
    # model must learn to emit) and one EOS; nothing of the system or user turns is trained
    assert [r[-1] for r in runs] == [tok.eos_token_id] * 2
    texts = [tok.decode(r[:-1]).strip() for r in runs]
    assert texts[0].startswith("1 2 3") and texts[1].startswith("8 9"), texts
    assert not any(w in t for t in texts for w in ("be brief", "Sort", "again", "user", "system")), texts
    prompt = tok.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True)
    assert "be brief" in prompt and "Sort the digits: 3 1 2" in prompt


def test_chat_template_from_a_file_or_another_tokenizer(tmp_path):
    from ftdist.config import ConfigError, ModelConfig
    from ftdist.data.templates import BUILTIN
    from ftdist.models.loading import load_tokenizer

    jinja = tmp_path / "t.jinja"
    jinja.write_text(BUILTIN["chatml"])
    assert load_tokenizer(ModelConfig(), str(jinja)).chat_template == BUILTIN["chatml"]
    other = load_tokenizer(ModelConfig(), "llama3")
    other.save_pretrained(tmp_path / "other")
    tok = load_tokenizer(ModelConfig(tokenizer=str(tmp_path / "other")))
    assert tok.chat_template == BUILTIN["llama3"]
    with pytest.raises(ConfigError, match="data.chat_template='chatlm': neither a built-in template"):
        load_tokenizer(ModelConfig(), "chatlm")
    base = load_tokenizer(ModelConfig())
    base.chat_template = None
    with pytest.raises(DataError, match="no chat template .* set data.chat_template"):
        encode_messages(base, CONV, 512)


def _hub_layout(root):
    """A dataset repository as on the Hub (HuggingFaceH4/ultrachat_200k's layout): data files per split, named in
    the README's configs, and a second subset."""
    (root / "data").mkdir(parents=True)
    (root / "extra").mkdir()
    for split, n in (("train_sft", 12), ("test_sft", 5)):
        _write_jsonl(root / "data" / f"{split}-00000-of-00001.jsonl",
                     [{"prompt_id": f"{split}-{i}", "messages": [CONV[1], {"role": "assistant", "content": str(i)}]}
                      for i in range(n)])
    _write_jsonl(root / "extra" / "train-00000-of-00001.jsonl", [{"messages": CONV[1:3]}] * 3)
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_sft\n    path: data/train_sft-*\n"
        "  - split: test_sft\n    path: data/test_sft-*\n- config_name: extra\n  data_files:\n  - split: train\n"
        "    path: extra/train-*\n---\n# a tiny chat dataset\n")
    return root


def test_a_dataset_repository_by_name_with_split_subset_and_sampling(tok, tmp_path, monkeypatch):
    from ftdist.data.loading import load_rows

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # everything local, as on a machine without the Hub
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    repo = str(_hub_layout(tmp_path / "ultrachat_mini"))
    assert len(load_rows(repo, _cfg(repo, split="train_sft").data)) == 12
    eval_cfg = _cfg("other.jsonl", eval=repo, eval_split="test_sft[:3]").data  # data.eval reads data.eval_split
    assert [r["prompt_id"] for r in load_rows(repo, eval_cfg)] == ["test_sft-0", "test_sft-1", "test_sft-2"]
    assert len(load_rows(repo, _cfg(repo, subset="extra").data)) == 3
    sampled = load_rows(repo, _cfg(repo, split="train_sft", max_samples=4, shuffle_seed=7).data)
    assert len(sampled) == 4 and sampled["prompt_id"] != [f"train_sft-{i}" for i in range(4)]
    assert sampled["prompt_id"] == load_rows(repo, _cfg(repo, split="train_sft", max_samples=4,
                                                        shuffle_seed=7).data)["prompt_id"]  # seeded: the same
    ds, stats = tokenize_sft(repo, tok, _cfg(repo, split="train_sft").data, str(tmp_path / "cache"))
    assert stats.rows == 12
    again, _ = tokenize_sft(repo, tok, _cfg(repo, split="train_sft", max_samples=5).data, str(tmp_path / "cache"))
    assert len(again) == 5  # max_samples is part of the cache key
    # what does not exist is one line naming it and what does
    with pytest.raises(DataError, match=r"split 'train'.*train_sft"):
        load_rows(repo, _cfg(repo).data)
    with pytest.raises(DataError, match=r"extr.*set data.subset"):
        load_rows(repo, _cfg(repo, subset="extr").data)
    with pytest.raises(DataError, match="someone/no_such_dataset: not a local path, and as a dataset name it needs"):
        load_rows("someone/no_such_dataset", _cfg("someone/no_such_dataset").data)  # offline: the Hub is not asked
    with pytest.raises(DataError, match="data file not found"):
        load_rows(str(tmp_path / "trian.jsonl"), None)


def test_parallel_tokenising_equals_one_process(tok, tmp_path):
    """data.num_proc=2 (two worker processes, each tokenising half the rows) gives the same rows in the same order,
    the same counts and the same skipped-row messages as one process; a bad row met in a worker is reported from
    the parent with its file and row number."""
    rows = []
    for i in range(60):
        if i % 7 == 3:
            rows.append({"messages": [{"role": "user", "content": "hi"}], "n": i})  # no assistant turn: no target
        elif i % 11 == 5:
            rows.append({"messages": "not a list", "n": i})  # malformed
        else:
            rows.append({"messages": CONV[:3] + [{"role": "user", "content": f"row {i}"},
                                                  {"role": "assistant", "content": "x " * (i % 9)}], "n": i})
    f = _write_jsonl(tmp_path / "d.jsonl", rows)
    kw = dict(on_error="skip", filter=["n != 10"])
    one_ds, one = tokenize_sft(str(f), tok, _cfg(f, num_proc=1, **kw).data, None)
    two_ds, two = tokenize_sft(str(f), tok, _cfg(f, num_proc=2, **kw).data, str(tmp_path / "cache"))
    assert one_ds["input_ids"] == two_ds["input_ids"] and one_ds["labels"] == two_ds["labels"]
    assert one.__dict__ == two.__dict__
    # 60 rows: 1 filtered (n == 10); skipped as malformed: the 4 rows i % 11 == 5 (5, 16, 27, 49; 38 is also
    # i % 7 == 3, where the first rule wins) and the 8 without an assistant turn (i % 7 == 3: 3, 17, 24, 31, 38,
    # 45, 52, 59; 10 is filtered first)
    assert (one.filtered, one.skipped, one.no_target) == (1, 12, 0)
    assert one.rows == 60 - 1 - 12 == len(one_ds)
    assert one.skipped_examples[0].startswith("row 4: ")  # i = 3, 1-based
    assert one.tokens == sum(len(x) for x in one_ds["input_ids"])
    with pytest.raises(RowError) as e:
        tokenize_sft(str(f), tok, _cfg(f, num_proc=2).data, None)
    assert e.value.row == 4 and str(f) in str(e.value)


def test_process_count():
    from ftdist.data.parallel import MIN_ROWS_PER_PROCESS, available_cpus, process_count

    assert process_count(None, 10) == 1  # small data: one process
    assert process_count(None, 100 * MIN_ROWS_PER_PROCESS) == available_cpus()
    assert process_count(4, 3) == 3 and process_count(4, 10_000) == 4


def test_tokenising_after_a_padded_call_is_unchanged(tok, tmp_path):
    """A padded, truncated call (as generation makes, left padding) leaves its settings in the fast tokenizer's
    backend; tokenising data afterwards must still give the unpadded ids."""
    f = _write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}, {"messages": CONV[:3]}])
    before, _ = tokenize_sft(str(f), tok, _cfg(f).data, None)
    side = tok.padding_side
    tok.padding_side = "left"
    tok(["a", "a much longer text than the first"], padding=True, truncation=True, max_length=8)
    tok.padding_side = side
    after, _ = tokenize_sft(str(f), tok, _cfg(f).data, None)
    assert after["input_ids"] == before["input_ids"] and after["labels"] == before["labels"]
