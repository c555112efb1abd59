"""Scalar heads for reward models: loading, per-token values, and a final/ that transformers can load.

Both head types give a value at every position; the reward is the value at the
last real token, found from the attention mask (algos.reward.gather_last), so
left and right padding score alike and a pad token that equals EOS does not
move the scored position. transformers' own sequence-classification pooling
looks for the last token that is not `config.pad_token_id` instead; the two
agree whenever the pad token never occurs inside a text, which the export
checks and warns about.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

log = logging.getLogger("ftdist")

HEADS = ("sequence_classification", "causal_lm")


def _seq_cls_class(config):
    """The XForSequenceClassification class of a causal-LM config, or None when transformers has none."""
    import transformers

    arch = (config.architectures or [""])[0]
    name = arch.replace("ForCausalLM", "ForSequenceClassification")
    return getattr(transformers, name, None) if name.endswith("ForSequenceClassification") else None


def load_reward_model(model_cfg, head: str, pad_token_id: int, seed: int = 0):
    """A model whose forward gives one value per token: a new scalar head on the model's body.

    'sequence_classification' loads AutoModelForSequenceClassification(num_labels=1):
    the checkpoint's body plus a new `score` layer (or a trained one, when the
    checkpoint already is a reward model). 'causal_lm' loads the causal LM and
    replaces its output layer with a (1, hidden) one, so the LM's own forward
    returns (B, T, 1) values; it works for any causal LM, not only those with a
    sequence-classification class.
    """
    from transformers import AutoModelForSequenceClassification

    from ftdist.models.loading import load_causal_lm

    if head == "sequence_classification":
        model = load_causal_lm(model_cfg, auto_class=AutoModelForSequenceClassification, num_labels=1)
    elif head == "causal_lm":
        model = load_causal_lm(model_cfg)
        hidden = model.config.get_text_config().hidden_size
        score = torch.nn.Linear(hidden, 1, bias=False, dtype=model.get_output_embeddings().weight.dtype)
        # a dedicated generator: every rank (and every ZeRO stage) starts from the same head
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            score.weight.copy_(torch.randn(score.weight.shape, generator=gen) / (hidden + 1) ** 0.5)
        model.set_output_embeddings(score)
        model.config.tie_word_embeddings = False  # the head no longer shares the embedding's shape
        model.config.ftdist_reward_head = "causal_lm"
    else:
        raise ValueError(f"rm.head={head!r} is not one of {HEADS}")
    model.config.pad_token_id = pad_token_id
    return model


def score_module(model):
    """The module whose output holds the per-token values (peft's wrapper around it when there is one)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "score":
            return module
    return None


@contextlib.contextmanager
def captured_output(module):
    """Collect `module`'s forward outputs while the block runs."""
    outputs = []
    handle = module.register_forward_hook(lambda m, args, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


def token_values(forward, module, inputs: dict) -> torch.Tensor:
    """(B, T) float32 values at every position of a reward model (either head type).

    `forward` is the engine's forward; `module` the model it wraps. For a
    sequence-classification model the head's output is taken before
    transformers pools it by pad id.
    """
    score = score_module(module)
    if score is None:  # causal_lm head: the LM's logits are the values
        return forward(**inputs, use_cache=False).logits[..., 0].float()
    with captured_output(score) as outs:
        forward(**inputs, use_cache=False)
    return outs[-1][..., 0].float()


def pad_appears_in_text(tokenizer) -> bool:
    return tokenizer.pad_token_id is not None and tokenizer.pad_token_id in (
        tokenizer.eos_token_id, tokenizer.bos_token_id)


def export_reward_model(state_dict: dict, module, out_dir: str, tokenizer) -> None:
    """Write final/ as XForSequenceClassification (safetensors) with the tokenizer; rank 0 only.

    A 'causal_lm' head is renamed into the sequence-classification layout
    (`lm_head.weight` (1, H) -> `score.weight`), so both head types load with
    AutoModelForSequenceClassification and score text the way training did.
    """
    import copy

    os.makedirs(out_dir, exist_ok=True)
    config = copy.deepcopy(module.config)
    sd = {k: v.contiguous().cpu() for k, v in state_dict.items()}
    if getattr(config, "ftdist_reward_head", None) == "causal_lm":
        cls = _seq_cls_class(config)
        if cls is None:
            log.warning("final/: transformers has no sequence-classification class for %s; written as the causal "
                        "LM with a one-output head (the reward is logits[..., 0] at the last token)",
                        config.architectures)
            module.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
        else:
            head_key = next(k for k in sd if k.endswith("lm_head.weight"))
            sd["score.weight"] = sd.pop(head_key)
            del config.ftdist_reward_head
            config.architectures = [cls.__name__]
            config.num_labels = 1
            with torch.device("meta"):
                shell = cls(config)
            shell.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
    else:
        module.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if pad_appears_in_text(tokenizer):
        log.warning("final/: the tokenizer pads with %r, which also ends texts; transformers' sequence-"
                    "classification pooling then scores the token before it, not the last real token as training "
                    "did. Give the tokenizer a dedicated pad token for exact scores.", tokenizer.pad_token)
