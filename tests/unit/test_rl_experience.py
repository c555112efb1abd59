"""Rollout bookkeeping by hand: response masks and EOS, left/right padding, column alignment,
the score at the last real token, advantages per estimator, and the config rules of stage ppo."""

import math
import sys

import pytest
import torch

from ftdist.algos.ppo import grpo_advantages, rloo_advantages
from ftdist.config import ConfigError, load_config
from ftdist.rl.advantages import compute_advantages, penalised_scores
from ftdist.rl.experience import (Experience, Rollout, action_logprobs, action_values, ends_with_eos,
                                  merge_rollouts, position_ids, response_mask)
from ftdist.rl.prompts import PromptSampler, PromptSet
from ftdist.rl.workers import call_reward_fn, update_steps
from ftdist.run.seeding import derive_seed

pytestmark = pytest.mark.unit

EOS, PAD = 2, 0


def test_response_mask_stops_at_first_eos_and_counts_missing_eos():
    # row 0 ends early (generate pads after EOS), row 1 never emits EOS, row 2 emits EOS first,
    # row 3 has pad == eos-like repeats after its EOS
    resp = torch.tensor([[7, 8, EOS, PAD, PAD],
                         [7, 8, 9, 10, 11],
                         [EOS, PAD, PAD, PAD, PAD],
                         [5, EOS, EOS, EOS, EOS]])
    mask = response_mask(resp, EOS)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert ends_with_eos(resp, mask, EOS).tolist() == [True, False, True, True]


def test_position_ids_skip_left_padding():
    am = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids(am).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


def _rollout(prompt, resp, eos=EOS):
    prompt_ids = torch.tensor([prompt])
    response = torch.tensor([resp])
    mask = response_mask(response, eos)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=(prompt_ids != PAD).long(), response_ids=response,
                   action_mask=mask, finished=ends_with_eos(response, mask, eos), prompts=["p"], responses=["r"])


def test_merge_pads_prompts_left_and_responses_right():
    a = _rollout([PAD, 4, 5], [7, EOS])  # prompt width 3, response width 2
    b = _rollout([6], [8, 9, 10])  # prompt width 1, response width 3, no EOS
    m = merge_rollouts([a, b], PAD)
    assert m.prompt_ids.tolist() == [[PAD, 4, 5], [PAD, PAD, 6]]
    assert m.prompt_mask.tolist() == [[0, 1, 1], [0, 0, 1]]
    assert m.response_ids.tolist() == [[7, EOS, PAD], [8, 9, 10]]
    assert m.action_mask.tolist() == [[True, True, False], [True, True, True]]
    assert m.finished.tolist() == [True, False]
    exp = Experience.from_rollout(m, {"answer": ["x", "y"]})
    assert exp.sequences.tolist() == [[PAD, 4, 5, 7, EOS, PAD], [PAD, PAD, 6, 8, 9, 10]]
    assert exp.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert exp.response_lengths().tolist() == [2, 3]


def test_action_logprobs_and_values_read_the_column_before_each_response_token():
    # S = 5 (P = 2, R = 3); logits at column t predict the token at t + 1
    vocab = 6
    seq = torch.tensor([[1, 2, 3, 4, 5]])
    logits = torch.randn(1, 5, vocab)
    lp = action_logprobs(logits, seq, num_actions=3)
    expected = torch.log_softmax(logits, -1)[0, [1, 2, 3], [3, 4, 5]]
    torch.testing.assert_close(lp[0], expected)
    values = torch.arange(5.0).unsqueeze(0)  # value of the prefix ending at each column
    assert action_values(values, 3).tolist() == [[1.0, 2.0, 3.0]]


def _experience(scores, action_mask, values=None, finished=None, old=None, ref=None):
    action_mask = torch.tensor(action_mask, dtype=torch.bool)
    B, R = action_mask.shape
    exp = Experience(sequences=torch.zeros(B, R + 2, dtype=torch.long),
                     attention_mask=torch.cat([torch.ones(B, 2, dtype=torch.long), action_mask.long()], 1),
                     action_mask=action_mask,
                     finished=torch.tensor(finished if finished is not None else [True] * B))
    exp.scores = torch.tensor(scores, dtype=torch.float32)
    exp.old_logp = torch.zeros(B, R) if old is None else torch.tensor(old)
    exp.ref_logp = torch.zeros(B, R) if ref is None else torch.tensor(ref)
    exp.values = None if values is None else torch.tensor(values)
    return exp


