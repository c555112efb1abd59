"""`ftdist eval`: is the new model better? Several models side by side on held-out data.

    ftdist eval base=ftdist/tiny sft=runs/sft dpo=runs/dpo --suite perplexity=heldout.jsonl \\
        --suite exact_match=qa.jsonl --suite choice=mc.jsonl --out eval/

MODEL: the forms `ftdist generate` takes (a model directory, a run's output_dir with --step or its final/, a
LoRA adapter, ftdist/tiny), optionally named as NAME=MODEL. Suites (SUITE[@SPLIT]=DATA, any data ftdist reads):

  perplexity   exp of the mean negative log-likelihood per target token (unsmoothed): the assistant tokens of
               conversations, every token of text rows (the tokenisation of training; --max-length tokens,
               by default the model's maximum)
  exact_match  greedy answer to each prompt (a `prompt` column, text or messages, or `messages` ending with the
  contains     reference answer; else a `reference`/`answer`/`completion` column) compared with the reference
               after normalisation (whitespace collapsed, case and trailing punctuation ignored): equal, or
               the reference contained in the answer
  choice       multiple choice by log-likelihood, as lm-evaluation-harness does: each option's summed log-prob
               after the question (acc), and divided by its length in characters (acc_norm); rows with
               `question`, `options` (or `choices`) and `answer` (the option's index, letter or text)
  reward       greedy answers to prompts scored by a reward model (--reward-model, an `ftdist train rm_*`
               output): mean reward, and the win rate against the first model on the same prompts
  lm_eval:TASK  lm-evaluation-harness tasks (TASK[,TASK]; with the lm-eval package installed) through its
               Python API on the loaded model, on rank 0: its registry's tasks, or task YAMLs in --lm-eval-include
               DIR (tasks on local data files run offline); the mean of each per-sample metric (acc, ...)
  judge        a local judge model (--judge-model, any causal LM) rates each greedy answer: the probability-
               weighted score over the rating tokens 1-10 after a rubric (G-Eval's scoring; --judge-template,
               default: ftdist/eval/judge_templates/score.txt), and, for every model after the first, the pairwise
               preference against the first model's answer, asked in both orders to cancel position bias
               (pairwise.txt)

Output: a table (one row per model, one column per metric, with the rows counted and a 95% interval for
accuracies), OUT/eval.json, and OUT/samples.jsonl with every prompt, answer, reference and score. Launched with
several ranks (torchrun, srun), each rank evaluates every N-th row of each suite with its own copy of the model,
and rank 0 gathers the rows and computes the metrics.

The same evaluation runs from a recipe with `stage: eval` (its eval.* keys are these options), through
`ftdist train RECIPE` and so through sbatch and Ray submissions as they are; its results go to output_dir. With
deepspeed.zero_stage: 3 in that recipe and several ranks, each model is loaded ZeRO-3-sharded over the ranks (for
models too large for one device) and every rank runs as many forwards as the others.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ftdist.eval.scorers import Judge, RewardScorer
from ftdist.eval.rows import SUITES, EvalError, parse_suites
from ftdist.eval.suites import aggregate, compare_to_first, evaluate_model, table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftdist eval", description="Evaluate models side by side on held-out data.")
    p.add_argument("models", nargs="+", metavar="[NAME=]MODEL",
                   help="models to compare: a model directory, a run's output_dir, a LoRA adapter, ftdist/tiny")
    p.add_argument("--suite", action="append", required=True, metavar="SUITE[@SPLIT]=DATA",
                   help=f"a suite and its data (a file, a datasets directory or a Hub name; @SPLIT: that split of a "
                   f"directory or Hub name), or lm_eval:TASK[,TASK]; repeat for several ({', '.join(SUITES)})")
    p.add_argument("--split", default=None,
                   help="the split of every dataset directory or Hub name whose --suite names none (default: train)")
    p.add_argument("--chat-template", default=None, metavar="TEMPLATE",
                   help="one chat template for every model (as data.chat_template: a built-in name, a Jinja file or "
                        "text), so that models are compared on the same prompts; default: each model's own")
    p.add_argument("--step", default=None, help="with runs' output_dirs: this checkpoint step instead of final/")
    p.add_argument("--base", default=None, help="LoRA adapters' base model (default: as their config names it)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32", "auto"), default="auto",
                   help="weights' dtype (default: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--max-samples", type=int, default=0, help="use at most this many rows per suite (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length for exact_match/contains")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per row for perplexity and lm_eval (longer: truncated; default: each model's maximum, "
                        "max_position_embeddings; above it is refused)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward or generate call (default 8)")
    p.add_argument("--reward-model", default=None, help="reward model directory for the reward suite")
    p.add_argument("--judge-model", default=None, help="causal LM directory (or ftdist/tiny) for the judge suite")
    p.add_argument("--judge-template", default=None,
                   help="rubric for the judge's 1-10 rating, with {question} and {answer} (default: shipped)")
    p.add_argument("--pairwise-template", default=None,
                   help="pairwise rubric with {question}, {answer_a}, {answer_b} (default: shipped)")
    p.add_argument("--lm-eval-include", default=None, metavar="DIR",
                   help="directory of lm-evaluation-harness task YAMLs for --suite lm_eval:TASK (local tasks)")
    p.add_argument("--out", default=None, help="directory for eval.json and samples.jsonl")
    return p


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, model = spec.partition("=")
        out.append((name, model) if sep and name and "/" not in name else (spec, spec))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise EvalError(f"models named twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    return out


def _settings(args):
    """The command's options as the recipe's eval section (one set of names for both)."""
    from ftdist.config import EvalConfig

    return EvalConfig(suites=list(args.suite), models=list(args.models), step=args.step, base=args.base,
                      dtype=args.dtype, reward_model=args.reward_model, judge_model=args.judge_model,
                      judge_template=args.judge_template, pairwise_template=args.pairwise_template,
                      lm_eval_include=args.lm_eval_include, max_samples=args.max_samples,
                      max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                      batch_size=args.batch_size)


def _sharded_model(spec: str, settings, cfg, scratch: str):
    """(ZeRO-3 engine, its module, tokenizer): the model partitioned over the ranks as it loads (no rank holds it
    whole), its forward gathering each layer's weights in turn (collective: every rank runs the same forwards)."""
    import dataclasses

    import torch
    from transformers import AutoTokenizer

    from ftdist.engine.dist import init_distributed
    from ftdist.engine.engine import FrozenEngine
    from ftdist.infer import InferError, resolve_model_dir
    from ftdist.models.loading import load_causal_lm, side_model_config

    path = resolve_model_dir(spec, settings.step if (Path(spec) / "config.yaml").exists() else None, scratch)
    if (Path(path) / "adapter_config.json").exists():
        raise InferError(f"{spec}: a LoRA adapter; ZeRO-3 evaluation loads whole models: merge it first "
                         f"(ftdist merge), or evaluate it with deepspeed.zero_stage below 3")
    dtype = settings.dtype if settings.dtype != "auto" else ("bf16" if torch.cuda.is_available() else "fp32")
    model_cfg = side_model_config(cfg.model, path, quantized=False, dtype=dtype)  # whole, frozen, in the eval's dtype
    run_cfg = dataclasses.replace(cfg, model=model_cfg)
    frozen = FrozenEngine(lambda: load_causal_lm(model_cfg), run_cfg, init_distributed(cfg.dist.backend,
                                                                                      cfg.dist.timeout_s), 1)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    import logging

    import torch.distributed as dist

    logging.getLogger("ftdist").info("%s: ZeRO-3-sharded over %d ranks", spec, dist.get_world_size())
    return frozen, frozen.module, tok


