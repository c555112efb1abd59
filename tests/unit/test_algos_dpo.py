"""Hand-computed checks of the DPO loss variants and ORPO."""

import math

import pytest
import torch

from ftdist.algos.dpo import dpo_loss, orpo_loss

pytestmark = pytest.mark.unit


def neg_log_sigmoid(x):
    return math.log1p(math.exp(-x))


# pair 0: chosen log-ratio -10 - (-11) = +1, rejected -12 - (-11) = -1, h = 2
# pair 1: chosen log-ratio -20 - (-19) = -1, rejected -15 - (-15.5) = +0.5, h = -1.5
POLICY_CHOSEN = torch.tensor([-10.0, -20.0])
POLICY_REJECTED = torch.tensor([-12.0, -15.0])
REF_CHOSEN = torch.tensor([-11.0, -19.0])
REF_REJECTED = torch.tensor([-11.0, -15.5])
H = [2.0, -1.5]
BETA = 0.1


def test_sigmoid_hand_values():
    loss, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA)
    expected = (neg_log_sigmoid(BETA * H[0]) + neg_log_sigmoid(BETA * H[1])) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_sigmoid_cdpo_label_smoothing():
    eps = 0.1
    loss, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA, label_smoothing=eps)
    per_pair = [(1 - eps) * neg_log_sigmoid(BETA * h) + eps * neg_log_sigmoid(-BETA * h) for h in H]
    torch.testing.assert_close(loss, torch.tensor(sum(per_pair) / 2))


def test_hinge_inside_and_outside_margin():
    loss, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA, loss_type="hinge")
    # relu(1 - 0.2) and relu(1 + 0.15)
    torch.testing.assert_close(loss, torch.tensor((0.8 + 1.15) / 2))

    # beta * h = 0.1 * 20 = 2 > 1: past the margin, no loss and no gradient
    policy_chosen = torch.tensor([0.0], requires_grad=True)
    loss, _ = dpo_loss(
        policy_chosen, torch.tensor([-20.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=BETA, loss_type="hinge"
    )
    assert loss.item() == 0.0
    loss.backward()
    assert policy_chosen.grad.item() == 0.0


def test_ipo_is_length_normalised():
    chosen_lengths = torch.tensor([2, 4])
    rejected_lengths = torch.tensor([4, 1])
    loss, _ = dpo_loss(
        POLICY_CHOSEN,
        POLICY_REJECTED,
        REF_CHOSEN,
        REF_REJECTED,
        beta=BETA,
        loss_type="ipo",
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    target = 1 / (2 * BETA)  # 5
    pair0 = (1.0 / 2 - (-1.0) / 4 - target) ** 2  # (0.75 - 5)^2
    pair1 = (-1.0 / 4 - 0.5 / 1 - target) ** 2  # (-0.75 - 5)^2
    torch.testing.assert_close(loss, torch.tensor((pair0 + pair1) / 2))

    ones = torch.ones(2)
    loss, _ = dpo_loss(
        POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA, loss_type="ipo",
        chosen_lengths=ones, rejected_lengths=ones,
    )  # fmt: skip
    torch.testing.assert_close(loss, torch.tensor(((2.0 - 5) ** 2 + (-1.5 - 5) ** 2) / 2))


def test_metrics_are_implicit_rewards():
    _, metrics = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA)
    # chosen rewards 0.1 * [1, -1], rejected 0.1 * [-1, 0.5]
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor(0.0))
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor(0.1 * (-1 + 0.5) / 2))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor(0.1 * (2.0 - 1.5) / 2))
    assert metrics["rewards/accuracies"].item() == 0.5
    torch.testing.assert_close(metrics["logps/chosen"], torch.tensor(-15.0))
    torch.testing.assert_close(metrics["logps/rejected"], torch.tensor(-13.5))


def test_sigmoid_gradient_direction_and_dtype():
    policy_chosen = POLICY_CHOSEN.clone().to(torch.bfloat16).requires_grad_()
    loss, _ = dpo_loss(policy_chosen, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA)
    assert loss.dtype == torch.float32
    loss.backward()
    # d/dpc of -log sigmoid(beta h) / B = -beta * sigmoid(-beta h) / B
    expected = [-BETA * (1 / (1 + math.exp(BETA * h))) / 2 for h in H]
    # a bf16 gradient keeps 8 significant bits (relative rounding 2^-9 = 2e-3): 1e-2 allows a few roundings
    torch.testing.assert_close(policy_chosen.grad.float(), torch.tensor(expected), atol=1e-3, rtol=1e-2)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, label_smoothing=0.5)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, loss_type="ipo")


def test_orpo_hand_values():
    # chosen mean log-prob log 0.5 -> odds 1, log odds 0
    # rejected log 0.2 -> odds 0.25, log odds log 0.25; log odds ratio = log 4
    chosen = torch.tensor([math.log(0.5)])
    rejected = torch.tensor([math.log(0.2)])
    nll = torch.tensor(2.0)
    loss, metrics = orpo_loss(chosen, rejected, nll, beta=BETA)
    # -log sigmoid(log 4) = log(1 + 1/4)
    torch.testing.assert_close(loss, torch.tensor(2.0 + BETA * math.log(1.25)))
    torch.testing.assert_close(metrics["log_odds_chosen"], torch.tensor(math.log(4)))
    torch.testing.assert_close(metrics["log_odds_ratio"], torch.tensor(-math.log(1.25)))
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor(BETA * math.log(0.5)))
    torch.testing.assert_close(metrics["nll_loss"], torch.tensor(2.0))
    assert metrics["rewards/accuracies"].item() == 1.0


def test_orpo_near_zero_logp_is_stable():
    # log p = -0.01 is the branch where log1p(-exp(x)) would cancel; log(1-p) = log(-expm1(-0.01))
    chosen = torch.tensor([-0.01])
    rejected = torch.tensor([-3.0])
    log_odds_c = -0.01 - math.log(-math.expm1(-0.01))
    log_odds_r = -3.0 - math.log1p(-math.exp(-3.0))
    _, metrics = orpo_loss(chosen, rejected, torch.tensor(0.0), beta=BETA)
    torch.testing.assert_close(metrics["log_odds_chosen"], torch.tensor(log_odds_c - log_odds_r))
