"""Preference rows: shapes accepted, prompt extraction, column mapping, filters, bad rows, tokens and masks."""

import json

import pytest
import torch

from ftdist.config import ConfigError, load_config
from ftdist.data.formats import RowProblem
from ftdist.data.loading import DataError, RowError
from ftdist.data.preference import PreferenceData, collate_pairs, encode_pair, tokenize_preference
from ftdist.data.preference_rows import PreferencePair, normalize_preference
from ftdist.data.tokenize import IGNORE_INDEX

pytestmark = pytest.mark.unit

USER = {"role": "user", "content": "Sort the digits: 3 1 2"}


@pytest.fixture(scope="module")
def tok():
    from ftdist.config import ModelConfig
    from ftdist.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig())


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _data_cfg(path, stage="dpo", **data):
    return load_config(data={"stage": stage, "data": {"train": path, "max_length": 64, "max_prompt_length": 32,
                                                      **data}}).data


def test_explicit_prompt_as_strings_and_as_messages():
    p = normalize_preference({"prompt": "Q?", "chosen": " yes", "rejected": " no"}, {})
    assert (p.prompt, p.chosen, p.rejected, p.conversational) == ("Q?", " yes", " no", False)
    p = normalize_preference({"prompt": [USER], "chosen": [{"role": "assistant", "content": "1 2 3"}],
                              "rejected": [{"from": "gpt", "value": "1 3 2"}]}, {})
    assert p.conversational and p.prompt == [USER]
    assert p.rejected == [{"role": "assistant", "content": "1 3 2"}]  # ShareGPT names accepted


def test_hh_rlhf_transcripts_share_their_prompt():
    head = "\n\nHuman: What color is the sky?\n\nAssistant: Blue, mostly.\n\nHuman: And at night?\n\nAssistant:"
    p = normalize_preference({"chosen": head + " It is dark, with stars.", "rejected": head + " It is green."}, {})
    assert p.prompt == head
    assert (p.chosen, p.rejected) == (" It is dark, with stars.", " It is green.")


def test_shared_text_prefix_without_markers_is_cut_between_words():
    p = normalize_preference({"chosen": "The answer is four", "rejected": "The answer is five"}, {})
    assert (p.prompt, p.chosen, p.rejected) == ("The answer is", " four", " five")


def test_message_lists_share_their_first_turns():
    conv = [{"role": "system", "content": "be brief"}, USER, {"role": "assistant", "content": "1 2 3"},
            {"role": "user", "content": "and 9 8?"}]
    p = normalize_preference({"chosen": conv + [{"role": "assistant", "content": "8 9"}],
                              "rejected": conv + [{"role": "assistant", "content": "9 8"}]}, {})
    assert p.prompt == conv
    assert p.chosen == [{"role": "assistant", "content": "8 9"}]


def test_string_prompt_with_full_conversations_uses_the_conversations():
    # UltraFeedback-binarized: prompt repeated as a string, chosen/rejected are whole chats
    row = {"prompt": "Sort the digits: 3 1 2", "chosen": [USER, {"role": "assistant", "content": "1 2 3"}],
           "rejected": [USER, {"role": "assistant", "content": "3 2 1"}], "score_chosen": 9.0, "score_rejected": 2}
    p = normalize_preference(row, {})
    assert p.prompt == [USER] and p.chosen[0]["content"] == "1 2 3"
    assert (p.score_chosen, p.score_rejected) == (9.0, 2.0)


def test_orca_dpo_pairs_mapping_with_system():
    row = {"system": "You are terse.", "question": "Sort 3 1 2", "chosen": "1 2 3", "rejected": "1 3 2"}
    p = normalize_preference(row, {"prompt": "question"})
    assert p.conversational
    assert p.prompt == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Sort 3 1 2"}]
    assert p.chosen == [{"role": "assistant", "content": "1 2 3"}]
    # an empty system column still makes a chat, just without a system turn
    p = normalize_preference({**row, "system": ""}, {"prompt": "question"})
    assert p.prompt == [{"role": "user", "content": "Sort 3 1 2"}]
    # renamed answer columns
    p = normalize_preference({"q": "Q", "good": "a", "bad": "b"}, {"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert (p.prompt, p.chosen, p.rejected) == ("Q", "a", "b")


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "Q", "rejected": "b"}, "missing field 'chosen'"),
    ({"prompt": "Q", "chosen": 3, "rejected": "b"}, "chosen must be a string or a list"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": "high"}, "'score_chosen' must be a finite number"),
    ({"prompt": [USER], "chosen": [USER], "rejected": [{"role": "assistant", "content": "x"}]},
     "must start with an assistant turn"),
    ({"chosen": [{"role": "robot", "content": "x"}], "rejected": "y"}, "unknown role"),
])
def test_malformed_rows_are_named(row, problem):
    with pytest.raises(RowProblem, match=problem):
        normalize_preference(row, {})