def evaluate_models(settings, key: str = "--suite", option=lambda name: "--" + name.replace("_", "-"), cfg=None,
                    split=None, chat_template=None):
    """Every model of settings.models on every suite; (models, results, samples) on rank 0, ([], {}, []) on the
    others. `key` and `option` name the settings in errors (command-line options, or the recipe's eval.* keys).
    With a recipe `cfg` whose deepspeed.zero_stage is 3 and several ranks, the models are ZeRO-3-sharded.
    `split`: of dataset directories and Hub names a suite names none for; `chat_template`: one template (a
    built-in name, Jinja file or text) every model's tokenizer uses instead of its own."""
    import torch

    from ftdist.data.templates import template_label
    from ftdist.engine.dist import gather_to_main
    from ftdist.infer import inference_process, load_model

    template_key = option("chat_template") if cfg is None else "data.chat_template"
    template = _template(chat_template, template_key)
    suites, models = parse_suites(settings.suites, key, split), parse_models(settings.models)
    rank, world, device = inference_process()
    names = {suite.name for suite in suites}
    helpers = {}
    if "reward" in names:
        if not settings.reward_model:
            raise EvalError(f"suite reward: needs {option('reward_model')} (an ftdist rm run's final/)")
        helpers["reward"] = RewardScorer(settings.reward_model, torch.float32 if device.type == "cpu" else
                                         torch.bfloat16, device)
    if "judge" in names:
        if not settings.judge_model:
            raise EvalError(f"suite judge: needs {option('judge_model')} (a causal LM directory)")
        helpers["judge"] = Judge(*load_model(settings.judge_model, dtype=settings.dtype, device=device), settings,
                                 device)
    sharded = cfg is not None and cfg.deepspeed.zero_stage == 3 and world > 1
    results, all_samples = {}, []
    for name, spec in models:
        with tempfile.TemporaryDirectory(prefix="ftdist-eval-") as scratch:
            if sharded:
                frozen, model, tok = _sharded_model(spec, settings, cfg, scratch)
            else:
                model, tok = load_model(spec, settings.step if (Path(spec) / "config.yaml").exists() else None,
                                        settings.base, settings.dtype, device, scratch)
            label = None  # errors name the tokenizer's own template
            if template is not None:
                tok.chat_template = template
                label = template_label(chat_template, tok, template_key)
            fitted = _fit_max_length(settings, model, spec, option("max_length"), cfg is not None)
            mine = evaluate_model(model, tok, suites, fitted, helpers, (rank, world), synced=sharded,
                                  template=label)
            del model
            if sharded:
                frozen.close()
        order = {suite.name: k for k, suite in enumerate(suites)}
        gathered = sorted((s for part in gather_to_main(mine) for s in part),
                          key=lambda s: (order[s["suite"]], s["row"]))
        if rank == 0:
            results[name] = {suite: {**aggregate(suite, [s for s in gathered if s["suite"] == suite]), "file": path,
                                     **({"split": part} if part else {})} for suite, path, part in suites}
            all_samples += [{"model": name, **s} for s in gathered]
    if rank == 0:
        compare_to_first(results, all_samples, helpers)
    return (models if rank == 0 else []), results, all_samples