def _ppo_cfg(**kw):
    base = ["stage=ppo", "data.train=x.jsonl", "ppo.reward_fn=m:f", "ppo.rollout_batch_size=4",
            "ppo.mini_batch_size=4", "train.micro_batch_size=1"]
    return load_config(None, base + [f"ppo.{k}={v}" for k, v in kw.items()]).ppo


def test_ppo_advantages_put_the_score_on_the_last_real_token_and_match_a_plain_loop():
    # response of 2 real tokens then padding: the score must land at column 1, not at column R - 1
    exp = _experience([1.0], [[1, 1, 0, 0]], values=[[0.5, 0.25, 9.0, 9.0]],
                      old=[[-1.0, -2.0, 0.0, 0.0]], ref=[[-1.5, -2.0, 0.0, 0.0]])
    cfg = _ppo_cfg(gamma=0.9, lam=0.8, whiten_advantages="false")
    exp, stats = compute_advantages(exp, cfg, kl_coef=0.1)
    # k1 KL: 0.5 at t0, 0 at t1 -> rewards r0 = -0.05, r1 = 1.0
    torch.testing.assert_close(exp.rewards, torch.tensor([[-0.05, 1.0, 0.0, 0.0]]))
    # plain GAE by hand: d1 = 1 - 0.25, A1 = d1; d0 = -0.05 + 0.9 * 0.25 - 0.5, A0 = d0 + 0.9 * 0.8 * A1
    a1 = 1.0 - 0.25
    a0 = (-0.05 + 0.9 * 0.25 - 0.5) + 0.72 * a1
    torch.testing.assert_close(exp.advantages, torch.tensor([[a0, a1, 0.0, 0.0]]))
    torch.testing.assert_close(exp.returns, torch.tensor([[a0 + 0.5, a1 + 0.25, 0.0, 0.0]]))
    assert stats["kl"] == pytest.approx(0.5) and stats["response_len"] == 2 and stats["no_eos"] == 0


def test_ppo_advantages_are_whitened_over_real_tokens_only():
    exp = _experience([1.0, 0.0], [[1, 1, 1], [1, 0, 0]], values=[[0.0] * 3, [0.0] * 3])
    exp, _ = compute_advantages(exp, _ppo_cfg(whiten_advantages="true"), kl_coef=0.0)
    real = exp.advantages[exp.action_mask]
    assert abs(real.mean().item()) < 1e-6 and real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert exp.advantages[~exp.action_mask].abs().max() == 0


def test_grpo_and_rloo_broadcast_group_advantages_over_each_response():
    scores = [1.0, 0.0, 0.5, 0.5]  # two prompts x two samples
    mask = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    exp, stats = compute_advantages(_experience(scores, mask), _ppo_cfg(algorithm="grpo", samples_per_prompt=2,
                                                                       rollout_batch_size=2), kl_coef=0.1)
    per_seq = grpo_advantages(torch.tensor(scores), 2)
    torch.testing.assert_close(exp.advantages, per_seq.unsqueeze(-1) * torch.tensor(mask))
    assert stats["reward_mean"] == pytest.approx(0.5)
    # rloo: KL folds into the sequence reward before the leave-one-out baseline
    old = [[-1.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0] * 3, [0.0] * 3]
    ref = [[-2.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0] * 3, [0.0] * 3]
    exp, _ = compute_advantages(_experience(scores, mask, old=old, ref=ref),
                                _ppo_cfg(algorithm="rloo", samples_per_prompt=2, rollout_batch_size=2), kl_coef=0.1)
    seq_reward = torch.tensor([1.0 - 0.1 * 1.0, 0.0, 0.5, 0.5])
    torch.testing.assert_close(exp.advantages[:, 0], rloo_advantages(seq_reward, 2))


def test_reinforce_pp_uses_kl_shaped_token_rewards_without_a_critic():
    exp = _experience([1.0, 0.0], [[1, 1], [1, 0]])
    exp, _ = compute_advantages(exp, _ppo_cfg(algorithm="reinforce_pp", rollout_batch_size=2, mini_batch_size=2),
                                kl_coef=0.0)
    # returns-to-go 1, 1 | 0 -> whitened over the three real tokens
    r = torch.tensor([1.0, 1.0, 0.0])
    expected = (r - r.mean()) / r.std()
    torch.testing.assert_close(exp.advantages[exp.action_mask], expected, atol=1e-4, rtol=1e-4)
    assert exp.returns is None


