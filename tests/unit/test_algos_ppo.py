"""Hand-computed checks of the PPO / GRPO / RLOO / REINFORCE++ math."""

import math
import statistics

import pytest
import torch

from ftdist.algos.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_token_rewards,
    entropy_from_logits,
    gae,
    grpo_advantages,
    kl_penalty,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    value_loss,
    whiten,
)

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_hand_values():
    # policy p = 0.5, reference q = 0.25 on the sampled token: log r = log 2
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    log2 = math.log(2)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[log2]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[0.5 * log2**2]]))
    # q/p - 1 - log(q/p) = 0.5 - 1 + log 2
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([[0.5 - 1 + log2]]))
    # and the other way round: q/p = 2 -> 2 - 1 - log 2, k1 negative
    torch.testing.assert_close(kl_penalty(ref, logp, "k3"), torch.tensor([[2 - 1 - log2]]))
    torch.testing.assert_close(kl_penalty(ref, logp, "k1"), torch.tensor([[-log2]]))
    for estimator in ("k1", "k2", "k3"):
        assert kl_penalty(logp, logp, estimator).item() == 0.0
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_k3_nonnegative():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    true_kl = float((p * (p / q).log()).sum())
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    logp, ref = p.log()[tokens], q.log()[tokens]
    k1, k3 = kl_penalty(logp, ref, "k1"), kl_penalty(logp, ref, "k3")
    assert abs(k1.mean().item() - true_kl) < 0.01
    assert abs(k3.mean().item() - true_kl) < 0.01
    assert (k3 >= 0).all()


# ---------------------------------------------------------------- token rewards


def test_score_lands_on_last_real_response_token():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right-padded response: last is 2
            [0, 0, 1, 1, 0],  # left-padded prompt, then response, then pad: last is 3 (sum - 1 = 1)
            [0, 1, 1, 1, 1],  # never ended (cut at max length): last is 4
            [0, 0, 0, 0, 0],  # no response: no score
        ]
    )
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    zeros = torch.zeros(4, 5)
    rewards, kl = compute_token_rewards(scores, zeros, zeros, mask, kl_coef=0.1)
    expected = torch.zeros(4, 5)
    expected[0, 2], expected[1, 3], expected[2, 4] = 1.0, 2.0, 3.0
    torch.testing.assert_close(rewards, expected)
    assert kl.abs().sum().item() == 0.0


def test_token_rewards_kl_part_masked():
    mask = torch.tensor([[0, 1, 1, 0]])  # prompt token, two response tokens, pad
    # log r = +0.5 on the response; garbage on prompt and pad must not leak
    logp = torch.tensor([[9.0, -1.0, -2.0, 7.0]])
    ref = torch.tensor([[-9.0, -1.5, -2.5, -7.0]])
    rewards, kl = compute_token_rewards(torch.tensor([1.0]), logp, ref, mask, kl_coef=0.2, estimator="k1")
    torch.testing.assert_close(kl, torch.tensor([[0.0, 0.5, 0.5, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.1, -0.1 + 1.0, 0.0]]))

    _, kl2 = compute_token_rewards(torch.tensor([1.0]), logp, ref, mask, kl_coef=0.2, estimator="k2")
    torch.testing.assert_close(kl2, torch.tensor([[0.0, 0.125, 0.125, 0.0]]))


# ---------------------------------------------------------------- GAE


def test_gae_hand_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    gamma, lam = 0.9, 0.8
    delta2 = 1.0 + gamma * 0.0 - 0.7  # nothing after the last token
    delta1 = 0.0 + gamma * 0.7 - 0.6
    delta0 = 0.0 + gamma * 0.6 - 0.5
    a2 = delta2
    a1 = delta1 + gamma * lam * a2
    a0 = delta0 + gamma * lam * a1
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7]]))


