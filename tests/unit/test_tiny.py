"""The embedded tiny model (ftdist/models/tiny.py) and the digit-sorting task."""

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys

import pytest

from ftdist.data import tiny_task
from ftdist.data.tiny_task import (
    answer_from_prompt,
    bundled_task_dir,
    exact_match,
    make_example,
    score_answer,
    sort_reward,
    write_task_dataset,
)
from ftdist.models import tiny
from ftdist.models.tiny import TINY_NAME, resolve_model_path
from ftdist.run.cache import materialize

pytestmark = pytest.mark.unit

# embed 512*128 + lm_head 512*128 + 4 layers * (q 128*128 + k,v 2*128*64
# + o 128*128 + mlp 3*128*384 + 2 norms 128) + final norm 128
EXPECTED_PARAMS = 2 * 512 * 128 + 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 384 + 2 * 128) + 128

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Sort the digits: 5 2 9 1"},
    {"role": "assistant", "content": "1 2 5 9"},
    {"role": "user", "content": "Sort the digits: 7 0 7"},
    {"role": "assistant", "content": "0 7 7"},
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftdist_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTDIST_CACHE", str(root))
        yield str(root)


@pytest.fixture(scope="module")
def tiny_dir(cache):
    return resolve_model_path(TINY_NAME)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --------------------------------------------------------------------- model dir


