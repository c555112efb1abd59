"""Reward model (ZeRO-2) and DPO (ZeRO-2 and ZeRO-3) with 2 gloo ranks, full and LoRA (fp32, CPU).

Checks: DPO starts at loss ln 2 with zero implicit rewards (the reference is
wired to the starting weights in every setup); the step-1 metrics equal a plain
one-process computation over the same pairs (loop normalisation by pairs across
ranks); ZeRO-2 and ZeRO-3 give DPO the same metrics and weights; evaluation improves;
the reward model's final/ loads with transformers and scores the eval pairs
exactly as the engine did.

The runs use SGD: ZeRO-2 and ZeRO-3 group the fp32 gradient sums differently, and
SGD keeps those rounding differences rounding-sized where Adam would blow them up
to ~lr in entries whose gradient is near zero (tests/helpers.py).
"""

import json
import math

import pytest
import torch

from tests.helpers import GRAD_RTOL, load_weights, max_abs, max_abs_diff, read_metrics, run_ftdist, sgd_tolerance, write_recipe

pytestmark = pytest.mark.dist

STEPS = 3
N_EVAL = 16
RECIPE = dict(
    model={"name_or_path": "ftdist/tiny", "dtype": "fp32"},
    data={"train": "ftdist/tiny-task/train_pref", "format": "preference", "max_length": 64, "max_prompt_length": 48},
    # SGD (momentum 0.9) at 0.1 lowers the eval loss of every stage and variant within the 3 steps
    train={"global_batch_size": 8, "micro_batch_size": 2, "max_steps": STEPS, "lr": 0.1, "optimizer": "sgd",
           "scheduler": "cosine", "warmup_ratio": 0.0, "log_every": 1, "progress_bar": False},
    checkpoint={"every_steps": 0, "keep_last": 1, "resume": "never"},
    logging={"tensorboard": False},
)
LORA = ["model.lora.r=8", "model.lora.alpha=16", "model.lora.dropout=0.0"]
# ZeRO-3 for DPO only: its reference runs beside the partitioned policy. A reward model under ZeRO-3 is the same
# step function (its ZeRO-stage invariance: tests/dist/test_sft_equivalence.py) over a pure loss, and its final/
# is gathered from the partitions by the code every stage uses (exact: tests/dist/test_export.py)
CASES = {f"{stage}_{variant}_zero{z}": (stage, variant, z) for stage in ("rm", "dpo") for variant in ("full", "lora")
         for z in ((2, 3) if stage == "dpo" else (2,))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from ftdist.data.loading import resolve_data_path

    base = tmp_path_factory.mktemp("pref")
    lines = open(resolve_data_path("ftdist/tiny-task/eval_pref")).read().splitlines()[:N_EVAL]
    (base / "eval.jsonl").write_text("\n".join(lines) + "\n")
    recipe = write_recipe(base / "recipe.yaml", **RECIPE)
    out = {}
    for name, (stage, variant, zero) in CASES.items():
        run_dir = base / name
        overrides = [f"stage={stage}", f"output_dir={run_dir}", f"data.cache_dir={base / 'cache'}",
                     f"data.eval={base / 'eval.jsonl'}", f"deepspeed.zero_stage={zero}",
                     *(LORA if variant == "lora" else [])]
        run_ftdist(2, str(recipe), overrides, timeout=400)
        out[name] = run_dir
    out["eval_file"] = base / "eval.jsonl"
    out["cache"] = base / "cache"
    return out


def _steps(run_dir):
    return [m for m in read_metrics(run_dir) if "loss" in m]


def _evals(run_dir):
    return [m for m in read_metrics(run_dir) if "eval/loss" in m]


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("dpo")])
def test_dpo_starts_at_ln2_with_zero_rewards(runs, name):
    first, before = _steps(runs[name])[0], _evals(runs[name])[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(0.0, abs=1e-6) and before[f"eval/{key}"] == pytest.approx(0.0, abs=1e-6)
    assert first["logps/chosen"] < -1


def test_dpo_step1_metrics_equal_one_process(runs):
    """The logged step-1 means over both ranks and micro-batches = a plain mean over the step's 8 pairs."""
    from ftdist.algos.sft import sequence_logprobs
    from ftdist.config import load_config
    from ftdist.data.batching import plan_epoch
    from ftdist.data.preference import PreferenceData, collate_pairs, tokenize_preference
    from ftdist.models.loading import load_causal_lm, load_tokenizer

    cfg = load_config(data={**RECIPE, "stage": "dpo"})
    tok = load_tokenizer(cfg.model)
    ds, _, key = tokenize_preference(cfg.data.train, tok, cfg.data, str(runs["cache"]))
    data = PreferenceData(ds, key)
    pairs = []
    for rank in range(2):
        plan = plan_epoch(data.lengths, seed=cfg.seed, epoch=0, micro_batch_size=2, grad_accum=2, world_size=2,
                          rank=rank, packing=False, capacity=64)
        pairs += [row[0] for micro in plan.steps[0] for row in micro]
    assert len(set(pairs)) == 8
    model = load_causal_lm(cfg.model).eval()
    batch = collate_pairs(pairs, data, tok.pad_token_id)
    with torch.no_grad():
        chosen, rejected = sequence_logprobs(model(**{k: getattr(batch, k) for k in (
            "input_ids", "attention_mask", "position_ids")}).logits, batch.labels).chunk(2)
    # the same sums of token log-probs, grouped differently (batch shapes, ranks): equal to GRAD_RTOL
    for z in (2, 3):
        first = _steps(runs[f"dpo_full_zero{z}"])[0]
        assert first["logps/chosen"] == pytest.approx(float(chosen.mean()), rel=GRAD_RTOL)
        assert first["logps/rejected"] == pytest.approx(float(rejected.mean()), rel=GRAD_RTOL)


@pytest.mark.parametrize("stage_variant", ["dpo_full", "dpo_lora"])
def test_zero2_equals_zero3(runs, stage_variant):
    z2, z3 = runs[f"{stage_variant}_zero2"], runs[f"{stage_variant}_zero3"]
    s2, s3 = _steps(z2), _steps(z3)
    assert [m["step"] for m in s2] == [m["step"] for m in s3] == list(range(1, STEPS + 1))
    # the metrics come from weights and gradients that differ by rounding only: equal to GRAD_RTOL of their
    # size (abs: for values that are ~0, such as the rewards at step 1)
    for a, b in zip(s2 + _evals(z2), s3 + _evals(z3)):
        for key in a:
            if key.startswith(("loss", "accuracy", "margin", "rewards/", "logps/", "eval/")):
                assert a[key] == pytest.approx(b[key], rel=GRAD_RTOL, abs=1e-6), (key, a["step"])
    if stage_variant.endswith("full"):
        from ftdist.models.tiny import resolve_model_path

        w2, w3, init = load_weights(z2 / "final"), load_weights(z3 / "final"), load_weights(resolve_model_path("ftdist/tiny"))
        update = max(float((w2[k] - init[k]).abs().max()) for k in init if k in w2)  # the new reward head aside
    else:
        w2, w3 = _adapter(z2), _adapter(z3)
        update = max(float(v.abs().max()) for k, v in w2.items() if "lora_B" in k)  # lora_B starts at zero
    tol = sgd_tolerance(update=update, weight=max_abs(w2), steps=STEPS)
    assert update > 100 * tol  # the runs trained far more than the tolerance
    assert max_abs_diff(w2, w3) < tol


def _adapter(run_dir):
    from safetensors.torch import load_file

    assert (run_dir / "final" / "adapter_config.json").exists()
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


@pytest.mark.parametrize("name", list(CASES))
def test_evaluation_improves(runs, name):
    before, after = _evals(runs[name])[0], _evals(runs[name])[-1]
    assert after["eval/loss"] < before["eval/loss"]
    key = "eval/accuracy" if name.startswith("rm") else "eval/rewards/accuracies"
    assert after[key] >= 0.5


def _hf_reward_model(name, run_dir):
    from transformers import AutoModelForSequenceClassification

    final = run_dir / "final"
    if "lora" not in name:
        return AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    from peft import PeftModel

    from ftdist.models.tiny import resolve_model_path

    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("ftdist/tiny"), num_labels=1,
                                                              dtype=torch.float32)
    base.config.pad_token_id = 0
    return PeftModel.from_pretrained(base, final).eval()


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("rm")])
def test_reward_model_final_scores_text_like_the_engine(runs, name):
    """final/ through transformers, one text at a time, reproduces the engine's last eval on the eval pairs."""
    from transformers import AutoTokenizer

    run_dir = runs[name]
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    model = _hf_reward_model(name, run_dir)

    def score(messages):
        text = tok.apply_chat_template(messages, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            return float(model(**ids).logits[0, 0])

    chosen, rejected = [], []
    for line in runs["eval_file"].read_text().splitlines():
        row = json.loads(line)
        chosen.append(score(row["prompt"] + row["chosen"]))
        rejected.append(score(row["prompt"] + row["rejected"]))
    last = _evals(run_dir)[-1]
    # one text at a time against padded batches: the same scores up to rounding, GRAD_RTOL of the largest score
    # (a mean of scores of both signs can be near zero, its rounding is not)
    tol = GRAD_RTOL * max(abs(x) for x in chosen + rejected)
    assert sum(chosen) / N_EVAL == pytest.approx(last["eval/rewards/chosen"], abs=tol)
    assert sum(rejected) / N_EVAL == pytest.approx(last["eval/rewards/rejected"], abs=tol)
    assert sum(c > r for c, r in zip(chosen, rejected)) / N_EVAL == pytest.approx(last["eval/accuracy"])


QLORA = [*LORA, "model.quantization.load_in_4bit=true", "model.quantization.compute_dtype=fp32"]


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_qlora_one_process(runs, tmp_path, stage):
    """4-bit NF4 base + LoRA on CPU; the DPO reference is the quantised base with the adapter disabled."""
    recipe = write_recipe(tmp_path / "recipe.yaml", **RECIPE)
    run_dir = tmp_path / stage
    run_ftdist(1, str(recipe), [f"stage={stage}", f"output_dir={run_dir}", f"data.cache_dir={runs['cache']}",
                                f"data.eval={runs['eval_file']}", "train.micro_batch_size=4", *QLORA], timeout=400)
    steps, evals = _steps(run_dir), _evals(run_dir)
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    if stage == "dpo":
        assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert steps[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    adapter = _adapter(run_dir)
    assert any("lora_B" in k for k in adapter)
    if stage == "rm":
        assert any(k.endswith("score.weight") for k in adapter)  # the new head is saved in full