def test_bad_row_in_a_file_names_file_and_row_or_is_skipped(tok, tmp_path):
    good = {"prompt": "Q", "chosen": " a", "rejected": " b"}
    path = _write_jsonl(tmp_path / "p.jsonl", [good, good, {"prompt": "Q", "chosen": " a"}, good])
    with pytest.raises(RowError, match=r"p\.jsonl: row 3: missing field 'rejected'"):
        tokenize_preference(path, tok, _data_cfg(path), None)
    ds, stats, _ = tokenize_preference(path, tok, _data_cfg(path, on_error="skip"), None)
    assert len(ds) == stats.rows == 3 and stats.skipped == 1 and "row 3" in stats.skipped_examples[0]


def test_sft_file_for_a_preference_stage_is_refused(tok, tmp_path):
    path = _write_jsonl(tmp_path / "sft.jsonl", [{"messages": [USER, {"role": "assistant", "content": "1 2 3"}]}])
    with pytest.raises(DataError, match="preference"):
        tokenize_preference(path, tok, _data_cfg(path), None)


def test_filters_drop_ties_and_low_scores(tok, tmp_path):
    rows = [{"prompt": "Q", "chosen": " a", "rejected": " b", "score_chosen": 8, "score_rejected": 3},
            {"prompt": "Q", "chosen": " a", "rejected": " b", "score_chosen": 5, "score_rejected": 5},
            {"prompt": "Q", "chosen": " a", "rejected": " a", "score_chosen": 6, "score_rejected": 1},
            {"prompt": "Q", "chosen": " a", "rejected": " b", "score_chosen": 2, "score_rejected": 1}]
    path = _write_jsonl(tmp_path / "s.jsonl", rows)
    ds, stats, _ = tokenize_preference(path, tok, _data_cfg(path, drop_ties=True, min_chosen_score=4), None)
    assert (stats.rows, stats.ties, stats.low_score) == (1, 2, 1)
    assert ds["score_chosen"] == [8.0] and ds["score_rejected"] == [3.0]
    ds, stats, _ = tokenize_preference(path, tok, _data_cfg(path), None)
    assert stats.rows == 4
    # data.filter on any column, as the guides filter UltraFeedback-style data
    ds, stats, _ = tokenize_preference(path, tok, _data_cfg(path, filter=["score_chosen >= 6"]), None)
    assert (stats.rows, stats.filtered) == (2, 2) and ds["score_chosen"] == [8.0, 6.0]


def test_chat_pair_tokens_and_response_mask(tok):
    pair = PreferencePair([USER], [{"role": "assistant", "content": "1 2 3"}],
                          [{"role": "assistant", "content": "3 2 1 0"}])
    prompt, chosen, rejected, truncated = encode_pair(tok, pair, 32, 64)
    assert not truncated
    full = tok.apply_chat_template([USER, {"role": "assistant", "content": "1 2 3"}], tokenize=False)
    assert tok.decode(prompt + chosen) == full
    assert tok.decode(prompt) == tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert tok.decode(chosen).startswith("1 2 3" + tok.eos_token)


def test_text_pair_gets_eos_and_truncation_keeps_prompt_end(tok):
    pair = PreferencePair("Sort the digits: 3 1 2\nAnswer:", " 1 2 3", " 3 2 1")
    prompt, chosen, rejected, _ = encode_pair(tok, pair, 32, 64)
    assert chosen[-1] == tok.eos_token_id and rejected[-1] == tok.eos_token_id
    p2, c2, r2, truncated = encode_pair(tok, pair, 4, len(prompt[-4:]) + 2)
    assert truncated and p2 == prompt[-4:] and c2 == chosen[:2] and r2 == rejected[:2]
    # max_prompt_length == max_length (accepted, as in TRL): the prompt yields one token to each response
    p3, c3, r3, truncated = encode_pair(tok, pair, 6, 6)
    assert truncated and p3 == prompt[-5:] and c3 == chosen[:1] and r3 == rejected[:1]


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_layout_and_labels_cover_responses_only(tok, tmp_path, side):
    rows = [{"prompt": [USER], "chosen": [{"role": "assistant", "content": "1 2 3"}],
             "rejected": [{"role": "assistant", "content": "3 1 2 9 9"}]},
            {"prompt": "A longer plain text prompt:", "chosen": " yes", "rejected": " no"}]
    path = _write_jsonl(tmp_path / "mix.jsonl", rows)
    ds, _, _ = tokenize_preference(path, tok, _data_cfg(path), None)
    data = PreferenceData(ds)
    b = collate_pairs([0, 1], data, tok.pad_token_id, padding_side=side)
    assert b.input_ids.shape[0] == 4 and b.n_pairs == 2
    (p0, c0, r0), (p1, c1, r1) = data[0], data[1]
    order = [(p0, c0), (p1, c1), (p0, r0), (p1, r1)]  # chosen rows, then rejected rows
    for row, (prompt, response) in enumerate(order):
        real = b.attention_mask[row].bool()
        ids = b.input_ids[row][real].tolist()
        assert ids == prompt + response
        targets = b.labels[row][b.labels[row] != IGNORE_INDEX].tolist()
        assert targets == response  # no prompt token, no padding
        assert (b.labels[row][~real] == IGNORE_INDEX).all()
        assert b.position_ids[row][real].tolist() == list(range(len(ids)))
    assert b.response_lengths.tolist() == [len(c0), len(c1), len(r0), len(r1)]
    assert data.lengths == [len(p0) + max(len(c0), len(r0)), len(p1) + max(len(c1), len(r1))]
    assert torch.isnan(b.score_chosen).all()


