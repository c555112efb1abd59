"""Checks of a recipe against the model it names, before anything loads (models/preflight.py)."""

import pytest

from ftdist.config import ConfigError, load_config

pytestmark = pytest.mark.unit


def test_max_length_above_the_models_positions_is_refused_naming_both(tmp_path):
    """A GPT-2-shaped model with 64 positions: data.max_length=1536 would index past its position table (an
    IndexError inside the forward on the first long row); refused before anything loads, for SFT and preference
    data alike; data.max_length=null reads the 64."""
    from ftdist.models.loading import resolve_max_length

    model = _gpt2_dir(tmp_path)
    for recipe in ("sft_tiny", "dpo_tiny"):
        cfg = load_config(recipe, [f"model.name_or_path={model}", "data.max_length=1536", "data.max_prompt_length=32"])
        with pytest.raises(ConfigError, match=rf"data.max_length=1536 is above the 64 positions {model} takes"):
            resolve_max_length(cfg)
    fits = load_config("dpo_tiny", [f"model.name_or_path={model}", "data.max_length=64", "data.max_prompt_length=32"])
    assert resolve_max_length(fits) is fits
    assert resolve_max_length(load_config("sft_tiny", [f"model.name_or_path={model}", "data.max_length=null"])
                              ).data.max_length == 64


def _gpt2_dir(tmp_path):
    """A GPT-2-shaped model directory (64 positions, the tiny tokenizer without a chat template): a base model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ftdist.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = None
    out = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out

