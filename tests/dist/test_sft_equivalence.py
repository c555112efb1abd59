"""The update does not depend on how a step's samples are split over micro-batches, ranks or ZeRO stages,
and equals a plain PyTorch loop over the same batches (fp32, CPU, gloo).

The runs use SGD without clipping: its update is linear in the gradient, so a wrong loss divisor or a lost
micro-batch shows up in full, and rounding differences stay rounding-sized (see tests/helpers.py for why Adam
is not used for such comparisons). Clipping and DeepSpeed's CPU Adam get a case each.
"""

import pytest
import torch

from tests.helpers import (GRAD_RTOL, adam_tolerance, load_weights, max_abs, max_abs_diff, read_metrics, run_ftdist,
                           sgd_tolerance, write_recipe)

pytestmark = pytest.mark.dist

STEPS = 3
SGD_LR = 0.02  # the tiny model's first gradient norm is ~16; SGD (momentum 0.9) at 0.02 lowers the loss every step
CLIP = 5.0  # below every step's gradient norm at SGD_LR (asserted), so clipping acts on each step
ADAM_LR, ADAM_EPS = 2e-3, 1e-1  # eps >> gradient rounding keeps Adam well-conditioned (tests/helpers.py)
RECIPE = dict(
    stage="sft",
    model={"name_or_path": "ftdist/tiny", "dtype": "fp32"},
    data={"train": "ftdist/tiny-task", "max_length": 64},
    train={"global_batch_size": 8, "micro_batch_size": 4, "max_steps": STEPS, "lr": SGD_LR, "scheduler": "cosine",
           "warmup_ratio": 0.0, "weight_decay": 0.1, "max_grad_norm": 0.0, "optimizer": "sgd", "progress_bar": False},
    checkpoint={"every_steps": 0, "keep_last": 1},
    logging={"tensorboard": False},
)
ADAM = ["train.optimizer=adamw_torch", f"train.lr={ADAM_LR}", f"train.adam_eps={ADAM_EPS}"]


def reference_weights(cache_dir: str, optimizer: str = "sgd", clip: float = 0.0) -> tuple[dict, float, list]:
    """A plain PyTorch loop over ftdist's own batches: no DeepSpeed, one process, one micro-batch per step.
    Returns the final weights, the largest gradient entry seen and each step's gradient norm (before clipping)."""
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
    groups = decay_param_groups(model, cfg.train.weight_decay)
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=SGD_LR, momentum=0.9)
    else:
        opt = torch.optim.AdamW(groups, lr=ADAM_LR, eps=ADAM_EPS)
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=STEPS)
    plan = plan_epoch(data.lengths, seed=cfg.seed, epoch=0, micro_batch_size=8, grad_accum=1, world_size=1,
                      rank=0, packing=False, capacity=64)
    largest, norms = 0.0, []
    for step in range(STEPS):
        batch = collate_rows(plan.steps[step][0], data, tok.pad_token_id, 64, False)
        logits = causal_logits(model, batch, "sdpa", torch.float32)
        loss_sum, n = sft_loss_sum(logits, batch.labels)
        (loss_sum / n).backward()
        largest = max([largest, *(float(p.grad.abs().max()) for p in model.parameters())])
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))))
        opt.step()
        sched.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, largest, norms


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("equiv")
    recipe = write_recipe(base / "recipe.yaml", **RECIPE)
    cache = str(base / "cache")
    cases = {
        "1rank_micro8_acc1": (1, ["train.micro_batch_size=8", "deepspeed.zero_stage=0", "train.group_by_length=false"]),
        "1rank_micro8_split": (1, ["train.micro_batch_size=8", "deepspeed.zero_stage=0"]),
        "1rank_micro2_acc4": (1, ["train.micro_batch_size=2", "deepspeed.zero_stage=0"]),
        # ZeRO-3 runs once, with clipping (test_clipping_over_zero3_partitions_matches_plain_pytorch)
        **{f"2rank_micro2_acc2_zero{z}": (2, ["train.micro_batch_size=2", f"deepspeed.zero_stage={z}"])
           for z in (0, 1, 2)},
        "2rank_micro4_acc1_zero2": (2, ["train.micro_batch_size=4", "deepspeed.zero_stage=2"]),
        "1rank_micro8_gradckpt": (1, ["train.micro_batch_size=8", "deepspeed.zero_stage=0",
                                      "model.gradient_checkpointing=true"]),
        "2rank_micro2_zero3_clip": (2, ["train.micro_batch_size=2", "deepspeed.zero_stage=3",
                                        f"train.max_grad_norm={CLIP}"]),
        "2rank_micro2_zero2_offload": (2, ["train.micro_batch_size=2", "deepspeed.zero_stage=2",
                                           "deepspeed.offload_optimizer=true", *ADAM]),
    }
    out = {}
    for name, (nproc, overrides) in cases.items():
        run_dir = base / name
        run_ftdist(nproc, str(recipe), [f"output_dir={run_dir}", f"data.cache_dir={cache}", *overrides])
        out[name] = load_weights(run_dir / "final")
        out[f"{name}/metrics"] = [r for r in read_metrics(run_dir) if "loss" in r]
    out["reference"], _, out["reference/norms"] = reference_weights(cache)
    out["reference_clip"], _, out["reference_clip/norms"] = reference_weights(cache, clip=CLIP)
    out["reference_adam"], out["reference_adam/grad_max"], _ = reference_weights(cache, "adamw")
    from ftdist.models.tiny import resolve_model_path

    out["init"] = load_weights(resolve_model_path("ftdist/tiny"))
    return out


