"""`ftdist eval`: is the new model better? Several models side by side on held-out data.

    ftdist eval base=ftdist/tiny sft=runs/sft dpo=runs/dpo --suite perplexity=heldout.jsonl \
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

Output: a table (one row per model, one column per metric, with the rows counted and a 95% interval for
accuracies), OUT/eval.json, and OUT/samples.jsonl with every prompt, answer, reference and score.
"""

from __future__ import annotations

import argparse
import json
import math
import string
import sys
import tempfile
from pathlib import Path

SUITES = ("perplexity", "exact_match", "contains", "choice")


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
    p.add_argument("--out", default=None, help="directory for eval.json and samples.jsonl")
    return p


def parse_suites(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or name not in SUITES:
            raise EvalError(f"--suite {spec!r}: SUITE=FILE with SUITE one of {', '.join(SUITES)}")
        if not Path(path).exists():
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


def qa_rows(path: str, max_samples: int) -> list[tuple[object, list | str, str]]:
    """[(prompt as given, prompt messages or text, reference)]."""
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
def suite_perplexity(model, tok, path: str, args) -> tuple[dict, list[dict]]:
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
    nll_sum, n_tok, samples = 0.0, 0, []
    for start in range(0, len(ds), args.batch_size):
        batch = ds[start:start + args.batch_size]
        T = max(len(x) for x in batch["input_ids"])
        ids = torch.full((len(batch["input_ids"]), T), tok.pad_token_id or 0, dtype=torch.long)
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
        for b in range(ids.size(0)):
            k = int(keep[b].sum())
            row_nll = float(nll[b].sum())
            nll_sum, n_tok = nll_sum + row_nll, n_tok + k
            samples.append({"row": start + b, "target_tokens": k, "nll": row_nll / max(k, 1)})
    mean = nll_sum / max(n_tok, 1)
    return {"perplexity": math.exp(min(mean, 50.0)), "nll": mean, "rows": len(ds), "target_tokens": n_tok}, samples


def suite_answers(model, tok, path: str, args, contains: bool) -> tuple[dict, list[dict]]:
    from ftdist.models.generate import generate

    rows = qa_rows(path, args.max_samples)
    device = next(model.parameters()).device
    correct, samples = 0, []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start:start + args.batch_size]
        texts = []
        for _, prompt, _ in chunk:
            if isinstance(prompt, str):
                texts.append(prompt)
            elif getattr(tok, "chat_template", None) is None:
                raise EvalError(f"{path}: conversation prompts need a chat template, and the tokenizer has none")
            else:
                texts.append(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
        _, response = generate(model, tok, texts, max_new_tokens=args.max_new_tokens, device=device)
        for (given, _, ref), ids in zip(chunk, response.tolist()):
            ids = ids[:ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
            answer = tok.decode(ids, skip_special_tokens=True)
            a, r = normalise(answer), normalise(ref)
            ok = (r in a) if contains else (a == r)
            correct += ok
            samples.append({"row": len(samples), "prompt": given, "answer": answer, "reference": ref,
                            "score": int(ok)})
    name = "contains" if contains else "exact_match"
    lo, hi = accuracy_interval(correct, len(rows))
    return {name: correct / max(len(rows), 1), f"{name}_ci95": [lo, hi], "rows": len(rows)}, samples


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


def suite_choice(model, tok, path: str, args) -> tuple[dict, list[dict]]:
    rows = choice_rows(path, args.max_samples)
    acc = acc_norm = 0
    samples = []
    for i, (question, options, right) in enumerate(rows):
        lps = _option_logprobs(model, tok, question, options)
        norm = [lp / max(len(o), 1) for lp, o in zip(lps, options)]
        pick, pick_norm = max(range(len(options)), key=lps.__getitem__), max(range(len(options)), key=norm.__getitem__)
        acc += pick == right
        acc_norm += pick_norm == right
        samples.append({"row": i, "question": question, "options": options, "answer": right, "logprobs": lps,
                        "pick": pick, "pick_norm": pick_norm, "score": int(pick == right)})
    n = len(rows)
    return {"acc": acc / max(n, 1), "acc_ci95": list(accuracy_interval(acc, n)), "acc_norm": acc_norm / max(n, 1),
            "acc_norm_ci95": list(accuracy_interval(acc_norm, n)), "rows": n}, samples


def evaluate_model(model, tok, suites: list[tuple[str, str]], args) -> tuple[dict, list[dict]]:
    results, samples = {}, []
    for name, path in suites:
        if name == "perplexity":
            res, smp = suite_perplexity(model, tok, path, args)
        elif name == "choice":
            res, smp = suite_choice(model, tok, path, args)
        else:
            res, smp = suite_answers(model, tok, path, args, contains=name == "contains")
        results[name] = {**res, "file": path}
        samples += [{"suite": name, **s} for s in smp]
    return results, samples


# -- the command -------------------------------------------------------------------------------
HEADLINE = {"perplexity": ("perplexity", None), "exact_match": ("exact_match", "exact_match_ci95"),
            "contains": ("contains", "contains_ci95"), "choice": ("acc", "acc_ci95")}


def table(results: dict[str, dict]) -> str:
    suites = list(next(iter(results.values())))
    head = ["model"] + [f"{s} (n={next(iter(results.values()))[s]['rows']})" for s in suites]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, res in results.items():
        cells = [model]
        for s in suites:
            key, ci = HEADLINE[s]
            v = res[s][key]
            cells.append(f"{v:.3f}" if ci is None else f"{v:.3f} [{res[s][ci][0]:.3f}, {res[s][ci][1]:.3f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> int:
    from ftdist.config import ConfigError
    from ftdist.infer import InferError, load_model
    from ftdist.run.logs import setup_logging

    setup_logging(True)
    try:
        suites, models = parse_suites(args.suite), parse_models(args.models)
        results, all_samples = {}, []
        for name, spec in models:
            with tempfile.TemporaryDirectory(prefix="ftdist-eval-") as scratch:
                model, tok = load_model(spec, args.step if (Path(spec) / "config.yaml").exists() else None,
                                        args.base, args.dtype, None, scratch)
                results[name], samples = evaluate_model(model, tok, suites, args)
                all_samples += [{"model": name, **s} for s in samples]
                del model
    except (EvalError, InferError, ConfigError) as e:
        print(f"ftdist eval: error: {e}", file=sys.stderr)
        return 2
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

