"""The embedded tiny default model: `model.name_or_path: ftdist/tiny`.

Development and CI machines reach no model hub, so the default model is built
here from code: a byte-level BPE tokenizer (vocab 512, every digit its own
token) trained on bundled text, and a randomly initialised 4-layer Llama of
~0.9M parameters. It is written once into the cache directory and from then on
loads like any Hugging Face checkpoint:

    AutoTokenizer.from_pretrained(resolve_model_path("ftdist/tiny"))
    AutoModelForCausalLM.from_pretrained(resolve_model_path("ftdist/tiny"))

The output is deterministic (fixed seeds, fixed text), so every rank and every
machine that builds it gets the same files. torch, tokenizers and transformers
are imported inside the functions: `import ftdist` stays cheap.
"""

from __future__ import annotations

import os
import random
from typing import Any

from ftdist.run.cache import materialize

TINY_NAME = "ftdist/tiny"
TINY_ALIASES = (TINY_NAME, "tiny")
# bump when the files change (this module, or the task text the tokenizer is
# trained on in ftdist/data/tiny_task.py), so old caches are not reused
TINY_VERSION = "tiny-v2"

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"  # ends every chat turn; generation stops on it
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)  # ids 0..5
VOCAB_SIZE = 512

# every message is `<|role|>\n{content}<|end|>\n`. the assistant's content and
# its <|end|> sit inside {% generation %} so return_assistant_tokens_mask marks
# exactly the tokens the model must learn to produce, eos included; the "\n"
# after it is not trained (generation stops at <|end|>).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

_SEED_TEXT = """\
A model learns from examples, one small step at a time.
The training loop reads a batch, computes the loss and updates the weights.
Each rank holds a shard of the data and the gradients are averaged across ranks.
When the loss stops falling, the learning rate is usually too high or too low.
Please answer the question with a short and clear sentence.
You are a helpful assistant who follows the instructions carefully.
The quick brown fox jumps over the lazy dog near the river bank.
We write checkpoints often, so a job that stops can resume where it left off.
Numbers like 3, 14 and 2025 are split into single digits by the tokenizer.
Sort the list, count the items, and report the result in order.
The reward is high when the answer is correct and low when it is wrong.
Good data matters more than a large model for a narrow task.
She asked what time the meeting starts, and he said it starts at 9 in the morning.
The weather today is cold, but the sky is clear and the wind is calm.
Read the text, find the key idea, and explain it in your own words.
"""


def is_tiny_name(name: str | os.PathLike | None) -> bool:
    return name is not None and str(name) in TINY_ALIASES


def resolve_model_path(name: str | os.PathLike) -> str:
    """Map `ftdist/tiny` (or `tiny`) to its materialised directory; other names pass through."""
    if not is_tiny_name(name):
        return str(name)
    return materialize(TINY_VERSION, _build_tiny_dir)


def _tokenizer_corpus() -> list[str]:
    """Deterministic training text: task prompts and answers plus generic English."""
    from ftdist.data.tiny_task import make_example

    rng = random.Random(1234)
    lines = [line for line in _SEED_TEXT.splitlines() if line]
    words = " ".join(lines).replace(",", "").replace(".", "").split()
    corpus = list(lines)
    # a few hundred shuffled sentences so merges cover common English pieces
    for _ in range(400):
        n = rng.randint(5, 14)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        corpus.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ","]))
    for _ in range(300):
        example = make_example(rng)
        for message in example["messages"]:
            corpus.append(f"{message['role']}\n{message['content']}")
    return corpus


def build_tiny_tokenizer():
    """Train the tiny tokenizer in memory and wrap it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # digits are split off one by one before byte-level BPE sees the text, so no
    # merge can ever contain a digit: "2025" is always 2, 0, 2, 5.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS),
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_config(**overrides: Any):
    """The LlamaConfig of the tiny model; keyword overrides replace any field.

    Embeddings are untied (like Llama 3 8B) so the checkpoint has a separate
    lm_head and nothing special is needed when ZeRO-3 shards it.
    """
    from transformers import LlamaConfig

    special = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    fields = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        pad_token_id=special[PAD_TOKEN],
        bos_token_id=special[BOS_TOKEN],
        eos_token_id=special[EOS_TOKEN],
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def _build_tiny_dir(out_dir: str) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    # the trainer fills the vocab exactly; check so config and tokenizer never drift
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    for token, expected_id in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
        if tokenizer.convert_tokens_to_ids(token) != expected_id:
            raise RuntimeError(f"tiny tokenizer: {token} is not id {expected_id}")

    config = tiny_config()
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = LlamaForCausalLM(config).to(torch.float32)
    finally:
        torch.random.set_rng_state(rng_state)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    # written by hand: under an initialised process group save_pretrained writes only on rank 0,
    # and any rank may be the one whose build wins the rename
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config.architectures = [type(model).__name__]  # what model.save_pretrained would record
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        if not os.path.exists(os.path.join(out_dir, name)):
            raise RuntimeError(f"tiny model build did not write {name}")
