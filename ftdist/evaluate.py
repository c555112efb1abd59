"""`ftdist eval`: is the new model better? Several models side by side on held-out data.

    ftdist eval base=ftdist/tiny sft=runs/sft dpo=runs/dpo --suite perplexity=heldout.jsonl \\
        --suite exact_match=qa.jsonl --suite choice=mc.jsonl --out eval/

MODEL: the forms `ftdist generate` takes (a model directory, a run's output_dir with --step or its final/, a
LoRA adapter, ftdist/tiny), optionally named as NAME=MODEL. Suites (SUITE=FILE, any data file ftdist reads):

  perplexity   exp of the mean negative log-likelihood per target token (unsmoothed): the assistant tokens of
               conversations, every token of text rows (the tokenisation of training, data.max_length --max-length)
  exact_match  greedy answer to each prompt (a `prompt` column, text or messages, or `messages` ending with the
  contains     reference answer; else a `reference`/`answer`/`completion` column) compared with the reference
               after normalisation (whitespace collapsed, case and trailing punctuation ignored): equal, or
               the reference contained in the answer
  choice       multiple choice by log-likelihood, as lm-evaluation-harness does: each option's summed log-prob
               after the question (acc), and divided by its length in characters (acc_norm); rows with
               `question`, `options` (or `choices`) and `answer` (the option's index, letter or text)
  reward       greedy answers to prompts scored by a reward model (--reward-model, an `ftdist train rm_*`
               output): mean reward, and the win rate against the first model on the same prompts
  judge        a local judge model (--judge-model, any causal LM) rates each greedy answer: the probability-
               weighted score over the rating tokens 1-10 after a rubric (G-Eval's scoring; --judge-template,
               default: ftdist/judge_templates/score.txt), and, for every model after the first, the pairwise
               preference against the first model's answer, asked in both orders to cancel position bias
               (pairwise.txt)

Output: a table (one row per model, one column per metric, with the rows counted and a 95% interval for
accuracies), OUT/eval.json, and OUT/samples.jsonl with every prompt, answer, reference and score. Launched with
several ranks (torchrun, srun), each rank evaluates every N-th row of each suite with its own copy of the model,
and rank 0 gathers the rows and computes the metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import string
import sys
import tempfile
from pathlib import Path

SUITES = ("perplexity", "exact_match", "contains", "choice", "reward", "judge")
TEMPLATES = Path(__file__).parent / "judge_templates"


class EvalError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftdist eval", description="Evaluate models side by side on held-out data.")
    p.add_argument("models", nargs="+", metavar="[NAME=]MODEL",
                   help="models to compare: a model directory, a run's output_dir, a LoRA adapter, ftdist/tiny")
    p.add_argument("--suite", action="append", required=True, metavar="SUITE=FILE",
                   help=f"a suite and its data file; repeat for several ({', '.join(SUITES)})")
    p.add_argument("--step", default=None, help="with runs' output_dirs: this checkpoint step instead of final/")
    p.add_argument("--base", default=None, help="LoRA adapters' base model (default: as their config names it)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32", "auto"), default="auto",
                   help="weights' dtype (default: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--max-samples", type=int, default=0, help="use at most this many rows per suite (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length for exact_match/contains")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per row for perplexity (longer: truncated)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward or generate call (default 8)")
    p.add_argument("--reward-model", default=None, help="reward model directory for the reward suite")
    p.add_argument("--judge-model", default=None, help="causal LM directory (or ftdist/tiny) for the judge suite")
    p.add_argument("--judge-template", default=None,
                   help="rubric for the judge's 1-10 rating, with {question} and {answer} (default: shipped)")
    p.add_argument("--pairwise-template", default=None,
                   help="pairwise rubric with {question}, {answer_a}, {answer_b} (default: shipped)")
    p.add_argument("--out", default=None, help="directory for eval.json and samples.jsonl")
    return p


def parse_suites(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or name not in SUITES:
            raise EvalError(f"--suite {spec!r}: SUITE=FILE with SUITE one of {', '.join(SUITES)}")
        from ftdist.data.loading import DataError, is_hub_name, resolve_data_path

        try:
            resolved = resolve_data_path(path)  # also the bundled task: ftdist/tiny-task/eval
        except DataError as e:
            raise EvalError(f"--suite {spec!r}: {e}") from None
        if not Path(resolved).exists() and not is_hub_name(path):
            raise EvalError(f"--suite {spec!r}: {path}: no such file")
        out.append((name, path))
    return out


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, model = spec.partition("=")
        out.append((name, model) if sep and name and "/" not in name else (spec, spec))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise EvalError(f"models named twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    return out


# -- answers and references --------------------------------------------------------------------
def normalise(text: str) -> str:
    """Case, surrounding punctuation and whitespace ignored (after the end-of-sequence texts a decoded answer
    may carry)."""
    from ftdist.data.answers import normalise_answer

    return normalise_answer(text).lower().strip(string.punctuation + " ")


def accuracy_interval(k: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of a proportion k/n (sound at 0 and n, where the normal one collapses)."""
    if n == 0:
        return float("nan"), float("nan")
    z, p = 1.959964, k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at k = 0 and k = n the bound is 0 or 1 exactly (mid and half then agree); not rounded off it
    return (0.0 if k == 0 else max(0.0, mid - half)), (1.0 if k == n else min(1.0, mid + half))