def test_missing_eos_is_penalised_when_asked_and_always_counted():
    scores = torch.tensor([1.0, 1.0])
    finished = torch.tensor([True, False])
    assert penalised_scores(scores, finished, None).tolist() == [1.0, 1.0]
    assert penalised_scores(scores, finished, 0.5).tolist() == [1.0, 0.5]
    exp = _experience([1.0, 1.0], [[1, 1], [1, 1]], values=[[0.0, 0.0]] * 2, finished=[True, False])
    exp, stats = compute_advantages(exp, _ppo_cfg(missing_eos_penalty=0.5, whiten_advantages="false",
                                                  rollout_batch_size=2, mini_batch_size=2), kl_coef=0.0)
    assert stats["no_eos"] == 1 and stats["reward_mean"] == 1.0  # the raw score is what is reported
    assert exp.rewards[:, -1].tolist() == [1.0, 0.5]


def test_experience_select_split_concat_round_trip():
    exp = _experience([0.0, 1.0, 2.0, 3.0], [[1, 0]] * 4)
    exp.prompts, exp.responses, exp.extras = list("abcd"), list("ABCD"), {"answer": [0, 1, 2, 3]}
    parts = exp.split(2)
    assert [p.prompts for p in parts] == [["a", "b"], ["c", "d"]]
    back = Experience.concat(parts)
    assert back.scores.tolist() == exp.scores.tolist() and back.extras == exp.extras
    picked = exp.select(torch.tensor([3, 0]))
    assert picked.scores.tolist() == [3.0, 0.0] and picked.responses == ["D", "A"] and picked.extras["answer"] == [3, 0]
    assert exp.without_text().select([1]).prompts == []


def test_prompt_sampler_is_seeded_and_resumes_from_its_position():
    prompts = PromptSet([str(i) for i in range(5)], {"answer": list(range(5))})
    a = PromptSampler(prompts, seed=3)
    batches = [a.next_batch(3).texts for _ in range(4)]  # crosses two epoch boundaries
    assert sorted(batches[0] + batches[1][:2]) == [str(i) for i in range(5)]  # epoch 0 is a permutation
    b = PromptSampler(prompts, seed=3)
    b.next_batch(3)
    resumed = PromptSampler(prompts, seed=3, **b.state())
    assert [resumed.next_batch(3).texts for _ in range(3)] == batches[1:]


def test_reward_fn_gets_only_the_columns_it_names():
    def by_answer(prompts, responses, answer):
        return [float(r == a) for r, a in zip(responses, answer)]

    extras = {"answer": ["1 2", "3"], "source": ["x", "y"]}
    assert call_reward_fn(by_answer, ["p", "q"], ["1 2", "4"], extras).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="finite"):
        call_reward_fn(lambda p, r: [math.nan] * len(r), ["p"], ["r"], {})
    with pytest.raises(ValueError, match="1 scores for 2"):
        call_reward_fn(lambda p, r: [1.0], ["p", "q"], ["r", "s"], {})


def test_derived_seeds_differ_by_part_and_repeat_exactly():
    assert derive_seed(42, 3, 0) == derive_seed(42, 3, 0)
    assert len({derive_seed(42, it, r) for it in range(10) for r in range(4)}) == 40


def test_ppo_config_rules():
    base = ["stage=ppo", "data.train=x.jsonl", "ppo.reward_fn=ftdist.data.tiny_task:sort_reward"]

    def bad(*overrides, match):
        with pytest.raises(ConfigError, match=match):
            load_config(None, base + list(overrides))

    bad("ppo.algorithm=grpo", match="needs >= 2")
    bad("ppo.reward_model=/rm", match="exactly one")
    bad("ppo.reward_fn=no_colon", "ppo.reward_model=null", match="module:function")
    bad("ppo.rollout_batch_size=6", match="must divide the samples")
    bad("ppo.policy_ranks=3", "ppo.mini_batch_size=16", match="policy_ranks=3 must divide")
    bad("ppo.mini_batch_size=4", "train.micro_batch_size=4", "ppo.policy_ranks=2", match="not a multiple")
    bad("ppo.colocation=policy_ref", "ppo.policy_ranks=2", "ppo.mini_batch_size=8", match="must be equal")
    bad("ppo.colocation=critic_reward", "ppo.algorithm=grpo", "ppo.samples_per_prompt=2", match="no critic group")
    bad("ppo.max_new_tokens=4096", match="no room for the prompt")
    bad("ppo.critic_init=reward_model", match="needs ppo.reward_model")
    bad("ppo.top_p=0", match="top_p")
    cfg = load_config(None, base + ["ppo.iterations=3", "ppo.ppo_epochs=2", "ppo.rollout_batch_size=8",
                                    "ppo.samples_per_prompt=2", "ppo.mini_batch_size=4",
                                    "train.micro_batch_size=2"])
    assert update_steps(cfg) == 3 * 2 * 4


