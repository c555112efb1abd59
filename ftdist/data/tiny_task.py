"""The bundled learnable task: sort a few digits, scored by exact match.

    user:      Sort the digits: 5 2 9 1
    assistant: 1 2 5 9

The tiny model (ftdist/models/tiny.py) learns it in a couple of CPU minutes, so
demos and recipe tests can check that training actually worked (accuracy goes
from 0 to near 1) rather than only that the loss went down. The same task
gives preference pairs for RM/DPO (chosen = sorted, rejected = corrupted) and
prompts plus a rule-based reward (`sort_reward`) for PPO.

Files written by `write_task_dataset` / `bundled_task_dir`:
    train.jsonl, eval.jsonl            {"messages": [...], "answer": "1 2 5 9"}
    train_pref.jsonl, eval_pref.jsonl  {"prompt": [...], "chosen": [...], "rejected": [...]}
                                       (TRL conversational form: message lists)
    prompts.jsonl, eval_prompts.jsonl  {"prompt": [...], "answer": "1 2 5 9"}
Eval rows never share a digit sequence with train rows.
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Sequence

from ftdist.data.answers import exact_match, normalise_answer

TASK_VERSION = "tiny-task-v1"
PROMPT_PREFIX = "Sort the digits:"
MIN_DIGITS, MAX_DIGITS = 3, 6
SYSTEM_FRACTION = 0.2  # share of rows with a system message
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Answer with the sorted digits only.",
    "Sort in ascending order.",
)
_PROMPT_RE = re.compile(re.escape(PROMPT_PREFIX) + r"\s*([0-9](?:[ \t]*[0-9])*)")


def _digits_text(digits: Sequence[int]) -> str:
    return " ".join(str(d) for d in digits)


def make_example(rng: random.Random) -> dict:
    """One chat row: {"messages": [(system), user, assistant], "answer": str}."""
    n = rng.randint(MIN_DIGITS, MAX_DIGITS)
    digits = [rng.randrange(10) for _ in range(n)]  # repeats happen on purpose
    answer = _digits_text(sorted(digits))
    messages = []
    if rng.random() < SYSTEM_FRACTION:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": f"{PROMPT_PREFIX} {_digits_text(digits)}"})
    messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, "answer": answer}


def _corrupt(answer: str, rng: random.Random) -> str:
    """A wrong answer close to the right one: two digits swapped, or one digit changed."""
    digits = answer.split()
    if len(set(digits)) > 1 and rng.random() < 0.5:
        while True:
            i, j = rng.sample(range(len(digits)), 2)
            if digits[i] != digits[j]:
                break
        digits[i], digits[j] = digits[j], digits[i]
    else:
        i = rng.randrange(len(digits))
        digits[i] = str((int(digits[i]) + rng.randint(1, 9)) % 10)
    return " ".join(digits)


def _key(example: dict) -> str:
    return next(m["content"] for m in example["messages"] if m["role"] == "user")


def _sample_split(rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
    rows, seen = [], set(exclude)
    while len(rows) < n:
        example = make_example(rng)
        key = _key(example)
        if key in seen:  # keep eval held out and rows unique
            continue
        seen.add(key)
        rows.append(example)
    return rows


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_task_dataset(out_dir: str, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> dict:
    """Write every file of the task into out_dir; returns {name: path}. Deterministic in seed."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    eval_rows = _sample_split(rng, n_eval, exclude=set())
    train_rows = _sample_split(rng, n_train, exclude={_key(r) for r in eval_rows})

    def pref(rows: list[dict]) -> list[dict]:
        out = []
        for row in rows:
            prompt = row["messages"][:-1]
            out.append({
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": row["answer"]}],
                "rejected": [{"role": "assistant", "content": _corrupt(row["answer"], rng)}],
            })
        return out

    def prompts(rows: list[dict]) -> list[dict]:
        return [{"prompt": row["messages"][:-1], "answer": row["answer"]} for row in rows]

    files = {
        "train": train_rows,
        "eval": eval_rows,
        "train_pref": pref(train_rows),
        "eval_pref": pref(eval_rows),
        "prompts": prompts(train_rows),
        "eval_prompts": prompts(eval_rows),
    }
    paths = {}
    for name, rows in files.items():
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        _write_jsonl(paths[name], rows)
    return paths


def bundled_task_dir() -> str:
    """`<cache>/tiny-task-v1` with the default split (2000/200, seed 0), written on first use."""
    from ftdist.run.cache import materialize

    return materialize(TASK_VERSION, lambda tmp: write_task_dataset(tmp))


def answer_from_prompt(prompt_text: str) -> str:
    """The expected answer for a prompt: its digits sorted, space separated.

    Accepts the raw user text, a fully rendered chat prompt, or just the digits
    ("5 2 9 1"); with several "Sort the digits:" the last one counts.
    """
    matches = _PROMPT_RE.findall(prompt_text)
    digits = re.findall(r"[0-9]", matches[-1] if matches else prompt_text)
    if not digits:
        raise ValueError(f"no digits to sort in prompt {prompt_text!r}")
    return " ".join(sorted(digits))


def score_answer(prompt_or_digits: str, response: str) -> float:
    """Rule-based reward in [0, 1].

    1.0 for an exact match of the sorted digits; otherwise
    0.5 * (digits in the right position) / max(len(expected), len(response digits)),
    so a response of the wrong length loses credit and partial credit never
    reaches an exact answer's. "1 2 9 5" for "1 2 5 9" scores 0.25.
    """
    answer = answer_from_prompt(prompt_or_digits)
    if exact_match(response, answer):
        return 1.0
    expected = answer.split()
    got = re.findall(r"[0-9]", normalise_answer(response))
    if not got:
        return 0.0
    correct = sum(g == e for g, e in zip(got, expected))
    return 0.5 * correct / max(len(expected), len(got))


def sort_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """PPO reward function: `reward_fn(prompts, responses) -> list[float]`."""
    if len(prompts) != len(responses):
        raise ValueError(f"sort_reward: {len(prompts)} prompts but {len(responses)} responses")
    return [score_answer(p, r) for p, r in zip(prompts, responses)]