def _rows(path: str, max_samples: int):
    from ftdist.data.loading import DataError, load_rows

    try:
        rows = load_rows(path)
    except DataError as e:
        raise EvalError(str(e)) from None
    return rows.select(range(min(len(rows), max_samples))) if max_samples > 0 else rows


def qa_rows(path: str, max_samples: int, need_reference: bool = True) -> list[tuple[object, list | str, str]]:
    """[(prompt as given, prompt messages or text, reference ('' where none is needed and none is given))]."""
    from ftdist.data.formats import RowProblem, normalize_messages

    rows = _rows(path, max_samples)
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


def choice_rows(path: str, max_samples: int) -> list[tuple[str, list[str], int]]:
    """[(question, options, index of the right option)]."""
    rows = _rows(path, max_samples)
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


# -- the suites --------------------------------------------------------------------------------
def _share(n: int, share: tuple[int, int]) -> list[int]:
    """The row indices this rank evaluates: every world-th, from its rank."""
    rank, world = share
    return list(range(rank, n, world))


def suite_perplexity(model, tok, path: str, args, share=(0, 1)) -> list[dict]:
    """Per row: its target tokens and their summed negative log-likelihood (float32 sums of float32 log-probs)."""
    import torch

    from ftdist.algos.sft import IGNORE_INDEX
    from ftdist.config import load_config
    from ftdist.data.tokenize import tokenize_sft

    cfg = load_config(data={"data": {"train": path, "max_length": args.max_length,
                                     "max_samples": args.max_samples}})
    try:
        ds, _ = tokenize_sft(path, tok, cfg.data, None)
    except ValueError as e:
        raise EvalError(str(e)) from None
    device = next(model.parameters()).device
    mine, samples = _share(len(ds), share), []
    for start in range(0, len(mine), args.batch_size):
        index = mine[start:start + args.batch_size]
        batch = ds.select(index)
        T = max(len(x) for x in batch["input_ids"])
        ids = torch.full((len(index), T), tok.pad_token_id or 0, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for b, (x, y) in enumerate(zip(batch["input_ids"], batch["labels"])):
            ids[b, :len(x)], labels[b, :len(y)], mask[b, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        target = labels[:, 1:].to(device)
        keep = target != IGNORE_INDEX
        nll = -lp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
        for b, row in enumerate(index):
            samples.append({"row": row, "target_tokens": int(keep[b].sum()), "nll_sum": float(nll[b].sum())})
    return samples


def greedy_answers(model, tok, rows, path: str, args) -> list[str]:
    """The model's greedy answer to each row's prompt (text as it is, messages through the chat template)."""
    from ftdist.models.generate import generate

    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(rows), args.batch_size):
        texts = []
        for _, prompt, _ in rows[start:start + args.batch_size]:
            if isinstance(prompt, str):
                texts.append(prompt)
            elif getattr(tok, "chat_template", None) is None:
                raise EvalError(f"{path}: conversation prompts need a chat template, and the tokenizer has none")
            else:
                texts.append(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
        _, response = generate(model, tok, texts, max_new_tokens=args.max_new_tokens, device=device)
        for ids in response.tolist():
            ids = ids[:ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
            answers.append(tok.decode(ids, skip_special_tokens=True))
    return answers


def suite_answers(model, tok, path: str, args, contains: bool, share=(0, 1)) -> list[dict]:
    rows = qa_rows(path, args.max_samples)
    mine = _share(len(rows), share)
    samples = []
    for i, answer in zip(mine, greedy_answers(model, tok, [rows[i] for i in mine], path, args)):
        given, _, ref = rows[i]
        a, r = normalise(answer), normalise(ref)
        ok = (r in a) if contains else (a == r)
        samples.append({"row": i, "prompt": given, "answer": answer, "reference": ref, "score": int(ok)})
    return samples


def _option_logprobs(model, tok, question: str, options: list[str]) -> list[float]:
    """Summed log-prob of each option's tokens after the question (the context tokenised once, then each
    continuation appended, as lm-evaluation-harness splits context and continuation)."""
    import torch

    device = next(model.parameters()).device
    context = tok(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]
    seqs = [context + tok(" " + o, add_special_tokens=False)["input_ids"] for o in options]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
    out = []
    for b, s in enumerate(seqs):
        pos = torch.arange(len(context) - 1, len(s) - 1, device=device)
        out.append(float(lp[b, pos, torch.tensor(s[len(context):], device=device)].sum()))
    return out


def suite_choice(model, tok, path: str, args, share=(0, 1)) -> list[dict]:
    rows = choice_rows(path, args.max_samples)
    samples = []
    for i in _share(len(rows), share):
        question, options, right = rows[i]
        lps = _option_logprobs(model, tok, question, options)
        norm = [lp / max(len(o), 1) for lp, o in zip(lps, options)]
        pick, pick_norm = max(range(len(options)), key=lps.__getitem__), max(range(len(options)), key=norm.__getitem__)
        samples.append({"row": i, "question": question, "options": options, "answer": right, "logprobs": lps,
                        "pick": pick, "pick_norm": pick_norm, "score": int(pick == right)})
    return samples


def aggregate(suite: str, samples: list[dict]) -> dict:
    """A suite's metrics from all its rows' samples (of every rank)."""
    n = len(samples)
    if suite == "perplexity":
        n_tok = sum(s["target_tokens"] for s in samples)
        mean = sum(s["nll_sum"] for s in samples) / max(n_tok, 1)
        return {"perplexity": math.exp(min(mean, 50.0)), "nll": mean, "rows": n, "target_tokens": n_tok}
    if suite == "choice":
        acc = sum(s["pick"] == s["answer"] for s in samples)
        acc_norm = sum(s["pick_norm"] == s["answer"] for s in samples)
        return {"acc": acc / max(n, 1), "acc_ci95": list(accuracy_interval(acc, n)), "acc_norm": acc_norm / max(n, 1),
                "acc_norm_ci95": list(accuracy_interval(acc_norm, n)), "rows": n}
    if suite in ("exact_match", "contains"):
        k = sum(s["score"] for s in samples)
        return {suite: k / max(n, 1), f"{suite}_ci95": list(accuracy_interval(k, n)), "rows": n}
    scores = [s["score"] for s in samples]  # reward, judge
    return {suite: sum(scores) / max(n, 1), f"{suite}_ci95": mean_interval(scores), "rows": n}


def mean_interval(values: list[float], bounds: tuple[float, float] | None = None) -> list[float]:
    """95% normal interval of a mean (1.96 standard errors; a single value: the value itself), within `bounds`
    where the values have them (a win rate lies in [0, 1])."""
    n = len(values)
    m = sum(values) / max(n, 1)
    if n < 2:
        return [m, m]
    half = 1.959964 * math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)
    lo, hi = m - half, m + half
    return [max(lo, bounds[0]), min(hi, bounds[1])] if bounds else [lo, hi]


def _conversation_text(tok, prompt, answer: str) -> str:
    """The prompt and answer as the scoring model sees them: its chat template for conversations."""
    if isinstance(prompt, str) or getattr(tok, "chat_template", None) is None:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return text + answer
    return tok.apply_chat_template(list(prompt) + [{"role": "assistant", "content": answer}], tokenize=False)


class RewardScorer:
    """Scores of (prompt, answer) pairs under a reward model (an ftdist rm output: XForSequenceClassification),
    taken at the last real token as training takes them (models/heads.py)."""

    def __init__(self, path: str, dtype, device):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype).to(device)
            self.tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise EvalError(f"--reward-model {path}: cannot be loaded: {' '.join(str(e).split())[:300]}") from None
        self.model.eval()
        self.device = device

    def scores(self, pairs: list[tuple[object, str]], batch_size: int) -> list[float]:
        import torch

        from ftdist.algos.reward import gather_last
        from ftdist.models.heads import token_values

        out = []
        for start in range(0, len(pairs), batch_size):
            texts = [_conversation_text(self.tok, p, a) for p, a in pairs[start:start + batch_size]]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                values = token_values(self.model.__call__, self.model, inputs)
            out += gather_last(values, inputs["attention_mask"]).tolist()
        return out


def load_template(path: str | None, default: str, fields: tuple[str, ...]) -> str:
    text = Path(path or TEMPLATES / default).read_text()
    missing = [f for f in fields if "{" + f + "}" not in text]
    if missing:
        raise EvalError(f"{path or default}: the template lacks {', '.join('{' + f + '}' for f in missing)}")
    return text


class Judge:
    """A causal LM as a judge: ratings as the probability-weighted mean over the rating tokens 1..10 (G-Eval's
    scoring: no answer parsing, no sampling), and pairwise preferences from P(A) against P(B)."""

    def __init__(self, path: str, args, device):
        from ftdist.infer import load_model

        self.model, self.tok = load_model(path, dtype=args.dtype, device=device)
        self.score_template = load_template(args.judge_template, "score.txt", ("question", "answer"))
        self.pair_template = load_template(args.pairwise_template, "pairwise.txt", ("question", "answer_a", "answer_b"))
        self.device = device

    def _next_probs(self, prompt: str):
        import torch

        ids = self.tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.device)
        with torch.no_grad():
            return torch.softmax(self.model(input_ids=ids).logits[0, -1].float(), -1)

    def _first_token(self, text: str) -> int:
        return self.tok(text, add_special_tokens=False)["input_ids"][0]

    def _next_token_probs(self, prompt: str, choices: list[str]) -> list[float]:
        """The judge's probability of each choice's first token after the prompt, renormalised over the choices."""
        probs = self._next_probs(prompt)
        p = [float(probs[self._first_token(c)]) for c in choices]
        total = sum(p)
        return [x / total for x in p] if total > 0 else [1 / len(p)] * len(p)

    def rate(self, question: str, answer: str) -> float:
        """Expected rating over 1..10. Where "10" starts with the token of "1" (digits tokenised one by one), its
        probability is P("1") P("0" | "1") and the rating 1 keeps the rest of P("1")."""
        prompt = self.score_template.format(question=question, answer=answer)
        probs = self._next_probs(prompt)
        p = {k: float(probs[self._first_token(str(k))]) for k in range(1, 10)}
        ten = self.tok("10", add_special_tokens=False)["input_ids"]
        if len(ten) == 1:
            p[10] = float(probs[ten[0]])
        else:
            then_zero = float(self._next_probs(prompt + "1")[ten[1]])
            p[10], p[1] = p[1] * then_zero, p[1] * (1 - then_zero)
        total = sum(p.values())
        return sum(k * v for k, v in p.items()) / total if total > 0 else 5.5

    def prefer(self, question: str, answer: str, baseline: str) -> float:
        """P(answer better than baseline), averaged over both orders (position bias cancels)."""
        first = self._next_token_probs(self.pair_template.format(question=question, answer_a=answer,
                                                                  answer_b=baseline), ["A", "B"])[0]
        second = self._next_token_probs(self.pair_template.format(question=question, answer_a=baseline,
                                                                   answer_b=answer), ["A", "B"])[1]
        return (first + second) / 2