def _fit_max_length(settings, model, spec: str, key: str, recipe: bool):
    """settings with this model's max_length: as given (refused above the model's positions, naming both), or
    where left out the model's maximum."""
    import dataclasses

    from ftdist.models.loading import max_length_for

    n = max_length_for(settings.max_length, key, spec, model.config, "null" if recipe else "leave it out")
    return dataclasses.replace(settings, max_length=n)


def _template(spec, key: str):
    """The Jinja text of a chat template given by name, file or text; None for each model's own."""
    if spec is None:
        return None
    from ftdist.config import ConfigError
    from ftdist.data.templates import resolve_chat_template

    try:
        return resolve_chat_template(spec)
    except ConfigError as e:
        raise EvalError(str(e).replace("data.chat_template", key, 1)) from None


def write_results(out: Path, models, results: dict, samples: list[dict]) -> None:
    """eval.json and samples.jsonl, each written whole then renamed (never half a file)."""
    from ftdist.run.outputs import write_whole

    write_whole(out / "eval.json", json.dumps({"models": dict(models), "results": results}, indent=1))
    write_whole(out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))


def run(args) -> int:
    from ftdist.run.outputs import check_writable

    if args.out:  # before the work: a location found unwritable after it would lose the results
        check_writable(args.out, "--out", directory=True)
        args.log_dir = args.out  # an unexpected failure's traceback goes to --out/error.log where it exists
    models, results, samples = evaluate_models(_settings(args), split=args.split, chat_template=args.chat_template)
    if not models:  # not rank 0
        return 0
    print(table(results))
    if args.out:
        write_results(Path(args.out), models, results, samples)
        print(f"eval.json and samples.jsonl written to {args.out}")
    return 0


def run_recipe(cfg) -> dict:
    """A `stage: eval` recipe: eval.models on eval.suites; eval.json, samples.jsonl and config.yaml in output_dir.
    Returns {model: {suite: metrics}} (empty on ranks other than 0)."""
    from ftdist.run.outputs import check_writable, dump_config

    check_writable(cfg.output_dir, "output_dir", directory=True)
    models, results, samples = evaluate_models(cfg.eval, "eval.suites", lambda name: f"eval.{name}", cfg,
                                               chat_template=cfg.data.chat_template)
    if models:
        out = Path(cfg.output_dir)
        print(table(results))
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
        write_results(out, models, results, samples)
        print(f"eval.json and samples.jsonl written to {out}")
    return results
