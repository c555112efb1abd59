"""What the evaluation suites read: the SUITE[@SPLIT]=DATA specs, each suite's rows (a file, a datasets directory
or a Hub name, in a split), and the answers' normal form. eval/suites.py runs the suites on these rows."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import NamedTuple, Optional

from ftdist.config.schema import EVAL_SUITES as SUITES
from ftdist.errors import UserError

LM_EVAL = "lm_eval:"


class EvalError(UserError):
    pass


class Suite(NamedTuple):
    name: str  # perplexity, exact_match, ..., or lm_eval:TASK
    path: str  # the data source (or the lm-eval task's name)
    split: Optional[str] = None  # the split of a dataset directory or Hub name (None: train)


def parse_suites(specs: list[str], key: str = "--suite", split: Optional[str] = None) -> list[Suite]:
    """Suites from SUITE[@SPLIT]=DATA specs; errors name `key` (--suite, or eval.suites[i] of a recipe). The split
    is written on the suite's side of `=`, so that no path can be mistaken for one; `split` (--split) is the
    split of every dataset directory or Hub name whose spec names none (a single file has one split)."""
    out = []
    for i, spec in enumerate(specs):
        where = key if key.startswith("-") else f"{key}[{i}]"
        if spec.startswith(LM_EVAL):  # lm_eval:TASK[,TASK]: one suite per task, named lm_eval:TASK
            tasks = [t.strip() for t in spec[len(LM_EVAL):].split(",") if t.strip()]
            if not tasks:
                raise EvalError(f"{where} {spec!r}: lm_eval:TASK[,TASK] names lm-evaluation-harness tasks")
            out += [Suite(LM_EVAL + t, t) for t in tasks]
            continue
        head, sep, path = spec.partition("=")
        name, at, own_split = head.partition("@")
        if not sep or name not in SUITES or not path or (at and not own_split):
            raise EvalError(f"{where} {spec!r}: SUITE=FILE (SUITE@SPLIT=DATA for a split of a dataset directory or "
                            f"Hub name) with SUITE one of {', '.join(SUITES)}")
        from ftdist.data.loading import DataError, is_hub_name, resolve_data_path

        try:
            resolved = resolve_data_path(path)  # also the bundled task: ftdist/tiny-task/eval
        except DataError as e:
            raise EvalError(f"{where} {spec!r}: {e}") from None
        if not Path(resolved).exists() and not is_hub_name(path):
            raise EvalError(f"{where} {spec!r}: {path}: no such file")
        if Path(resolved).is_file():
            if own_split:
                raise EvalError(f"{where} {spec!r}: {path} is one file, with one split; @SPLIT chooses a split of a "
                                f"dataset directory or Hub name")
            out.append(Suite(name, path))
        else:
            out.append(Suite(name, path, own_split or split))
    return out


def data_settings(path: str, split: Optional[str], **more):
    """The data section a suite's rows are read with: its source as data.train, with its split."""
    from ftdist.config import load_config

    return load_config(data={"data": {"train": path, **({"split": split} if split else {}), **more}}).data


def split_error(e: Exception, path: str, split: Optional[str]) -> EvalError:
    """A data error about a split, pointing to what chooses the split here (not data.split: eval does not read it)."""
    text = re.sub(r"[;(]?\s*set data\.split[^);]*\)?", "", str(e)).strip()
    if "split" not in text.lower():
        return EvalError(text)
    return EvalError(f"{text}; choose the split of {path} with --split SPLIT or SUITE@SPLIT={path} "
                     f"(eval.suites: SUITE@SPLIT={path}), now {split or 'train'!r}")


# -- answers and references --------------------------------------------------------------------
def normalise(text: str) -> str:
    """Case, surrounding punctuation and whitespace ignored (after the end-of-sequence texts a decoded answer
    may carry)."""
    from ftdist.data.answers import normalise_answer

    return normalise_answer(text).lower().strip(string.punctuation + " ")


def _rows(path: str, max_samples: int, split: Optional[str] = None):
    from ftdist.data.loading import DataError, load_rows

    try:
        rows = load_rows(path, data_settings(path, split) if split else None)
    except DataError as e:
        raise split_error(e, path, split) from None
    return rows.select(range(min(len(rows), max_samples))) if max_samples > 0 else rows


def qa_rows(path: str, max_samples: int, need_reference: bool = True,
            split: Optional[str] = None) -> list[tuple[object, list | str, str]]:
    """[(prompt as given, prompt messages or text, reference ('' where none is needed and none is given))]."""
    from ftdist.data.formats import RowProblem, normalize_messages

    rows = _rows(path, max_samples, split)
    ref_col = next((c for c in ("reference", "answer", "completion") if c in rows.column_names), None)
    out = []
    for i, row in enumerate(rows):
        try:
            # columns some rows lack are None on them (datasets gives every row every column)
            if row.get("prompt") is not None and ref_col and row.get(ref_col) is not None:
                value = row["prompt"]
                prompt = value if isinstance(value, str) else normalize_messages(value)
                out.append((value, prompt, str(row[ref_col])))
                continue
            if row.get("messages") is not None:
                msgs = normalize_messages(row["messages"])
                if msgs and msgs[-1]["role"] == "assistant" and len(msgs) > 1:
                    out.append((row["messages"], msgs[:-1], msgs[-1]["content"]))
                    continue
            if not need_reference and row.get("prompt") is not None:
                value = row["prompt"]
                out.append((value, value if isinstance(value, str) else normalize_messages(value), ""))
                continue
        except RowProblem as e:
            raise EvalError(f"{path}: row {i + 1}: {e}") from None
        raise EvalError(f"{path}: row {i + 1}: needs a prompt and a reference (`prompt` with `reference`/`answer`"
                        f"/`completion`, or `messages` ending with the assistant's answer); columns: "
                        f"{', '.join(rows.column_names)}")
    return out


def choice_rows(path: str, max_samples: int, split: Optional[str] = None) -> list[tuple[str, list[str], int]]:
    """[(question, options, index of the right option)]."""
    rows = _rows(path, max_samples, split)
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 1}"
        question = row.get("question")
        options = row.get("options") if row.get("options") is not None else row.get("choices")  # None: absent
        if not isinstance(question, str) or not isinstance(options, list) or len(options) < 2:
            raise EvalError(f"{where}: needs `question` (text) and `options` or `choices` (a list of 2 or more)")
        options = [str(o) for o in options]
        answer = row.get("answer")
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
            idx = answer
        elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in string.ascii_uppercase[
                :len(options)]:
            idx = string.ascii_uppercase.index(answer.strip().upper())
        elif isinstance(answer, str) and answer in options:
            idx = options.index(answer)
        else:
            raise EvalError(f"{where}: answer {answer!r} is not an option's index, letter or text")
        out.append((question, options, idx))
    return out