def test_import_ftdist_rl_pulls_in_neither_ray_nor_deepspeed():
    import subprocess

    code = ("import sys, ftdist, ftdist.config, ftdist.rl.experience, ftdist.rl.advantages, ftdist.rl.workers, "
            "ftdist.rl.prompts, ftdist.rl.entry; "
            "print(sorted(m for m in ('ray', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_colocation_decides_which_groups_share_bundles():
    from ftdist.config import colocated_sets as sharing

    roles = ["policy", "critic", "ref", "reward"]
    assert sharing("none", roles) == [("policy",), ("critic",), ("ref",), ("reward",)]
    assert sharing("policy_ref", roles) == [("policy", "ref"), ("critic",), ("reward",)]
    assert sharing("ref_reward", roles) == [("ref", "reward"), ("policy",), ("critic",)]
    assert sharing("all", roles) == [("policy", "critic", "ref", "reward")]
    # model.lora: no reference group, so policy_ref leaves the policy alone
    assert sharing("policy_ref", ["policy", "critic", "reward"]) == [("policy",), ("critic",), ("reward",)]


def test_trimmed_micro_batches_give_the_untrimmed_logprobs():
    """Rows of similar length trimmed of their all-padding columns: the same per-token log-probs, fewer columns."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    parts = [_rollout([PAD, PAD, PAD, 4, 5], [7, EOS, PAD, PAD, PAD, PAD]),
             _rollout([PAD, PAD, 6, 4, 5], [8, 9, EOS, PAD, PAD, PAD]),
             _rollout([9, 9, 6, 4, 5], [8, 9, 10, 11, 12, EOS]),
             _rollout([PAD, PAD, PAD, PAD, 5], [7, 7, EOS, PAD, PAD, PAD])]
    exp = Experience.from_rollout(merge_rollouts(parts, PAD))
    exp.advantages = torch.randn(exp.action_mask.shape) * exp.action_mask
    order = exp.by_length()
    assert order.tolist() == [0, 3, 1, 2]  # response lengths 2, 3, 3, 6; of the two 3s the shorter prompt first
    short = exp.select(order[:2]).trimmed()
    # rows 0 and 3: prompts of 2 and 1 real tokens, responses of 2 and 3: 2 prompt + 3 response columns remain
    assert short.sequences.shape == (2, 5) and short.num_actions == 3
    assert torch.equal(short.advantages, exp.advantages[order[:2], :3])

    def logps(e):
        am = e.attention_mask
        logits = model(input_ids=e.sequences, attention_mask=am, position_ids=position_ids(am)).logits
        return action_logprobs(logits, e.sequences, e.num_actions) * e.action_mask

    with torch.no_grad():
        full = logps(exp.select(order[:2]))
        trimmed = logps(short)
    # the same real tokens at the same positions; only masked padding columns are gone, so the attention sums
    # are over the same terms (exactly zero weights dropped): fp32 rounding of reordered sums, ~1e-7 relative
    # on log-probs of size ~3.5; 1e-5 is 30x that
    assert float((full[:, :3] - trimmed).abs().max()) < 1e-5 and float(full[:, 3:].abs().max()) == 0.0


def test_the_done_line_counts_what_this_process_did():
    """A finished checkpoint resumed into a new directory runs nothing, and says so (not the checkpoint's totals)."""
    from ftdist.rl.driver import PPODriver

    cfg = load_config("ppo_tiny", ["ppo.iterations=3"])
    saved = {"iteration": 2, "samples": 8, "elapsed_s": 3.0, "kl_coef": 0.05, "prompts": {"epoch": 0, "position": 4}}
    driver = PPODriver(cfg, {}, PromptSet(["a", "b"], {}), None, 0, "run")
    driver.restore(saved)
    assert driver.summary() == "0 iterations, 0 samples in 0.0s (resumed at iteration 2; 2 of 3 done in all)"
    driver.iteration, driver.samples, driver.elapsed = 3, 12, 4.5  # what iterate() adds for one more iteration
    assert driver.summary() == "1 iterations, 4 samples in 1.5s (resumed at iteration 2; 3 of 3 done in all)"
    fresh = PPODriver(cfg, {}, PromptSet(["a", "b"], {}), None, 0, "run")
    fresh.iteration, fresh.samples, fresh.elapsed = 3, 12, 4.5
    assert fresh.summary() == "3 iterations, 12 samples in 4.5s"