def reference_gae(rewards, values, mask, gamma, lam):
    """Plain python GAE over each row's real tokens only, scattered back."""
    batch, seq = len(rewards), len(rewards[0])
    adv = [[0.0] * seq for _ in range(batch)]
    ret = [[0.0] * seq for _ in range(batch)]
    for b in range(batch):
        idx = [t for t in range(seq) if mask[b][t]]
        last = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_value = values[b][idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
            ret[b][t] = last + values[b][t]
    return torch.tensor(adv), torch.tensor(ret)


def test_gae_matches_python_loop_with_masks():
    gen = torch.Generator().manual_seed(0)
    batch, seq = 6, 9
    rewards = torch.randn(batch, seq, generator=gen)
    values = torch.randn(batch, seq, generator=gen)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[0, :] = True  # full
    mask[1, 3:7] = True  # left-padded prompt and right padding
    mask[2, 5:] = True  # response runs to the end
    mask[3, 2:4] = True  # a hole (masked tool output) in the middle
    mask[3, 6:8] = True
    mask[4, 8] = True  # one token
    # row 5: no response at all
    advantages, returns = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    ref_adv, ref_ret = reference_gae(rewards.tolist(), values.tolist(), mask.tolist(), 0.95, 0.9)
    torch.testing.assert_close(advantages, ref_adv)
    torch.testing.assert_close(returns, ref_ret)
    assert advantages[~mask].abs().sum().item() == 0.0 and returns[~mask].abs().sum().item() == 0.0


def test_gae_is_detached():
    values = torch.randn(2, 4, requires_grad=True)
    advantages, returns = gae(torch.randn(2, 4), values, torch.ones(2, 4), 1.0, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad


# ---------------------------------------------------------------- whitening


def test_whiten_hand_values():
    x = torch.tensor([[1.0, 3.0, 5.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 3, unbiased var (4 + 0 + 4) / 2 = 4, std 2
    torch.testing.assert_close(whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        whiten(x, mask, shift_mean=False), torch.tensor([[2.0, 3.0, 4.0, 0.0]]), atol=1e-6, rtol=0
    )


# ---------------------------------------------------------------- clipped losses


def test_policy_loss_inside_and_outside_clip():
    # tokens: (advantage, ratio) -> per-token loss max(-A r, -A clip(r, 0.8, 1.2))
    #   (+1, 1.5): -1.5 vs -1.2 -> -1.2, clipped (no gradient)
    #   (+1, 1.1): inside the range -> -1.1
    #   (-1, 0.5): 0.5 vs 0.8 -> 0.8, clipped
    #   (-1, 1.5): 1.5 vs 1.2 -> 1.5, NOT clipped (the pessimistic bound keeps the gradient)
    #   (+1, 0.5): -0.5 vs -0.8 -> -0.5, not clipped
    # plus a padding token with a wild ratio that must not count
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, 5.0]])
    ratios = [1.5, 1.1, 0.5, 1.5, 0.5, 100.0]
    old_logp = torch.full((1, 6), -2.0)
    logp = (old_logp + torch.tensor([[math.log(r) for r in ratios]])).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    loss, metrics = policy_loss(logp, old_logp, adv, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 1.1 + 0.8 + 1.5 - 0.5) / 5))
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(2 / 5))
    approx_kl = 0.5 * sum(math.log(r) ** 2 for r in ratios[:5]) / 5
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(approx_kl))

    loss.backward()
    # d(-A r)/dlogp = -A r on unclipped tokens, 0 on clipped and padding
    expected_grad = [0.0, -1.1 / 5, 0.0, 1.5 / 5, -0.5 / 5, 0.0]
    torch.testing.assert_close(logp.grad, torch.tensor([expected_grad]))


def test_policy_loss_broadcasts_sequence_advantages():
    logp = torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    seq_adv = torch.tensor([0.5, -2.0])
    loss_seq, _ = policy_loss(logp, logp, seq_adv, mask)
    loss_tok, _ = policy_loss(logp, logp, seq_adv[:, None].expand(2, 4), mask)
    torch.testing.assert_close(loss_seq, loss_tok)
    # ratio 1 everywhere: -mean of the token advantages = -(2 * 0.5 + 3 * -2.0) / 5
    torch.testing.assert_close(loss_seq, torch.tensor(-(2 * 0.5 - 3 * 2.0) / 5))


