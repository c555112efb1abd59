"""Hand-computed checks of the SFT loss and the shared log-prob helpers."""

import math

import pytest
import torch
import torch.nn.functional as F

from ftdist.algos.sft import masked_mean, sequence_logprobs, sft_loss_sum, token_logprobs

pytestmark = pytest.mark.unit

# one row, T=3, V=2. position 0 predicts labels[1], position 1 predicts labels[2];
# position 2's logits predict nothing and must be dropped by the shift.
#   pos 0: logits [0, ln 3] -> p = [1/4, 3/4]
#   pos 1: logits [ln 2, 0] -> p = [2/3, 1/3]
#   pos 2: logits [50, -50] garbage
LOGITS = torch.tensor([[[0.0, math.log(3)], [math.log(2), 0.0], [50.0, -50.0]]])  # (1, 3, 2)


def test_token_logprobs_shift_and_mask():
    labels = torch.tensor([[-100, 1, 0]])
    logps, mask = token_logprobs(LOGITS, labels)
    assert logps.shape == (1, 2) and mask.shape == (1, 2)
    torch.testing.assert_close(logps, torch.tensor([[math.log(3 / 4), math.log(2 / 3)]]))
    assert mask.tolist() == [[True, True]]

    # the prompt token at position 1 is not a target: log-prob 0 there, mask false
    logps, mask = token_logprobs(LOGITS, torch.tensor([[-100, -100, 0]]))
    torch.testing.assert_close(logps, torch.tensor([[0.0, math.log(2 / 3)]]))
    assert mask.tolist() == [[False, True]]


def test_sft_loss_sum_hand_values():
    loss_sum, n_tokens = sft_loss_sum(LOGITS, torch.tensor([[-100, 1, 0]]))
    # -log(3/4) - log(2/3) = -log(1/2)
    torch.testing.assert_close(loss_sum, torch.tensor(math.log(2)))
    assert n_tokens.item() == 2

    # prompt masked: only -log(2/3) remains
    loss_sum, n_tokens = sft_loss_sum(LOGITS, torch.tensor([[-100, -100, 0]]))
    torch.testing.assert_close(loss_sum, torch.tensor(-math.log(2 / 3)))
    assert n_tokens.item() == 1

    # nothing to learn: 0, not NaN
    loss_sum, n_tokens = sft_loss_sum(LOGITS, torch.full((1, 3), -100))
    assert loss_sum.item() == 0.0 and n_tokens.item() == 0


def test_sft_label_smoothing_by_hand():
    # V=3, logits [0, 1, 2], target 2, eps 0.1
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 1.0, 2.0]]])  # (1, 2, 3); pos 1 is dropped
    labels = torch.tensor([[-100, 2]])
    eps = 0.1
    # first the target sits where logits are all 0: every -log p is log 3
    nll = math.log(3)
    smooth = math.log(3)
    expected = (1 - eps) * nll + eps * smooth
    loss_sum, _ = sft_loss_sum(logits, labels, label_smoothing=eps)
    torch.testing.assert_close(loss_sum, torch.tensor(expected))

    # now it sits where logits are [0, 1, 2]: -log p_c = lse - z_c
    lse = math.log(1 + math.e + math.e**2)
    logits = torch.tensor([[[0.0, 1.0, 2.0], [9.0, 9.0, 9.0]]])
    nll = lse - 2.0
    smooth = ((lse - 0.0) + (lse - 1.0) + (lse - 2.0)) / 3
    expected = (1 - eps) * nll + eps * smooth
    loss_sum, _ = sft_loss_sum(logits, labels, label_smoothing=eps)
    torch.testing.assert_close(loss_sum, torch.tensor(expected))


def test_sft_label_smoothing_matches_torch_mean_times_count():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100  # prompt
    labels[2, 5:] = -100  # padding
    loss_sum, n_tokens = sft_loss_sum(logits, labels, label_smoothing=0.2)
    ref_mean = F.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=0.2
    )
    torch.testing.assert_close(loss_sum / n_tokens, ref_mean)


def test_sft_sum_is_split_invariant():
    # the reason it is a sum: micro-batch sums add up to the full-batch sum
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 9)
    labels = torch.randint(0, 9, (4, 6))
    labels[1, :4] = -100
    labels[3, 2:] = -100
    full, n_full = sft_loss_sum(logits, labels)
    a, n_a = sft_loss_sum(logits[:1], labels[:1])
    b, n_b = sft_loss_sum(logits[1:], labels[1:])
    torch.testing.assert_close(a + b, full)
    assert (n_a + n_b).item() == n_full.item() == 5 + 2 + 5 + 1


def test_bf16_logits_computed_in_float32():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 13).to(torch.bfloat16)
    labels = torch.randint(0, 13, (2, 5))
    loss_sum, _ = sft_loss_sum(logits, labels)
    assert loss_sum.dtype == torch.float32
    ref, _ = sft_loss_sum(logits.float(), labels)
    torch.testing.assert_close(loss_sum, ref, rtol=0, atol=0)
    assert sequence_logprobs(logits, labels).dtype == torch.float32


def test_sequence_logprobs_sum_and_average():
    logits = LOGITS.repeat(2, 1, 1)  # (2, 3, 2)
    labels = torch.tensor([[-100, 1, 0], [-100, -100, 0]])
    expected_sum = [math.log(3 / 4) + math.log(2 / 3), math.log(2 / 3)]
    torch.testing.assert_close(sequence_logprobs(logits, labels), torch.tensor(expected_sum))
    expected_avg = [expected_sum[0] / 2, expected_sum[1] / 1]
    torch.testing.assert_close(sequence_logprobs(logits, labels, average=True), torch.tensor(expected_avg))


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("-inf")], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    # (1 + 2 + 6) / 3; the -inf under the mask must not leak
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(3.0))
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 6.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=0), torch.tensor([1.0, 2.0, 6.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
