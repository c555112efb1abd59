"""The evaluation suites, row by row: perplexity, exact match / contains, multiple choice by log-likelihood,
reward-model scores and a local judge model's ratings; their metrics with 95% intervals, and the table.

Used by `ftdist eval` (ftdist/evaluate.py), by `stage: eval` recipes and, through the hook of
eval/training.py, by the training loop at every evaluation. Each suite function evaluates one rank's share of
the rows (every world-th); with `synced` (a ZeRO-3 model whose forward is collective) every rank runs the same
number of forwards and generate calls, padding its share with a repeated row whose result is dropped.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

from ftdist.eval.rows import LM_EVAL, EvalError, Suite, choice_rows, data_settings, normalise, qa_rows, split_error


def accuracy_interval(k: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of a proportion k/n (sound at 0 and n, where the normal one collapses)."""
    if n == 0:
        return float("nan"), float("nan")
    z, p = 1.959964, k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at k = 0 and k = n the bound is 0 or 1 exactly (mid and half then agree); not rounded off it
    return (0.0 if k == 0 else max(0.0, mid - half)), (1.0 if k == n else min(1.0, mid + half))


# -- the suites --------------------------------------------------------------------------------
def _share(n: int, share: tuple[int, int], synced: bool = False) -> tuple[list[int], int]:
    """(the row indices this rank evaluates, how many of them count): every world-th row, from its rank. With
    `synced`, every rank gets ceil(n / world) indices, its share padded with a repeated row whose result is
    dropped, so that every rank runs the same forwards (collective under ZeRO-3)."""
    rank, world = share
    mine = list(range(rank, n, world))
    real = len(mine)
    if synced and n:
        mine += [mine[0] if mine else 0] * (-(-n // world) - real)
    return mine, real


def suite_perplexity(model, tok, path: str, args, share=(0, 1), synced: bool = False,
                     split: Optional[str] = None, template: Optional[str] = None) -> list[dict]:
    """Per row: its target tokens and their summed negative log-likelihood (float32 sums of float32 log-probs)."""
    import torch

    from ftdist.algos.sft import IGNORE_INDEX
    from ftdist.data.tokenize import tokenize_sft

    data = data_settings(path, split, max_length=args.max_length, max_samples=args.max_samples)
    try:
        ds, _ = tokenize_sft(path, tok, data, None, template=template)
    except ValueError as e:
        raise split_error(e, path, split) from None
    device = next(model.parameters()).device
    (mine, real), samples = _share(len(ds), share, synced), []
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
            if start + b < real:
                samples.append({"row": row, "target_tokens": int(keep[b].sum()), "nll_sum": float(nll[b].sum())})
    return samples


def prompt_texts(tok, rows, path: str, template: Optional[str] = None) -> list[str]:
    """Every row's prompt as the model continues it: text as it is, messages through the chat template (a failing
    template is one line naming it, `template` or the tokenizer's own, and the row). Every rank renders every
    row, so that a row the template refuses stops all ranks alike (none is left waiting in a collective)."""
    from ftdist.data.formats import RowProblem
    from ftdist.data.templates import render_chat

    texts = []
    for i, (_, prompt, _) in enumerate(rows):
        if isinstance(prompt, str):
            texts.append(prompt)
            continue
        if getattr(tok, "chat_template", None) is None:
            raise EvalError(f"{path}: conversation prompts need a chat template, and the tokenizer has none")
        try:
            texts.append(render_chat(tok, prompt, template, tokenize=False, add_generation_prompt=True))
        except RowProblem as e:
            raise EvalError(f"{path}: row {i + 1}: {e}") from None
    return texts


def greedy_answers(model, tok, texts: list[str], args, synced: bool = False) -> list[str]:
    """The model's greedy answer to each prompt text (prompt_texts); `synced`: every rank calls this with as many
    texts (ZeRO-3 generation, transformers' synced_gpus)."""
    from ftdist.models.generate import generate

    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(texts), args.batch_size):
        _, response = generate(model, tok, texts[start:start + args.batch_size], max_new_tokens=args.max_new_tokens,
                               device=device, synced_gpus=synced)
        for ids in response.tolist():
            ids = ids[:ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
            answers.append(tok.decode(ids, skip_special_tokens=True))
    return answers


def suite_answers(model, tok, path: str, args, contains: bool, share=(0, 1), synced: bool = False,
                  split: Optional[str] = None, template: Optional[str] = None) -> list[dict]:
    rows = qa_rows(path, args.max_samples, split=split)
    texts = prompt_texts(tok, rows, path, template)
    mine, real = _share(len(rows), share, synced)
    samples = []
    answers = greedy_answers(model, tok, [texts[i] for i in mine], args, synced)
    for i, answer in zip(mine[:real], answers):
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


def suite_choice(model, tok, path: str, args, share=(0, 1), synced: bool = False,
                 split: Optional[str] = None) -> list[dict]:
    rows = choice_rows(path, args.max_samples, split)
    samples = []
    mine, real = _share(len(rows), share, synced)
    for k, i in enumerate(mine):
        question, options, right = rows[i]
        lps = _option_logprobs(model, tok, question, options)
        if k >= real:
            continue
        norm = [lp / max(len(o), 1) for lp, o in zip(lps, options)]
        pick, pick_norm = max(range(len(options)), key=lps.__getitem__), max(range(len(options)), key=norm.__getitem__)
        samples.append({"row": i, "question": question, "options": options, "answer": right, "logprobs": lps,
                        "pick": pick, "pick_norm": pick_norm, "score": int(pick == right)})
    return samples


@functools.lru_cache(maxsize=4)
def _task_manager(include):
    """lm-eval's task index (its registry, and the YAMLs under `include`): built once per process (seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include) if include else TaskManager()


def suite_lm_eval(model, tok, task: str, args, share=(0, 1), synced: bool = False) -> list[dict]:
    """An lm-evaluation-harness task through its Python API (HFLM around the loaded model), on rank 0 alone: the
    other ranks return no rows. Tasks come from lm-eval's registry or from YAML files in args.lm_eval_include
    (local data files work offline). Each sample: the document, its target, the model's filtered responses and
    the task's per-sample metrics."""
    if synced:
        raise EvalError(f"suite lm_eval:{task}: lm-evaluation-harness needs the whole model in one process, not "
                        f"ZeRO-3 shards (evaluate a ZeRO-3 run's checkpoints with `ftdist eval` instead)")
    if share[0] != 0:
        return []
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise EvalError(f"suite lm_eval:{task}: needs the lm-eval package (pip install lm-eval)") from None
    import logging

    device = next(model.parameters()).device
    include = getattr(args, "lm_eval_include", None)
    manager = _task_manager(include)
    if task not in manager.all_tasks:
        raise EvalError(f"suite lm_eval:{task}: no such lm-evaluation-harness task"
                        + (f" (searched its registry and {include})" if include else " (local task YAMLs: "
                           "--lm-eval-include DIR, eval.lm_eval_include)"))
    was_training = model.training
    level = logging.getLogger("lm_eval").level
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task chatter; errors still show
    try:
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device=str(device),
                  max_length=args.max_length)
        res = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=args.max_samples or None,
                              log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    except Exception as e:  # a task's data or template problem: one line naming the task
        raise EvalError(f"suite lm_eval:{task}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    finally:
        logging.getLogger("lm_eval").setLevel(level)
        model.train(was_training)
    samples = []
    for smp in res["samples"].get(task, []):
        metrics = list(smp.get("metrics", []))
        samples.append({"row": int(smp["doc_id"]), "doc": smp["doc"], "target": smp["target"],
                        "response": smp["filtered_resps"], "metrics": metrics,
                        **{m: smp[m] for m in metrics if m in smp}})
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
    if suite.startswith(LM_EVAL):  # the per-sample metrics lm-evaluation-harness averages (acc, exact_match, ...)
        names = list(dict.fromkeys(k for smp in samples for k in smp.get("metrics", [])))
        out = {}
        for k in names:
            values = [float(smp[k]) for smp in samples if isinstance(smp.get(k), (int, float))]
            if not values:
                continue
            out[k] = sum(values) / len(values)
            # a proportion (acc, exact_match: every value 0 or 1) gets the Wilson interval, as the choice suite;
            # the normal one can leave [0, 1] on few rows
            binary = all(v in (0.0, 1.0) for v in values)
            out[k + "_ci95"] = (list(accuracy_interval(int(sum(values)), len(values))) if binary
                                else mean_interval(values))
        return {**out, "rows": n}
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


def _question(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def evaluate_model(model, tok, suites: list[Suite], args, helpers: dict, share=(0, 1),
                   synced: bool = False, template: Optional[str] = None) -> list[dict]:
    """This rank's share of every suite's rows, as samples (suite, row, what was asked, answered and scored).
    template: how errors name the chat template `tok` carries (templates.template_label; None: the tokenizer's)."""
    samples = []
    for name, path, split in suites:
        if name == "perplexity":
            smp = suite_perplexity(model, tok, path, args, share, synced, split, template)
        elif name == "choice":
            smp = suite_choice(model, tok, path, args, share, synced, split)
        elif name in ("reward", "judge"):
            rows = qa_rows(path, args.max_samples, need_reference=False, split=split)
            texts = prompt_texts(tok, rows, path, template)
            mine, real = _share(len(rows), share, synced)
            answers = greedy_answers(model, tok, [texts[i] for i in mine], args, synced)[:real]
            mine = mine[:real]
            smp = [{"row": i, "prompt": rows[i][0], "answer": a} for i, a in zip(mine, answers)]
            if name == "reward":
                scores = helpers["reward"].scores([(rows[i][1], a) for i, a in zip(mine, answers)], args.batch_size)
            else:
                scores = [helpers["judge"].rate(_question(rows[i][1]), a) for i, a in zip(mine, answers)]
            for sm, sc in zip(smp, scores):
                sm["score"] = sc
        elif name.startswith(LM_EVAL):
            smp = suite_lm_eval(model, tok, path, args, share, synced)
        else:
            smp = suite_answers(model, tok, path, args, name == "contains", share, synced, split, template)
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
            key, ci = HEADLINE.get(s) or next(((k, k + "_ci95") for k in res[s] if k + "_ci95" in res[s]),
                                              ("rows", None))
            v = res[s][key]
            cells.append(f"{v:.3f}" if ci is None else f"{v:.3f} [{res[s][ci][0]:.3f}, {res[s][ci][1]:.3f}]")
        for s, k in versus:
            ci = res[s].get(k + "_ci95")
            cells.append(f"{res[s][k]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if k in res[s] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