def test_preference_config_is_validated():
    base = {"data": {"train": "x.jsonl"}}
    with pytest.raises(ConfigError, match="data.max_prompt_length"):
        load_config(data={**base, "stage": "dpo", "data": {"train": "x", "max_length": 64, "max_prompt_length": 65}})
    cfg = load_config(data={**base, "stage": "dpo", "data": {"train": "x", "max_length": 64, "max_prompt_length": 64}})
    assert cfg.data.max_prompt_length == 64
    for stage in ("rm", "dpo", "orpo"):  # pairs are packed too (padding-free micro-batches)
        assert load_config(data={**base, "stage": stage, "data": {"train": "x", "packing": True}}).data.packing
    with pytest.raises(ConfigError, match="adapter_disabled needs a model.lora"):
        load_config(data={**base, "stage": "dpo", "dpo": {"reference": "adapter_disabled"}})
    with pytest.raises(ConfigError, match="loss_type='sigmoid'"):
        load_config(data={**base, "stage": "dpo", "dpo": {"loss_type": "ipo", "label_smoothing": 0.1}})
    with pytest.raises(ConfigError, match="dpo.loss_type: got 'kto'"):
        load_config(data={**base, "stage": "dpo", "dpo": {"loss_type": "kto"}})
    with pytest.raises(ConfigError, match="data.format"):
        load_config(data={**base, "stage": "rm", "data": {"train": "x", "format": "messages"}})
    cfg = load_config("dpo_7b")
    assert (cfg.train.lr, cfg.dpo.beta, cfg.data.max_prompt_length, cfg.data.max_length) == (5e-5, 0.1, 1024, 1536)
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.target_modules) == (16, 16.0, "all-linear")
    assert cfg.train.scheduler == "cosine" and cfg.model.gradient_checkpointing


def test_parallel_tokenising_of_pairs_equals_one_process(tok, tmp_path):
    """data.num_proc=2: the same pairs, scores, counts and skipped-row messages as one process, and a bad row met
    in a worker process is reported with its file and row number."""
    rows = []
    for i in range(40):
        if i % 9 == 4:
            rows.append({"prompt": [USER], "chosen": [USER], "rejected": " x", "score_chosen": 1, "score_rejected": 0})
        else:
            rows.append({"prompt": f"Q{i}", "chosen": " a" * (1 + i % 5), "rejected": " b",
                         "score_chosen": i % 7, "score_rejected": 3})
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    kw = dict(on_error="skip", drop_ties=True, filter=["score_chosen != 6"])
    one_ds, one, _ = tokenize_preference(path, tok, _data_cfg(path, num_proc=1, **kw), None)
    two_ds, two, _ = tokenize_preference(path, tok, _data_cfg(path, num_proc=2, **kw), str(tmp_path / "cache"))
    for col in ("prompt_ids", "chosen_ids", "rejected_ids", "score_chosen", "score_rejected"):
        assert one_ds[col] == two_ds[col], col
    assert one.__dict__ == two.__dict__
    # 40 rows: i % 9 == 4 malformed (4, 13, 22, 31); of the others, score_chosen = i % 7 == 6 filtered (6, 20, 27,
    # 34; 13 is malformed first) and i % 7 == 3 ties with score_rejected 3 (3, 10, 17, 24, 38; 31 is malformed)
    assert (one.skipped, one.filtered, one.ties, one.rows) == (4, 4, 5, 40 - 4 - 4 - 5)
    assert one.skipped_examples[0].startswith("row 5: ")
    with pytest.raises(RowError, match=r"p\.jsonl: row 5: "):
        tokenize_preference(path, tok, _data_cfg(path, num_proc=2), None)