def _question(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def evaluate_model(model, tok, suites: list[tuple[str, str]], args, helpers: dict, share=(0, 1)) -> list[dict]:
    """This rank's share of every suite's rows, as samples (suite, row, what was asked, answered and scored)."""
    samples = []
    for name, path in suites:
        if name == "perplexity":
            smp = suite_perplexity(model, tok, path, args, share)
        elif name == "choice":
            smp = suite_choice(model, tok, path, args, share)
        elif name in ("reward", "judge"):
            rows = qa_rows(path, args.max_samples, need_reference=False)
            mine = _share(len(rows), share)
            answers = greedy_answers(model, tok, [rows[i] for i in mine], path, args)
            smp = [{"row": i, "prompt": rows[i][0], "answer": a} for i, a in zip(mine, answers)]
            if name == "reward":
                scores = helpers["reward"].scores([(rows[i][1], a) for i, a in zip(mine, answers)], args.batch_size)
            else:
                scores = [helpers["judge"].rate(_question(rows[i][1]), a) for i, a in zip(mine, answers)]
            for sm, sc in zip(smp, scores):
                sm["score"] = sc
        else:
            smp = suite_answers(model, tok, path, args, name == "contains", share)
        samples += [{"suite": name, **sm} for sm in smp]
    return samples


def compare_to_first(results: dict, samples: list[dict], helpers: dict) -> None:
    """Win rates of every model after the first against the first, prompt by prompt: by reward (a tie counts
    half), and by the judge's pairwise preference in both orders."""
    models = list(results)
    if len(models) < 2:
        return
    first = models[0]
    by = {(s["model"], s["suite"], s["row"]): s for s in samples if s["suite"] in ("reward", "judge")}
    for m in models[1:]:
        if "reward" in results[m]:
            rows = [r for (mm, su, r) in by if mm == m and su == "reward"]
            wins = [1.0 if by[(m, "reward", r)]["score"] > by[(first, "reward", r)]["score"] else
                    0.5 if by[(m, "reward", r)]["score"] == by[(first, "reward", r)]["score"] else 0.0 for r in rows]
            results[m]["reward"][f"win_rate_vs_{first}"] = sum(wins) / max(len(wins), 1)
            results[m]["reward"][f"win_rate_vs_{first}_ci95"] = mean_interval(wins, (0.0, 1.0))
        if "judge" in results[m]:
            rows = [r for (mm, su, r) in by if mm == m and su == "judge"]
            prefs = []
            for r in rows:
                s, b = by[(m, "judge", r)], by[(first, "judge", r)]
                pref = helpers["judge"].prefer(_question(s["prompt"]), s["answer"], b["answer"])
                s["preferred_over_first"] = pref
                prefs.append(pref)
            results[m]["judge"][f"pairwise_vs_{first}"] = sum(prefs) / max(len(prefs), 1)
            results[m]["judge"][f"pairwise_vs_{first}_ci95"] = mean_interval(prefs, (0.0, 1.0))


# -- the command -------------------------------------------------------------------------------
HEADLINE = {"perplexity": ("perplexity", None), "exact_match": ("exact_match", "exact_match_ci95"),
            "contains": ("contains", "contains_ci95"), "choice": ("acc", "acc_ci95"), "reward": ("reward", "reward_ci95"),
            "judge": ("judge", "judge_ci95")}


def table(results: dict[str, dict]) -> str:
    """One row per model; a column per suite's headline metric (with its row count and 95% interval), and the
    comparisons with the first model (win rate by reward, the judge's pairwise preference)."""
    first = next(iter(results.values()))
    suites = list(first)
    versus = [(s, k) for s in suites for k in sorted({k for r in results.values() for k in r[s]})
              if k.startswith(("win_rate_vs_", "pairwise_vs_")) and not k.endswith("_ci95")]
    head = (["model"] + [f"{s} (n={first[s]['rows']})" for s in suites]
            + [f"{s} {k.replace('_vs_', ' vs ').replace('_', ' ')}" for s, k in versus])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, res in results.items():
        cells = [model]
        for s in suites:
            key, ci = HEADLINE[s]
            v = res[s][key]
            cells.append(f"{v:.3f}" if ci is None else f"{v:.3f} [{res[s][ci][0]:.3f}, {res[s][ci][1]:.3f}]")
        for s, k in versus:
            ci = res[s].get(k + "_ci95")
            cells.append(f"{res[s][k]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if k in res[s] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> int:
    import torch

    from ftdist.config import ConfigError
    from ftdist.engine.dist import gather_to_main
    from ftdist.infer import InferError, inference_process, load_model

    rank, world, device = inference_process()
    try:
        suites, models = parse_suites(args.suite), parse_models(args.models)
        names = {n for n, _ in suites}
        helpers = {}
        if "reward" in names:
            if not args.reward_model:
                raise EvalError("--suite reward=...: needs --reward-model DIR (an ftdist rm run's final/)")
            helpers["reward"] = RewardScorer(args.reward_model, torch.float32 if device.type == "cpu" else
                                             torch.bfloat16, device)
        if "judge" in names:
            if not args.judge_model:
                raise EvalError("--suite judge=...: needs --judge-model (a causal LM directory)")
            helpers["judge"] = Judge(args.judge_model, args, device)
        results, all_samples = {}, []
        for name, spec in models:
            with tempfile.TemporaryDirectory(prefix="ftdist-eval-") as scratch:
                model, tok = load_model(spec, args.step if (Path(spec) / "config.yaml").exists() else None,
                                        args.base, args.dtype, device, scratch)
                mine = evaluate_model(model, tok, suites, args, helpers, (rank, world))
                del model
            order = {suite: k for k, (suite, _) in enumerate(suites)}
            gathered = sorted((s for part in gather_to_main(mine) for s in part),
                              key=lambda s: (order[s["suite"]], s["row"]))
            if rank == 0:
                results[name] = {suite: {**aggregate(suite, [s for s in gathered if s["suite"] == suite]),
                                         "file": path} for suite, path in suites}
                all_samples += [{"model": name, **s} for s in gathered]
        if rank == 0:
            compare_to_first(results, all_samples, helpers)
    except (EvalError, InferError, ConfigError) as e:
        print(f"ftdist eval: error: {e}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    print(table(results))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps({"models": dict(models), "results": results}, indent=1))
        with open(out / "samples.jsonl", "w") as f:
            for s in all_samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        print(f"eval.json and samples.jsonl written to {out}")
    return 0

