"""The update does not depend on how a step's samples are split over micro-batches, ranks or ZeRO stages,
and equals a plain PyTorch loop over the same batches (fp32, CPU, gloo)."""

import pytest
import torch

from tests.helpers import load_weights, max_abs_diff, run_ftdist, write_recipe

pytestmark = pytest.mark.dist

STEPS = 3
RECIPE = dict(
    stage="sft",
    model={"name_or_path": "ftdist/tiny", "dtype": "fp32"},
    data={"train": "ftdist/tiny-task", "max_length": 64},
    train={"global_batch_size": 8, "micro_batch_size": 4, "max_steps": STEPS, "lr": 2e-3, "scheduler": "cosine",
           "warmup_ratio": 0.0, "weight_decay": 0.1, "max_grad_norm": 1.0, "progress_bar": False},
    checkpoint={"every_steps": 0, "keep_last": 1},
    logging={"tensorboard": False},
)


def reference_weights(cache_dir: str) -> dict:
    """A plain PyTorch loop over ftdist's own batches: no DeepSpeed, one process."""
    from transformers import get_scheduler

    from ftdist.algos.sft import sft_loss_sum
    from ftdist.config import load_config
    from ftdist.data.batching import TokenData, collate_rows, plan_epoch
    from ftdist.data.tokenize import tokenize_sft
    from ftdist.models.forward import causal_logits
    from ftdist.models.loading import decay_param_groups, load_causal_lm, load_tokenizer

    cfg = load_config(data=RECIPE)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    ds, _ = tokenize_sft(cfg.data.train, tok, cfg.data, cache_dir)
    data = TokenData(ds)
    model = load_causal_lm(cfg.model)
    opt = torch.optim.AdamW(decay_param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=STEPS)
    plan = plan_epoch(data.lengths, seed=cfg.seed, epoch=0, micro_batch_size=8, grad_accum=1, world_size=1,
                      rank=0, packing=False, capacity=64)
    for step in range(STEPS):
        batch = collate_rows(plan.steps[step][0], data, tok.pad_token_id, 64, False)
        logits = causal_logits(model, batch, "sdpa", torch.float32)
        loss_sum, n = sft_loss_sum(logits, batch.labels)
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("equiv")
    recipe = write_recipe(base / "recipe.yaml", **RECIPE)
    cache = str(base / "cache")
    cases = {
        "1rank_micro8_acc1": (1, ["train.micro_batch_size=8", "deepspeed.zero_stage=0"]),
        "1rank_micro2_acc4": (1, ["train.micro_batch_size=2", "deepspeed.zero_stage=0"]),
        **{f"2rank_micro2_acc2_zero{z}": (2, ["train.micro_batch_size=2", f"deepspeed.zero_stage={z}"])
           for z in (0, 1, 2, 3)},
        "2rank_micro4_acc1_zero2": (2, ["train.micro_batch_size=4", "deepspeed.zero_stage=2"]),
        "1rank_micro8_gradckpt": (1, ["train.micro_batch_size=8", "deepspeed.zero_stage=0",
                                      "model.gradient_checkpointing=true"]),
        "2rank_micro2_zero2_offload": (2, ["train.micro_batch_size=2", "deepspeed.zero_stage=2",
                                           "deepspeed.offload_optimizer=true"]),
    }
    out = {}
    for name, (nproc, overrides) in cases.items():
        run_dir = base / name
        run_ftdist(nproc, str(recipe), [f"output_dir={run_dir}", f"data.cache_dir={cache}", *overrides])
        out[name] = load_weights(run_dir / "final")
    out["reference"] = reference_weights(cache)
    return out


def test_weights_moved(runs):
    from ftdist.models.tiny import resolve_model_path

    init = load_weights(resolve_model_path("ftdist/tiny"))
    assert max_abs_diff(runs["reference"], init) > 1e-3


def test_micro_batch_split_does_not_change_update(runs):
    assert max_abs_diff(runs["1rank_micro8_acc1"], runs["1rank_micro2_acc4"]) < 1e-5


def test_rank_split_does_not_change_update(runs):
    assert max_abs_diff(runs["2rank_micro4_acc1_zero2"], runs["1rank_micro8_acc1"]) < 1e-5
    assert max_abs_diff(runs["2rank_micro2_acc2_zero2"], runs["1rank_micro2_acc4"]) < 1e-5


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_stages_match_plain_pytorch(runs, zero):
    assert max_abs_diff(runs[f"2rank_micro2_acc2_zero{zero}"], runs["reference"]) < 1e-5


def test_gradient_checkpointing_does_not_change_update(runs):
    assert max_abs_diff(runs["1rank_micro8_gradckpt"], runs["reference"]) < 1e-5


def test_optimizer_offload_matches_plain_pytorch(runs):
    """DeepSpeed's CPU Adam on offloaded fp32 state computes the same AdamW update."""
    assert max_abs_diff(runs["2rank_micro2_zero2_offload"], runs["reference"]) < 1e-5
