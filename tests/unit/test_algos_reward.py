"""Hand-computed checks of the pairwise reward-model loss and last-token pooling."""

import math

import pytest
import torch

from ftdist.algos.reward import gather_last, last_token_index, pairwise_reward_loss, score_diff_weights

pytestmark = pytest.mark.unit


def softplus(x):
    # -log sigmoid(x) = log(1 + exp(-x))
    return math.log1p(math.exp(-x))


def test_last_token_index_right_left_and_odd_masks():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padding: sum - 1 = 2
            [0, 0, 1, 1, 1],  # left padding: last is 4, sum - 1 would say 2
            [0, 1, 1, 0, 0],  # both sides padded
            [1, 0, 1, 0, 0],  # a hole
            [1, 0, 0, 0, 0],  # only position 0
            [0, 0, 0, 0, 0],  # empty row: 0, safe to gather
        ]
    )
    assert last_token_index(mask).tolist() == [2, 4, 2, 2, 0, 0]
    assert last_token_index(mask.bool()).tolist() == [2, 4, 2, 2, 0, 0]


def test_gather_last():
    values = torch.arange(10.0).view(2, 5)  # row 0: 0..4, row 1: 5..9
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]])
    torch.testing.assert_close(gather_last(values, mask), torch.tensor([1.0, 9.0]))


def test_pairwise_loss_hand_values_and_metrics():
    chosen = torch.tensor([2.0, 0.5])
    rejected = torch.tensor([1.0, 1.5])  # diffs +1 and -1
    loss, metrics = pairwise_reward_loss(chosen, rejected)
    expected = (softplus(1.0) + softplus(-1.0)) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))
    assert metrics["accuracy"].item() == 0.5
    torch.testing.assert_close(metrics["margin"], torch.tensor(0.0))
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor(1.25))
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor(1.25))
    assert not any(v.requires_grad for v in metrics.values())


def test_pairwise_loss_margin_and_weights():
    chosen = torch.tensor([2.0, 0.5])
    rejected = torch.tensor([1.0, 1.5])
    margin = torch.tensor([0.5, 0.0])
    loss, metrics = pairwise_reward_loss(chosen, rejected, margin=margin)
    torch.testing.assert_close(loss, torch.tensor((softplus(1.0 - 0.5) + softplus(-1.0)) / 2))
    # the logged margin is the reward gap, not the target margin
    torch.testing.assert_close(metrics["margin"], torch.tensor(0.0))

    weights = torch.tensor([1.5, 0.5])
    loss, _ = pairwise_reward_loss(chosen, rejected, weights=weights)
    torch.testing.assert_close(loss, torch.tensor((1.5 * softplus(1.0) + 0.5 * softplus(-1.0)) / 2))


def test_pairwise_ties_count_as_wrong_and_gradient():
    chosen = torch.tensor([0.3], requires_grad=True)
    rejected = torch.tensor([0.3], requires_grad=True)
    loss, metrics = pairwise_reward_loss(chosen, rejected)
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    assert metrics["accuracy"].item() == 0.0
    loss.backward()
    # d/dc softplus(-(c - r)) = -(1 - sigmoid(0)) = -0.5
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.5]))
    torch.testing.assert_close(rejected.grad, torch.tensor([0.5]))


def test_score_diff_weights():
    chosen_scores = torch.tensor([5.0, 3.0, 4.0])
    rejected_scores = torch.tensor([1.0, 2.0, 4.0])
    # squared gaps 16, 1, 0 with mean 17/3
    expected = torch.tensor([16 * 3 / 17, 1 * 3 / 17, 0.0])
    weights = score_diff_weights(chosen_scores, rejected_scores)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights.mean(), torch.tensor(1.0))
    # all ties: zeros, not NaN
    assert score_diff_weights(torch.ones(3), torch.ones(3)).tolist() == [0.0, 0.0, 0.0]
