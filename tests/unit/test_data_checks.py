"""Data that used to be refused for no reason, or to fail as a traceback from inside datasets, pyarrow or jinja2:
text rows on a base model without a chat template, chat templates that fail, a damaged tokenised cache, missing
sources and revisions of local paths."""

import json

import pytest

from ftdist.config import load_config
from ftdist.data.loading import DataError, RowError
from ftdist.data.tokenize import IGNORE_INDEX, tokenize_sft

pytestmark = pytest.mark.unit

CHAT = [{"role": "user", "content": "Sort the digits: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(train, **data):
    return load_config(data={"data": {"train": str(train), **data}}).data


@pytest.fixture(scope="module")
def base_tok(tmp_path_factory):
    """The tokenizer of a GPT-2-shaped base model: saved without a chat template, loaded as a run loads it."""
    from ftdist.config import ModelConfig
    from ftdist.models.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    tok.chat_template = None
    out = tmp_path_factory.mktemp("gpt2")
    tok.save_pretrained(out)
    loaded = load_tokenizer(ModelConfig(name_or_path=str(out)))
    assert loaded.chat_template is None
    return loaded


def test_text_rows_need_no_chat_template(base_tok, tmp_path):
    """data.format=text on a base model: every token trained, EOS closing each row. It used to be refused with
    'the tokenizer has no chat template ... or use data.format=text'."""
    f = _write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world 42"}, {"text": "the quick brown fox"}])
    ds, stats = tokenize_sft(str(f), base_tok, _cfg(f, format="text"), None)
    expected = [base_tok("hello world 42")["input_ids"] + [base_tok.eos_token_id],
                base_tok("the quick brown fox")["input_ids"] + [base_tok.eos_token_id]]
    assert ds["input_ids"] == expected and ds["labels"] == expected and stats.rows == 2
    auto, _ = tokenize_sft(str(f), base_tok, _cfg(f), None)  # detected as text
    assert auto["input_ids"] == expected
    chats = _write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match="no chat template .* set data.chat_template"):  # conversations still do
        tokenize_sft(str(chats), base_tok, _cfg(chats), None)


SYNTAX = "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}"
RAISES = ("{% for m in messages %}\n{% if m['role'] == 'user' and m['content'].startswith('x') %}"
          "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
UNDEFINED = ("{{ messages[0]['content'] }}\n\n{% if messages[0]['content'].startswith('x') %}"
             "{{ messages[5]['content'] }}{% endif %}")
ESCAPE = "{{ messages[0]['content'] }}\n{{ ''.__class__.__mro__[1].__subclasses__() }}"


@pytest.mark.parametrize("template,error,words", [
    (SYNTAX, DataError, [", line 2: not a valid Jinja template: unexpected '}'"]),
    (ESCAPE, DataError, [", line 2: refused by the template sandbox: access to attribute '__class__'"]),
    (RAISES, RowError, ["row 2: data.chat_template=", ", line 2: the template raised an error: roles must alternate"]),
    (UNDEFINED, RowError, ["row 2: data.chat_template=", ", line 3: undefined value: list object has no element 5"]),
])
def test_a_failing_chat_template_is_one_line_naming_it_and_its_line(tmp_path, template, error, words):
    from ftdist.config import ModelConfig
    from ftdist.models.loading import load_tokenizer

    jinja = tmp_path / "chat.jinja"
    jinja.write_text(template)
    tok = load_tokenizer(ModelConfig(), str(jinja))
    f = _write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, {"messages": [{"role": "user", "content": "x y"},
                                                                            CHAT[1]]}])
    with pytest.raises(error) as e:
        tokenize_sft(str(f), tok, _cfg(f, chat_template=str(jinja)), None)
    message = str(e.value)
    assert "\n" not in message and f"data.chat_template={jinja}, line" in message
    for w in words:
        assert w in message
    if error is RowError:  # the conversation's problem: data.on_error=skip leaves that row out
        ds, stats = tokenize_sft(str(f), tok, _cfg(f, chat_template=str(jinja), on_error="skip"), None)
        assert stats.skipped == 1 and stats.rows == 1


def test_the_tokenizers_own_template_is_named_by_its_directory(tmp_path):
    """Without data.chat_template the error names the tokenizer the template came from; preference rows too."""
    from ftdist.config import ModelConfig
    from ftdist.data.preference import tokenize_preference
    from ftdist.models.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    tok.chat_template = RAISES
    tok.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "tok")))
    f = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "x 1"}],
                                             "chosen": [CHAT[1]], "rejected": [{"role": "assistant", "content": "3"}]}])
    with pytest.raises(RowError, match=rf"row 1: the chat template of {tmp_path / 'tok'}, line 2: the template "
                                       rf"raised an error: roles must alternate"):
        tokenize_preference(str(f), tok, load_config("dpo_tiny", [f"data.train={f}"]).data, None)


def test_a_truncated_tokenised_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    """A cut-short Arrow file (a full disk, an interrupted copy) used to end in pyarrow's OSError; the cache is
    now removed with a warning naming it and built again, with the same rows."""
    from ftdist.config import ModelConfig
    from ftdist.models.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    f = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i} " * 20} for i in range(40)])
    cache = tmp_path / "cache"
    first, stats = tokenize_sft(str(f), tok, _cfg(f), str(cache))
    rows = first.to_list()  # read now: `first` maps the file about to be damaged
    (entry,) = cache.iterdir()
    (arrow,) = (entry / "data").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="ftdist"):
        again, stats2 = tokenize_sft(str(f), tok, _cfg(f), str(cache))
    assert f"{entry}: the tokenised cache cannot be read (OSError" in caplog.text and "building it again" in caplog.text
    assert again.to_list() == rows and stats2 == stats and len(rows) == 40
    caplog.clear()
    tokenize_sft(str(f), tok, _cfg(f), str(cache))  # the rebuilt cache reads
    assert "cannot be read" not in caplog.text and [p.name for p in cache.iterdir()] == [entry.name]
    assert all(lab != IGNORE_INDEX for lab in rows[0]["labels"])


def test_missing_sources_and_local_revisions_name_their_key(tmp_path):
    from ftdist.data.mixture import check_sources

    here = _write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    gone = tmp_path / "gone.jsonl"
    with pytest.raises(DataError, match=rf"^data.train\[1\]: {gone}: data file not found$"):
        check_sources(load_config(data={"data": {"train": [str(here), str(gone)]}}).data)
    with pytest.raises(DataError, match=rf"^data.eval: {gone}: data file not found$"):
        check_sources(load_config(data={"data": {"train": str(here), "eval": str(gone)}}).data)
    with pytest.raises(DataError, match=rf"^data.train: {here} is a local path, which has no revisions: "
                                        rf"data.revision='v1.0' would be ignored"):
        check_sources(_cfg(here, revision="v1.0"))
    # the tokenised cache's key reads the file's content first: the same line there, not a FileNotFoundError
    from ftdist.config import ModelConfig
    from ftdist.models.loading import load_tokenizer

    with pytest.raises(DataError, match=rf"^data.train: {gone}: data file not found$"):
        tokenize_sft(str(gone), load_tokenizer(ModelConfig()), _cfg(gone), str(tmp_path / "cache"))
