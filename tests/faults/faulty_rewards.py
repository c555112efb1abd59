"""Reward functions that fail on purpose, for tests/faults/test_ppo_faults.py (they run inside the reward actor)."""

import time

_calls = {"n": 0}


def hangs_on_second_call(prompts, responses):
    _calls["n"] += 1
    if _calls["n"] == 2:
        time.sleep(3600)
    return [0.5] * len(responses)


def raises_on_second_call(prompts, responses):
    _calls["n"] += 1
    if _calls["n"] == 2:
        raise ValueError("the grader's service answered 503")
    return [0.5] * len(responses)
