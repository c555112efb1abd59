"""The preference Tasks end to end against TRL 1.16 on the same tiny model and pairs.

Each side does its own work from the same rows: TRL tokenises with its trainer's
`_prepare_dataset`, batches with its collator and computes the loss with its
trainer; ftdist tokenises, masks, batches and computes the loss through the RM
and DPO Tasks. Loss, implicit rewards, accuracies and log-probs must agree
within 1e-5. Trainers are bare instances (tests/trl_bare.py).
The Tasks run on `LocalEngine`, the engine's interface on one process.
"""

import json
from types import SimpleNamespace

import pytest
import torch

from ftdist.config import load_config
from ftdist.engine.dist import DistInfo
from ftdist.models.loading import load_tokenizer
from ftdist.train.task import make_task
from tests.trl_bare import bare

pytestmark = pytest.mark.unit

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
# Each side runs the same fp32 model on its own batch layout (padding, lengths), so its matmuls round
# differently: ~1e-6 relative per logit, and sequence sums keep that relative size. 1e-5 is 10x that; atol
# covers values that are ~0 (implicit rewards while the policy equals the reference).
TOL = dict(atol=1e-5, rtol=1e-5)


class LocalEngine:
    """What a Task needs from the engine, on one process without DeepSpeed."""

    def __init__(self, model):
        self.module, self.device = model, torch.device("cpu")
        self.info, self.zero_stage, self.grad_accum = DistInfo(0, 1, 0, "gloo"), 0, 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True):
        self.module.train(mode)


def _chat_rows():
    from ftdist.data.loading import resolve_data_path

    lines = open(resolve_data_path("ftdist/tiny-task/train_pref")).read().splitlines()[:6]
    return [json.loads(line) for line in lines]