def test_value_loss_inside_and_outside_clip():
    # old value 1.0, clip 0.2; per token 0.5 * max((V - R)^2, (Vclip - R)^2)
    #   V 1.5, R 2.0: 0.25 vs (1.2 - 2)^2 = 0.64 -> 0.64, clipped
    #   V 1.1, R 2.0: inside, 0.81 both -> 0.81, not clipped
    #   V 0.5, R 2.0: 2.25 vs (0.8 - 2)^2 = 1.44 -> 2.25, not clipped
    #   V 0.5, R 0.0: 0.25 vs 0.64 -> 0.64, clipped
    values = torch.tensor([[1.5, 1.1, 0.5, 0.5, 42.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, metrics = value_loss(values, old, returns, mask, clip_eps_value=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.64 + 0.81 + 2.25 + 0.64) / 4))
    torch.testing.assert_close(metrics["vf_clipfrac"], torch.tensor(2 / 4))
    loss.backward()
    # gradient of 0.5 (V - R)^2 / 4 = (V - R) / 4 where unclipped, 0 where clipped
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, (1.1 - 2.0) / 4, (0.5 - 2.0) / 4, 0.0, 0.0]]))


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -1e9, -1e9], [1e4, 0.0, 0.0, 0.0]]])
    expected = [math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), 0.0]
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([expected]), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- critic-free advantages


def test_grpo_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    eps = 1e-6
    # group 1: mean 2, sample std sqrt(((1)^2 + 0 + 1^2) / 2) = 1; group 2: identical scores -> 0
    expected = [-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0, 0.0, 0.0]
    torch.testing.assert_close(grpo_advantages(scores, group_size=3, eps=eps), torch.tensor(expected))

    # G = 2: mean 0.5, sample std sqrt(0.5)
    std = math.sqrt(0.5)
    torch.testing.assert_close(grpo_advantages(torch.tensor([0.0, 1.0]), 2), torch.tensor([-0.5, 0.5]) / (std + 1e-6))
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(scores, group_size=4)


def test_rloo_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0, 8.0])
    # baselines: group 1 (2+3)/2, (1+3)/2, (1+2)/2; group 2 (4+8)/2, (0+8)/2, (0+4)/2
    expected = [1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 6.0, 4 - 4.0, 8 - 2.0]
    torch.testing.assert_close(rloo_advantages(scores, group_size=3), torch.tensor(expected))
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(scores, group_size=1)


def test_reinforce_pp_advantages_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    gamma = 0.5
    # returns-to-go: row 0 [0.25, 0.5, 1], row 1 [0 + 0.5 * 2, 2, pad]
    real = [0.25, 0.5, 1.0, 1.0, 2.0]
    mean, std = statistics.mean(real), statistics.stdev(real)  # stdev: sample (n - 1)
    w = [(x - mean) / math.sqrt(std**2 + 1e-8) for x in real]
    expected = torch.tensor([[w[0], w[1], w[2]], [w[3], w[4], 0.0]])
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, gamma), expected)


# ---------------------------------------------------------------- KL controllers


def test_kl_controllers():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    ctl.update(current_kl=9.0, n_steps=256)  # error 0.5, clipped to 0.2
    expected = 0.2 * (1 + 0.2 * 256 / 10_000)
    assert ctl.value == pytest.approx(expected)
    ctl.update(current_kl=6.6, n_steps=256)  # error 0.1
    expected *= 1 + 0.1 * 256 / 10_000
    assert ctl.value == pytest.approx(expected)
    ctl.update(current_kl=0.0, n_steps=100)  # error -1, clipped to -0.2
    expected *= 1 - 0.2 * 100 / 10_000
    assert ctl.value == pytest.approx(expected)

    fixed = FixedKLController(0.05)
    fixed.update(current_kl=100.0, n_steps=1000)
    assert fixed.value == 0.05
