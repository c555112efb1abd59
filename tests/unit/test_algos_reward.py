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


def test_score_difference_loss_as_the_guides_write_it():
    """rm.score_diff_scaling: -log sigmoid((r_c - r_r) * (s_c - s_r)^2), checked against the formula by hand, and
    not a no-op for a micro-batch of one pair (a weight normalised over the batch would be exactly 1 there)."""
    import math

    chosen, rejected = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    s_c, s_r = torch.tensor([9.0, 7.0, 5.0]), torch.tensor([8.0, 4.0, 5.0])
    scale = (s_c - s_r) ** 2  # 1, 9, 0
    loss, _ = pairwise_reward_loss(chosen, rejected, scale=scale)
    by_hand = [-math.log(1 / (1 + math.exp(-(c - r) * d))) for c, r, d in zip([0.5, -1.0, 2.0], [0.0, 0.5, 2.5],
                                                                              [1.0, 9.0, 0.0])]
    assert loss.item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)  # float32 sigmoid/log: ~1e-7 relative
    one, _ = pairwise_reward_loss(chosen[1:2], rejected[1:2], scale=scale[1:2])
    plain, _ = pairwise_reward_loss(chosen[1:2], rejected[1:2])
    weighted, _ = pairwise_reward_loss(chosen[1:2], rejected[1:2], weights=score_diff_weights(s_c[1:2], s_r[1:2]))
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-6)  # the normalised weight of a lone pair is 1
    assert one.item() == pytest.approx(by_hand[1], rel=1e-6) and one.item() > 5 * plain.item()
    # a tie (d = 0) gives no gradient
    r = torch.tensor([2.0], requires_grad=True)
    pairwise_reward_loss(r, torch.tensor([2.5]), scale=torch.tensor([0.0]))[0].backward()
    assert r.grad.item() == 0.0
