"""The evaluation suites (eval.suites) during training: on the model being trained, at every evaluation.

The training loop does not import this package (train and eval are siblings): the entry points (ftdist/cli.py,
launch/ray_train.py) build a SuiteEval and hand it to `train()`, which calls it after its own loss-based
evaluation. Every rank calls it; each evaluates its share of at most train.eval_max_samples rows per suite
(under ZeRO-3 with as many forwards as the others, the model's forward being collective); rank 0 gathers the
rows, computes the metrics (eval/SUITE/METRIC, the same numbers `ftdist eval` reports) and returns the samples
the loop writes to output_dir/samples/step_N.jsonl.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Optional

from ftdist.config import Config, ConfigError
from ftdist.data.templates import template_label
from ftdist.eval.scorers import Judge, RewardScorer
from ftdist.eval.rows import EvalError, parse_suites
from ftdist.eval.suites import aggregate, evaluate_model


class SuiteEval:
    def __init__(self, cfg: Config):
        try:
            self.suites = parse_suites(cfg.eval.suites, "eval.suites")  # a missing file stops the run before it starts
        except EvalError as e:
            raise ConfigError(str(e)) from None
        self.cfg = cfg
        # rows as the training evaluation takes them: at most train.eval_max_samples, data.max_length tokens
        self.settings = dataclasses.replace(cfg.eval, max_samples=cfg.train.eval_max_samples,
                                            max_length=cfg.data.max_length or cfg.eval.max_length)
        counts = Counter(suite.name for suite in self.suites)
        # a suite given twice (two files) is told apart by its file's name
        self.labels = [name if counts[name] == 1 else f"{name}:{Path(path).stem}" for name, path, _ in self.suites]
        self.helpers: Optional[dict] = None

    def _load_helpers(self, device) -> dict:
        """The reward model and the judge, loaded once, whole on every rank (they are not trained)."""
        import torch

        from ftdist.models.loading import DTYPES

        e, dtype = self.cfg.eval, DTYPES[self.cfg.model.dtype]
        names = {suite.name for suite in self.suites}
        helpers = {}
        try:
            if "reward" in names:
                helpers["reward"] = RewardScorer(e.reward_model, dtype, device)
            if "judge" in names:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                from ftdist.models.loading import resolve_model_path

                path = resolve_model_path(e.judge_model)
                try:
                    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
                    tok = AutoTokenizer.from_pretrained(path)
                except (OSError, ValueError) as err:
                    raise EvalError(f"eval.judge_model {e.judge_model}: cannot be loaded: "
                                    f"{' '.join(str(err).split())[:300]}") from None
                helpers["judge"] = Judge(model, tok, self.settings, torch.device(device))
        except EvalError as err:
            raise ConfigError(str(err).replace("--reward-model", "eval.reward_model")) from None
        return helpers

    def __call__(self, engine, tokenizer) -> tuple[dict, list[dict]]:
        """(metrics eval/SUITE/METRIC on every rank, every row's sample on rank 0 and [] on the others).
        Collective: every rank calls it."""
        from ftdist.engine.dist import from_main, gather_to_main

        info = engine.info
        if self.helpers is None:
            self.helpers = self._load_helpers(engine.device)
        synced = engine.zero_stage == 3 and info.world_size > 1
        if self.settings.max_length is None:  # data.max_length: null, resolved after this hook was built
            from ftdist.models.loading import max_length_for

            n = max_length_for(None, "data.max_length", self.cfg.model.name_or_path, engine.module.config)
            self.settings = dataclasses.replace(self.settings, max_length=n)
        try:
            mine = evaluate_model(engine.module, tokenizer, self.suites, self.settings, self.helpers,
                                  (info.rank, info.world_size), synced,
                                  template_label(self.cfg.data.chat_template, tokenizer))
        except EvalError as e:
            raise ConfigError(str(e)) from None
        order = {suite.name: k for k, suite in enumerate(self.suites)}
        gathered = sorted((s for part in gather_to_main(mine) for s in part),
                          key=lambda s: (order[s["suite"]], s["row"]))
        metrics = {}
        if info.is_main:
            for label, (name, _, _) in zip(self.labels, self.suites):
                for k, v in aggregate(name, [s for s in gathered if s["suite"] == name]).items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        metrics[f"eval/{label}/{k}"] = v
        return from_main(metrics), gathered


def suite_evaluator(cfg: Config) -> Optional[SuiteEval]:
    """The hook for `train(cfg, suite_eval=...)`, or None when the recipe has no eval.suites."""
    return SuiteEval(cfg) if cfg.eval.suites and cfg.stage in ("sft", "dpo", "orpo") else None
