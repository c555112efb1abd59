"""RM, DPO and ORPO Tasks on one process: reference modes, reward pooling, export, margins, ORPO."""

import dataclasses
import json

import pytest
import torch

from ftdist.data.loading import DataError
from tests.unit.test_preference_trl_e2e import TEXT_ROWS, LocalEngine, _chat_rows, _ftdist, _task, models  # noqa: F401

pytestmark = pytest.mark.unit
# the same fp32 forward on other batch layouts: rounding of ~1e-6 relative, 10x margin (as in the TRL tests)
TOL = dict(atol=1e-5, rtol=1e-5)


def _ref_logps(task, engine, batch):
    with torch.no_grad():
        return task.reference.logps(engine, batch)


def test_reference_modes_agree(models, tmp_path):
    rows = _chat_rows()
    dpo = {"reference_model": models["base"]}
    task, engine, batch = _task(tmp_path / "m", rows, stage="dpo", model={"name_or_path": models["policy"]},
                                dpo={**dpo, "reference": "model"})
    frozen = _ref_logps(task, engine, batch)
    assert frozen.shape == (2 * len(rows),) and (frozen < 0).all()
    # the reference is not the policy: different weights give different log-probs
    assert (task.policy_logps(engine, batch).detach() - frozen).abs().max() > 1e-2

    task, engine, batch = _task(tmp_path / "p", rows, stage="dpo", model={"name_or_path": models["policy"]},
                                dpo={**dpo, "reference": "precomputed"})
    torch.testing.assert_close(_ref_logps(task, engine, batch), frozen, **TOL)
    cached = list((tmp_path / "p" / "cache").glob("ref-logps-train-*.pt"))
    assert len(cached) == 1 and torch.load(cached[0], weights_only=True).shape == (len(rows), 2)
    # a second run finds the cache and never loads the reference model
    task2, engine2, batch2 = _task(tmp_path / "p", rows, stage="dpo", model={"name_or_path": models["policy"]},
                                   dpo={**dpo, "reference": "precomputed"})
    task2.reference._build_frozen = lambda engine: pytest.fail("reference model loaded despite the cache")
    torch.testing.assert_close(_ref_logps(task2, engine2, batch2), frozen, **TOL)