def _sgd_tol(runs, reference="reference"):
    return sgd_tolerance(update=max_abs_diff(runs[reference], runs["init"]), weight=max_abs(runs[reference]),
                         steps=STEPS)


def test_weights_moved(runs):
    # the update is far above the tolerance, so the comparisons below can see a wrong update
    assert max_abs_diff(runs["reference"], runs["init"]) > 1000 * _sgd_tol(runs)
    steps = runs["1rank_micro8_acc1/metrics"]
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_micro_batch_split_does_not_change_update(runs):
    assert max_abs_diff(runs["1rank_micro8_acc1"], runs["1rank_micro2_acc4"]) < _sgd_tol(runs)


def test_length_split_does_not_change_update(runs):
    """train.group_by_length=step (the default): the 8 rows of each step run as several micro-batches of similar
    length, with less padding than one micro-batch of 8, and the same update."""
    plain, split = runs["1rank_micro8_acc1/metrics"], runs["1rank_micro8_split/metrics"]
    assert [r["micro_batches"] for r in plain] == [1] * STEPS
    # a split only ever removes padding (it is made where the padding saved exceeds a micro-batch's overhead):
    # never more padding in a step, and here (lengths 23..46 tokens) at least one step is split
    assert any(r["micro_batches"] > 1 for r in split)
    assert all(s["padding_fraction"] <= p["padding_fraction"] for s, p in zip(split, plain))
    assert sum(s["padding_fraction"] for s in split) < sum(p["padding_fraction"] for p in plain)
    assert max_abs_diff(runs["1rank_micro8_split"], runs["reference"]) < _sgd_tol(runs)
    # on 2 ranks every rank runs the same number of micro-batches (a ZeRO backward is collective)
    assert all(r["micro_batches"] >= 2 for r in runs["2rank_micro2_zero3_clip/metrics"])


def test_rank_split_does_not_change_update(runs):
    assert max_abs_diff(runs["2rank_micro4_acc1_zero2"], runs["1rank_micro8_acc1"]) < _sgd_tol(runs)
    assert max_abs_diff(runs["2rank_micro2_acc2_zero2"], runs["1rank_micro2_acc4"]) < _sgd_tol(runs)


@pytest.mark.parametrize("zero", [0, 1, 2])  # ZeRO-3: test_clipping_over_zero3_partitions_matches_plain_pytorch
def test_zero_stages_match_plain_pytorch(runs, zero):
    assert max_abs_diff(runs[f"2rank_micro2_acc2_zero{zero}"], runs["reference"]) < _sgd_tol(runs)


def test_gradient_checkpointing_does_not_change_update(runs):
    assert max_abs_diff(runs["1rank_micro8_gradckpt"], runs["reference"]) < _sgd_tol(runs)


def test_clipping_over_zero3_partitions_matches_plain_pytorch(runs):
    """The global gradient norm is computed over all partitions: the clipped update equals torch's."""
    norms = [r["grad_norm"] for r in runs["2rank_micro2_zero3_clip/metrics"]]
    assert len(norms) == STEPS and min(norms) > CLIP  # clipping acted on every step
    assert max_abs_diff(runs["reference_clip"], runs["reference"]) > 1000 * _sgd_tol(runs)  # and mattered
    assert max_abs_diff(runs["2rank_micro2_zero3_clip"], runs["reference_clip"]) < _sgd_tol(runs, "reference_clip")


@pytest.mark.parametrize("name,reference", [("1rank_micro8_acc1", "reference"),  # ZeRO-0: the Engine's norm
                                            ("2rank_micro2_acc2_zero2", "reference"),  # DeepSpeed's, partitioned
                                            ("2rank_micro2_zero3_clip", "reference_clip")])
def test_logged_grad_norm_is_the_norm_before_clipping(runs, name, reference):
    # the same gradients up to rounding (GRAD_RTOL of their size), so the same norm to GRAD_RTOL
    logged = [r["grad_norm"] for r in runs[f"{name}/metrics"]]
    assert logged == pytest.approx(runs[f"{reference}/norms"], rel=GRAD_RTOL)


def test_optimizer_offload_matches_plain_pytorch(runs):
    """DeepSpeed's CPU Adam on offloaded fp32 state computes the same AdamW update as torch."""
    got, want = runs["2rank_micro2_zero2_offload"], runs["reference_adam"]
    tol = adam_tolerance(lr=ADAM_LR, eps=ADAM_EPS, grad=runs["reference_adam/grad_max"], weight=max_abs(want),
                         steps=STEPS)
    assert max_abs_diff(want, runs["init"]) > 100 * tol  # Adam moved the weights far more than the tolerance
    assert max_abs_diff(got, want) < tol
