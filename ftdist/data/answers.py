"""Comparing a generated answer with a reference: the one normaliser that evaluation, PPO evaluation and
the bundled task's reward share."""

from __future__ import annotations

# text a decoded response may end with that is not part of the answer (when special tokens are kept)
EOS_TEXTS = ("<|end|>", "<|eos|>", "</s>", "<|pad|>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>")


def normalise_answer(text: str) -> str:
    """Whitespace stripped and collapsed, any number of trailing end-of-sequence texts removed."""
    text = text.strip()
    stripped = True
    while stripped:
        stripped = False
        for eos in EOS_TEXTS:
            if text.endswith(eos):
                text = text[: -len(eos)].rstrip()
                stripped = True
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    """Equal after normalise_answer on both sides."""
    return normalise_answer(prediction) == normalise_answer(answer)