def test_lora_reference_is_the_base_with_adapter_disabled(models, tmp_path):
    rows = _chat_rows()
    task, engine, batch = _task(tmp_path / "base", rows, stage="dpo", model={"name_or_path": models["base"]},
                                dpo={"reference": "model"})
    base = _ref_logps(task, engine, batch)
    lora = {"name_or_path": models["base"], "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    task, engine, batch = _task(tmp_path / "lora", rows, stage="dpo", model=lora)
    assert task.reference.mode == "adapter_disabled"
    with torch.no_grad():  # move the adapter away from its zero start
        for name, p in engine.module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    torch.testing.assert_close(_ref_logps(task, engine, batch), base, **TOL)
    policy = task.policy_logps(engine, batch).detach()
    assert (policy - base).abs().max() > 1e-3


def test_precomputed_reference_with_lora_uses_the_adapter_off_policy(models, tmp_path):
    rows = _chat_rows()
    task, engine, batch = _task(tmp_path / "base", rows, stage="dpo", model={"name_or_path": models["base"]},
                                dpo={"reference": "model"})
    base = _ref_logps(task, engine, batch)
    lora = {"name_or_path": models["base"], "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    task, engine, batch = _task(tmp_path / "pre", rows, stage="dpo", model=lora, dpo={"reference": "precomputed"})
    task.reference._build_frozen = lambda engine: pytest.fail("a LoRA run needs no second model")
    torch.testing.assert_close(_ref_logps(task, engine, batch), base, **TOL)


LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
QLORA = {"lora": LORA, "quantization": {"load_in_4bit": True, "compute_dtype": "fp32"}}


@pytest.mark.parametrize("model,mode", [
    ({}, "model"), ({}, "precomputed"),
    *[(m, mode) for m in ({"lora": LORA}, QLORA) for mode in ("model", "auto", "adapter_disabled", "precomputed")],
    (QLORA, "precomputed_frozen"),  # precomputed from a frozen copy (dpo.reference_model set), not the adapter off
], ids=lambda v: v if isinstance(v, str) else ("qlora" if "quantization" in v else "lora" if v else "full"))
def test_every_reference_starts_equal_to_the_policy(models, tmp_path, model, mode):
    """Step 1 of DPO, before any update: the reference is the policy's starting point (same base, same
    quantisation), so the loss is ln 2 and every implicit reward 0, for every reference mode."""
    import math

    dpo = {"reference": mode}
    if mode == "precomputed_frozen":
        dpo = {"reference": "precomputed", "reference_model": "ftdist/tiny"}
    task, engine, batch = _task(tmp_path, _chat_rows(), stage="dpo",
                                model={"name_or_path": "ftdist/tiny", **model}, dpo=dpo)
    loss, metrics = _ftdist(task, engine, batch)
    # the policy and the reference compute the same fp32 sums (up to ~1e-6 relative of summed log-probs of size
    # <100, within the batch or in the precompute's other batch shapes): rewards beta * difference within 1e-5;
    # a reference without the policy's 4-bit quantisation is off by ~1e-3 here
    assert abs(float(loss) - math.log(2)) < 1e-5, (float(loss), metrics)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(metrics[key])) < 1e-5, (key, metrics)
    # the one log line says what the reference is, quantisation included
    if "quantization" in model:
        assert "in 4-bit nf4" in task.reference.describe(), task.reference.describe()


def test_reward_is_taken_at_the_last_real_token_with_either_padding(models, tmp_path):
    from ftdist.data.preference import collate_pairs

    task, engine, batch = _task(tmp_path, TEXT_ROWS, stage="rm", model={"name_or_path": models["rm"]})
    with torch.no_grad():
        right = task.rewards(engine, batch)
        left_batch = collate_pairs(list(range(len(TEXT_ROWS))), task.train, task.tokenizer.pad_token_id,
                                   padding_side="left")
        left = task.rewards(engine, left_batch)
        # transformers' own pooling (last non-pad token) on the same right-padded rows
        hf = engine.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
        # and each text alone, no padding at all
        alone = [engine.module(input_ids=batch.input_ids[i][batch.attention_mask[i].bool()][None]).logits[0, 0]
                 for i in range(batch.input_ids.shape[0])]
    torch.testing.assert_close(left, right, **TOL)
    torch.testing.assert_close(hf, right, **TOL)
    torch.testing.assert_close(torch.stack(alone), right, **TOL)


def test_causal_lm_head_exports_as_sequence_classification(models, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from ftdist.models.heads import export_reward_model

    task, engine, batch = _task(tmp_path, TEXT_ROWS, stage="rm", model={"name_or_path": models["base"]},
                                rm={"head": "causal_lm"})
    assert engine.module.get_output_embeddings().weight.shape[0] == 1
    with torch.no_grad():
        rewards = task.rewards(engine, batch)
        export_reward_model(engine.module.state_dict(), engine.module, str(tmp_path / "final"), task.tokenizer)
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final", dtype=torch.float32).eval()
        scores = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    torch.testing.assert_close(scores, rewards, **TOL)


def _scored_rows():
    return [{**r, "score_chosen": float(8 - i), "score_rejected": float(i), "margin": 0.5 * i}
            for i, r in enumerate(TEXT_ROWS)]


@pytest.mark.parametrize("rm", [{"margin": "score_diff", "margin_scale": 0.5}, {"margin": "column"},
                                {"score_diff_weighting": True}, {"score_diff_scaling": True}])
def test_reward_margins_and_weights_by_hand(models, tmp_path, rm):
    rows = _scored_rows()
    task, engine, batch = _task(tmp_path, rows, stage="rm", model={"name_or_path": models["rm"]}, rm=rm)
    loss, _ = _ftdist(task, engine, batch)
    with torch.no_grad():
        chosen, rejected = task.rewards(engine, batch).chunk(2)
    sc = torch.tensor([r["score_chosen"] for r in rows])
    sr = torch.tensor([r["score_rejected"] for r in rows])
    margin = torch.zeros(len(rows))
    if rm.get("margin") == "score_diff":
        margin = 0.5 * (sc - sr)
    elif rm.get("margin") == "column":
        margin = torch.tensor([r["margin"] for r in rows])
    w = (sc - sr) ** 2 / ((sc - sr) ** 2).mean() if rm.get("score_diff_weighting") else torch.ones(len(rows))
    scale = (sc - sr) ** 2 if rm.get("score_diff_scaling") else torch.ones(len(rows))
    expected = (w * -torch.log(torch.sigmoid((chosen - rejected - margin) * scale))).mean()
    torch.testing.assert_close(loss, expected, **TOL)


def test_score_options_need_scores_in_the_data(models, tmp_path):
    with pytest.raises(DataError, match="rm.score_diff_weighting needs a 'score_chosen'"):
        _task(tmp_path, TEXT_ROWS, stage="rm", model={"name_or_path": models["rm"]}, rm={"score_diff_weighting": True})
    with pytest.raises(DataError, match="rm.score_diff_scaling needs a 'score_chosen'"):
        _task(tmp_path, TEXT_ROWS, stage="rm", model={"name_or_path": models["rm"]}, rm={"score_diff_scaling": True})


def test_orpo_task_by_hand(models, tmp_path):
    rows, beta = _chat_rows(), 0.25
    task, engine, batch = _task(tmp_path, rows, stage="orpo", model={"name_or_path": models["policy"]},
                                orpo={"beta": beta, "nll": "pair_mean"})
    loss, metrics = _ftdist(task, engine, batch)
    with torch.no_grad():
        logits = engine.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    mask = batch.labels[:, 1:] != -100
    mean = (logp * mask).sum(-1) / mask.sum(-1)  # (2B,) per-token mean over the response only
    c, r = mean.chunk(2)
    log_odds = (c - r) - (torch.log1p(-c.exp()) - torch.log1p(-r.exp()))
    expected = -c.mean() - beta * torch.nn.functional.logsigmoid(log_odds).mean()
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(torch.tensor(metrics["nll_loss"]), -c.mean(), **TOL)


@pytest.mark.parametrize("rows", ["chat", "text"])
def test_orpo_task_matches_trl_orpo_trainer(models, tmp_path, rows):
    """orpo.nll=trl (the default): the loss and metrics of TRL's own ORPOTrainer.get_batch_loss_metrics on the same
    pairs, in TRL's batch layout (each row's real tokens, right-padded)."""
    import warnings

    from tests.trl_bare import bare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" warning on import
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    rows = _chat_rows() if rows == "chat" else TEXT_ROWS
    task, engine, batch = _task(tmp_path, rows, stage="orpo", model={"name_or_path": models["policy"]},
                                orpo={"beta": 0.25})
    loss, metrics = _ftdist(task, engine, batch)
    pad = models["tok"].pad_token_id

    def trl_side(rows_of_side):
        real = [batch.attention_mask[i].bool() for i in rows_of_side]
        width = max(int(m.sum()) for m in real)
        out = {}
        for key, src, fill in (("input_ids", batch.input_ids, pad), ("attention_mask", batch.attention_mask, 0),
                               ("labels", batch.labels, -100)):
            out[key] = torch.stack([torch.nn.functional.pad(src[i][m], (0, width - int(m.sum())), value=fill)
                                    for i, m in zip(rows_of_side, real)])
        return out

    n = batch.n_pairs
    trl_batch = {f"{side}_{k}": v for side, idx in (("chosen", range(n)), ("rejected", range(n, 2 * n)))
                 for k, v in trl_side(list(idx)).items()}
    trainer = bare(ORPOTrainer, beta=0.25, is_encoder_decoder=False, padding_value=pad, aux_loss_enabled=False)
    with torch.no_grad():
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(engine.module, trl_batch, "train")
    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    for key in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected"):
        torch.testing.assert_close(torch.tensor(float(metrics[key])), torch.tensor(float(trl_metrics[key])), **TOL)


def test_task_accuracy_reads_chat_pairs(models, tmp_path):
    task, engine, batch = _task(tmp_path, _chat_rows(), stage="dpo", model={"name_or_path": models["policy"]},
                                dpo={"reference_model": models["base"]})
    task.cfg = dataclasses.replace(task.cfg, data=dataclasses.replace(task.cfg.data, eval=task.cfg.data.train),
                                   train=dataclasses.replace(task.cfg.train, eval_accuracy=True, eval_max_new_tokens=4))
    out = task.extra_eval(engine, {})
    assert set(out) == {"eval/accuracy"} and 0.0 <= out["eval/accuracy"] <= 1.0
    assert json.loads(json.dumps(out))  # plain floats, loggable