def test_resolve_names(tiny_dir, cache):
    assert tiny_dir == os.path.join(cache, "tiny-v2")
    assert resolve_model_path("tiny") == tiny_dir
    assert resolve_model_path("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert resolve_model_path("/some/local/dir") == "/some/local/dir"
    assert sorted(os.listdir(tiny_dir)) == [
        "chat_template.jinja", "config.json", "generation_config.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]
    # no temp dirs left behind
    assert sorted(os.listdir(cache)) == ["tiny-v2"]


def test_model_loads_offline(tiny_dir, tok):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS == 918_656
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (len(tok), 128, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (4, 2, False)
    assert next(model.parameters()).dtype == torch.float32
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    gen = model.generation_config
    assert (gen.eos_token_id, gen.pad_token_id) == (2, 0)
    logits = model(torch.tensor([[4, 10, 11]])).logits
    assert logits.shape == (1, 3, 512)


def test_tiny_config_overrides():
    cfg = tiny.tiny_config(num_hidden_layers=2, hidden_size=64)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (2, 64, 384, 512)


def test_concurrent_materialize_is_safe_and_deterministic(tiny_dir, tmp_path, monkeypatch):
    # two processes race to build the same cache dir; the result is one complete
    # dir, byte-identical to an independent build (fixed seeds)
    monkeypatch.setenv("FTDIST_CACHE", str(tmp_path))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=resolve_model_path, args=(TINY_NAME,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(os.listdir(tmp_path)) == ["tiny-v2"]
    built = tmp_path / "tiny-v2"
    for name in os.listdir(tiny_dir):
        assert _sha(built / name) == _sha(os.path.join(tiny_dir, name)), name
    # AutoModelForSequenceClassification and friends find the class from it (reward-model export)
    assert json.loads((built / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_materialize_loser_uses_winner(tmp_path, monkeypatch):
    monkeypatch.setenv("FTDIST_CACHE", str(tmp_path))
    final = tmp_path / "thing"

    def build(tmp):
        # another process finishes first, while we are still building
        final.mkdir()
        (final / "who").write_text("winner")
        with open(os.path.join(tmp, "who"), "w") as f:
            f.write("loser")

    assert materialize("thing", build) == str(final)
    assert (final / "who").read_text() == "winner"
    assert sorted(os.listdir(tmp_path)) == ["thing"]
    # present now: build is not called again
    assert materialize("thing", lambda tmp: pytest.fail("rebuilt")) == str(final)


def test_import_is_light():
    code = (
        "import sys, ftdist, ftdist.models.tiny, ftdist.data.tiny_task\n"
        "heavy = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "Sort the digits: 5 2 9 1",
    "  leading and trailing spaces  \n\ttabs",
    "unicode: héllo wörld — 日本語 😀",
    "",
])
def test_tokenizer_round_trip(tok, text):
    assert tok.decode(tok(text)["input_ids"]) == text


def test_no_special_tokens_added(tok):
    assert tok("1 2")["input_ids"] == tok("1 2", add_special_tokens=False)["input_ids"]


def test_digits_are_single_tokens(tok):
    digit_ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    for d in range(10):
        assert tok(str(d))["input_ids"] == [digit_ids[d]]
    ids = tok("Sort the digits: 9081726354 and x2025y")["input_ids"]
    digits_seen = [tok.decode([i]) for i in ids if i in digit_ids]
    assert "".join(digits_seen) == "90817263542025"
    # and no other vocabulary entry contains a digit
    for i in range(len(tok)):
        piece = tok.decode([i])
        if any(c.isdigit() for c in piece):
            assert i in digit_ids, (i, piece)


def test_vocab_and_special_tokens(tok):
    assert len(tok) == 512
    assert tok.convert_ids_to_tokens(list(range(6))) == [
        "<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>",
    ]
    assert tok("<|user|>")["input_ids"] == [4]


def test_tokenizer_build_is_deterministic(tok):
    fresh = tiny.build_tiny_tokenizer()
    assert fresh.get_vocab() == tok.get_vocab()
    assert fresh.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_chat_template_renders(tok):
    text = tok.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert text == (
        "<|system|>\nYou are a helpful assistant.<|end|>\n"
        "<|user|>\nSort the digits: 5 2 9 1<|end|>\n"
        "<|assistant|>\n1 2 5 9<|end|>\n"
    )
    prompt = tok.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nSort the digits: 5 2 9 1<|end|>\n<|assistant|>\n"


@pytest.mark.parametrize("start", [0, 1])  # with and without the system message
def test_chat_template_prefix_stable(tok, start):
    messages = CONVERSATION[start:]
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:k], add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(messages[: k + 1], return_dict=True)["input_ids"]
        assert full[: len(prompt)] == prompt
        # and the rendered text tokenises to the same ids
        assert tok(tok.apply_chat_template(messages[: k + 1], tokenize=False))["input_ids"] == full


def test_assistant_mask_ends_with_eos(tok):
    out = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    assert current == []  # the trailing "\n" after <|end|> is not trained
    assert [tok.decode(s) for s in spans] == ["1 2 5 9<|end|>", "0 7 7<|end|>"]
    assert all(s[-1] == tok.eos_token_id for s in spans)


# --------------------------------------------------------------------- task data


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _user(row):
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def test_task_dataset_deterministic_and_disjoint(tmp_path):
    a = write_task_dataset(str(tmp_path / "a"), n_train=300, n_eval=100, seed=3)
    b = write_task_dataset(str(tmp_path / "b"), n_train=300, n_eval=100, seed=3)
    assert sorted(a) == ["eval", "eval_pref", "eval_prompts", "prompts", "train", "train_pref"]
    for name in a:
        assert _sha(a[name]) == _sha(b[name]), name
    c = write_task_dataset(str(tmp_path / "c"), n_train=300, n_eval=100, seed=4)
    assert _sha(a["train"]) != _sha(c["train"])

    train, evals = _read(a["train"]), _read(a["eval"])
    assert (len(train), len(evals)) == (300, 100)
    train_keys, eval_keys = {_user(r) for r in train}, {_user(r) for r in evals}
    assert len(train_keys) == 300 and len(eval_keys) == 100
    assert not train_keys & eval_keys
    for row in train + evals:
        roles = [m["role"] for m in row["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        digits = _user(row).removeprefix("Sort the digits: ").split()
        assert 3 <= len(digits) <= 6
        assert row["answer"] == " ".join(sorted(digits)) == row["messages"][-1]["content"]
    n_system = sum(r["messages"][0]["role"] == "system" for r in train)
    assert 20 < n_system < 120  # ~20%


def test_task_preference_and_prompt_files(tmp_path):
    paths = write_task_dataset(str(tmp_path), n_train=200, n_eval=50)
    train = _read(paths["train"])
    pref = _read(paths["train_pref"])
    prompts = _read(paths["prompts"])
    assert len(pref) == len(prompts) == 200 and len(_read(paths["eval_pref"])) == 50
    for row, p, q in zip(train, pref, prompts):
        assert p["prompt"] == q["prompt"] == row["messages"][:-1]
        assert p["chosen"] == [{"role": "assistant", "content": row["answer"]}]
        rejected = p["rejected"][0]["content"]
        assert p["rejected"][0]["role"] == "assistant"
        assert len(rejected.split()) == len(row["answer"].split())
        assert not exact_match(rejected, row["answer"])
        assert q["answer"] == row["answer"]
        assert score_answer(_user(row), rejected) < 0.5


def test_bundled_task_dir(cache):
    path = bundled_task_dir()
    assert path == os.path.join(cache, "tiny-task-v1")
    assert len(_read(os.path.join(path, "train.jsonl"))) == 2000
    assert len(_read(os.path.join(path, "eval.jsonl"))) == 200
    assert bundled_task_dir() == path


def test_make_example_uses_rng():
    import random

    assert make_example(random.Random(7)) == make_example(random.Random(7))
    assert tiny_task.MIN_DIGITS == 3 and tiny_task.MAX_DIGITS == 6


# --------------------------------------------------------------------- scoring


def test_answer_from_prompt(tok):
    assert answer_from_prompt("Sort the digits: 5 2 9 1") == "1 2 5 9"
    assert answer_from_prompt("9 0 9") == "0 9 9"
    assert answer_from_prompt("Sort the digits: 5291") == "1 2 5 9"
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "Sort in ascending order."},
         {"role": "user", "content": "Sort the digits: 3 1 2"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert answer_from_prompt(rendered) == "1 2 3"
    with pytest.raises(ValueError, match="no digits"):
        answer_from_prompt("Sort the digits:")


def test_exact_match():
    assert exact_match("1 2 5 9", "1 2 5 9")
    assert exact_match("  1 2 5 9<|end|>\n", "1 2 5 9")
    assert exact_match("1  2 5\t9 <|end|><|pad|>", "1 2 5 9")
    assert not exact_match("1 2 5", "1 2 5 9")
    assert not exact_match("1259", "1 2 5 9")
    assert not exact_match("1 2 5 9 done", "1 2 5 9")


def test_score_answer_by_hand():
    prompt = "Sort the digits: 5 2 9 1"
    assert score_answer(prompt, "1 2 5 9") == 1.0
    assert score_answer(prompt, "1 2 5 9<|end|>") == 1.0
    assert score_answer(prompt, "1 2 9 5") == 0.5 * 2 / 4
    assert score_answer(prompt, "1 2 5") == 0.5 * 3 / 4
    assert score_answer(prompt, "1 2 5 9 9") == 0.5 * 4 / 5
    assert score_answer(prompt, "9 5 2 1") == 0.0
    assert score_answer(prompt, "no idea") == 0.0
    assert score_answer(prompt, "1259") == 0.5  # right digits, wrong format
    assert score_answer("5 2 9 1", "1 2 5 9") == 1.0


def test_sort_reward():
    prompts = ["<|user|>\nSort the digits: 3 3 1<|end|>\n<|assistant|>\n", "Sort the digits: 8 0 4 2"]
    assert sort_reward(prompts, ["1 3 3<|end|>", "0 2 8 4"]) == [1.0, 0.25]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        sort_reward(prompts, ["1 3 3"])