TEXT_ROWS = [
    {"prompt": "Sort the digits: 3 1 2\nAnswer:", "chosen": " 1 2 3", "rejected": " 1 3 2"},
    {"prompt": "Sort the digits: 9 0\nAnswer:", "chosen": " 0 9", "rejected": " 9 0 0"},
    {"prompt": "The weather today is", "chosen": " cold but clear.", "rejected": " a river bank."},
    {"prompt": "Sort the digits: 5 5 1 7\nAnswer:", "chosen": " 1 5 5 7", "rejected": " 1 5 7"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Directories: the tiny model (reference), a perturbed copy (policy), and a reward model with a head."""
    from ftdist.models.tiny import resolve_model_path

    base = resolve_model_path("ftdist/tiny")
    root = tmp_path_factory.mktemp("models")
    tok = load_tokenizer(load_config(data={"data": {"train": "x"}}).model)
    torch.manual_seed(0)
    policy = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # policy != reference, so rewards are not all zero
    policy.save_pretrained(root / "policy")
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.5)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(root / "rm")
    for d in ("policy", "rm"):
        tok.save_pretrained(root / d)
    return {"base": base, "policy": str(root / "policy"), "rm": str(root / "rm"), "tok": tok}


def _task(tmp_path, rows, data=None, **recipe):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "pairs.jsonl"
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    if not path.exists() or path.read_text() != text:  # an untouched file keeps its tokenised cache
        path.write_text(text)
    recipe.setdefault("model", {})["dtype"] = "fp32"
    cfg = load_config(data={**recipe, "data": {"train": str(path), "max_length": 128, "max_prompt_length": 100,
                                               **(data or {})}})
    tok = load_tokenizer(cfg.model)
    task = make_task(cfg, tok, DistInfo(0, 1, 0, "gloo"))
    task.prepare_data(str(tmp_path / "cache"), show_progress=False)
    model = task.build_model().eval()
    batch = task.collate([[i] for i in range(len(rows))], "train")
    return task, LocalEngine(model), batch


def _ftdist(task, engine, batch):
    n = batch.n_pairs
    with torch.no_grad():
        loss, sums = task.loss(engine, batch)
    return loss / n, {k: v / n for k, v in sums.items()}


def _trl_dpo(models, rows, loss_type, beta):
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    tok = models["tok"]
    policy = transformers.AutoModelForCausalLM.from_pretrained(models["policy"], dtype=torch.float32).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    trainer = bare(DPOTrainer, model=policy, ref_model=reference, precompute_ref_logps=False,
                    aux_loss_enabled=False, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type],
                    loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False, _tokenizer=tok,
                    args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    args = SimpleNamespace(dataset_num_proc=None, max_length=128, truncation_mode="keep_start")
    ds = trainer._prepare_dataset(Dataset.from_list(rows), tok, args, "train")
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=128)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        loss = trainer._compute_loss(policy, dict(batch), return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


@pytest.mark.parametrize("rows", ["chat", "text"])
@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("ipo", 0.5), ("hinge", 0.5)])
def test_dpo_task_matches_trl(models, tmp_path, rows, loss_type, beta):
    rows = _chat_rows() if rows == "chat" else TEXT_ROWS
    task, engine, batch = _task(tmp_path, rows, stage="dpo", model={"name_or_path": models["policy"]},
                                dpo={"beta": beta, "loss_type": loss_type, "reference_model": models["base"]})
    loss, metrics = _ftdist(task, engine, batch)
    trl_loss, trl_metrics = _trl_dpo(models, rows, loss_type, beta)
    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        torch.testing.assert_close(torch.as_tensor(metrics[key]), torch.tensor(trl_metrics[key]), **TOL, msg=key)
    assert abs(metrics["rewards/margins"]) > 1e-3 and 0 < metrics["rewards/accuracies"] <= 1  # not degenerate


def test_cdpo_task_by_hand(models, tmp_path):
    """TRL 1.16 has no label-smoothed sigmoid; check the Task's cDPO against the formula on its own log-probs."""
    rows, eps, beta = _chat_rows(), 0.2, 0.5
    task, engine, batch = _task(tmp_path, rows, stage="dpo", model={"name_or_path": models["policy"]},
                                dpo={"beta": beta, "label_smoothing": eps, "reference_model": models["base"]})
    loss, _ = _ftdist(task, engine, batch)
    with torch.no_grad():
        pc, pr = task.policy_logps(engine, batch).chunk(2)
        rc, rr = task.reference.logps(engine, batch).chunk(2)
    h = beta * ((pc - rc) - (pr - rr))
    expected = (-(1 - eps) * torch.log(torch.sigmoid(h)) - eps * torch.log(torch.sigmoid(-h))).mean()
    torch.testing.assert_close(loss, expected, **TOL)


@pytest.mark.parametrize("rows", ["chat", "text"])
def test_reward_task_matches_trl(models, tmp_path, rows):
    from datasets import Dataset
    from trl.trainer.reward_trainer import DataCollatorForPreference, RewardTrainer

    rows = _chat_rows() if rows == "chat" else TEXT_ROWS
    task, engine, batch = _task(tmp_path, rows, stage="rm", model={"name_or_path": models["rm"]})
    loss, metrics = _ftdist(task, engine, batch)

    tok = models["tok"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(models["rm"], dtype=torch.float32).eval()
    trainer = bare(RewardTrainer, model=model, args=SimpleNamespace(center_rewards_coefficient=None))
    ds = trainer._prepare_dataset(Dataset.from_list(rows), tok, SimpleNamespace(dataset_num_proc=None, max_length=None),
                                  "train")
    trl_batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(trl_batch))
    torch.testing.assert_close(loss, trl_loss, **TOL)
    for key in ("accuracy", "margin"):
        torch.testing.assert_close(torch.as_tensor(metrics[key]), torch.tensor(trainer._metrics["eval"][key][-1]),
                                   **TOL, msg=key)
    assert 0 < metrics["accuracy"] < 1 or abs(metrics["margin"]) > 1e-3
