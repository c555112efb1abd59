"""ftdist's losses against TRL 1.16's own code, on the same tiny models and batches.

TRL computes its losses inside trainer methods; each test calls them on a bare trainer
instance (tests/trl_bare.py).
"""

from types import SimpleNamespace

import pytest
import torch

from ftdist.algos.dpo import dpo_loss, orpo_loss
from ftdist.algos.ppo import entropy_from_logits
from ftdist.algos.reward import gather_last, pairwise_reward_loss
from ftdist.algos.sft import sequence_logprobs
from tests.trl_bare import bare

pytestmark = pytest.mark.unit

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

VOCAB = 64
# Both sides evaluate the same fp32 formulas on the same tensors, only with operations in another order
# (log-sigmoid against softplus, sum-then-mean against mean): a few ulps of values of size <= ~100 (sequence
# log-probs), ~1e-6 relative. 1e-5 is 10x that; atol covers values that are ~0 (rewards at the reference).
TOL = dict(atol=1e-5, rtol=1e-5)


def _tiny_llama_config(**extra):
    # initializer_range well above the default so policy and reference disagree
    # enough for hinge and IPO to leave their flat regions on some pairs.
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        initializer_range=0.2,
        **extra,
    )


@pytest.fixture(scope="module")
def dpo_setup():
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM(_tiny_llama_config()).eval()
    reference = transformers.LlamaForCausalLM(_tiny_llama_config()).eval()
    # what DPOTrainer.__init__ does to the models; the plain forward stays available
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)

    # 4 pairs, rows [chosen; rejected] as TRL's collator lays them out,
    # prompts of different lengths and right padding of different lengths
    n_pairs, seq = 4, 12
    input_ids = torch.randint(1, VOCAB, (2 * n_pairs, seq))
    attention_mask = torch.ones(2 * n_pairs, seq, dtype=torch.long)
    completion_mask = torch.zeros(2 * n_pairs, seq, dtype=torch.long)
    for row in range(2 * n_pairs):
        prompt_len, end = 2 + row % 3, seq - (row * 5) % 4
        completion_mask[row, prompt_len:end] = 1
        attention_mask[row, end:] = 0
        input_ids[row, end:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    # with this seed every pair starts out "won"; swapping the first pair gives
    # the losses a pair on the wrong side of the boundary as well
    order = torch.tensor([n_pairs, 1, 2, 3, 0, 5, 6, 7])
    batch = {k: v[order] for k, v in batch.items()}
    return policy, reference, batch


def _ftdist_logps(policy, reference, batch):
    """Full logits from the plain forward, ftdist's own shift and mask -> 4 x (n_pairs,) and lengths."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    labels = input_ids.masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        policy_logps = sequence_logprobs(policy(input_ids, attention_mask=attention_mask).logits, labels)
        ref_logps = sequence_logprobs(reference(input_ids, attention_mask=attention_mask).logits, labels)
    policy_chosen, policy_rejected = policy_logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    chosen_lengths, rejected_lengths = batch["completion_mask"].sum(dim=1).chunk(2)
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths


def _trl_dpo(policy, reference, batch, loss_type, beta):
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = bare(
        DPOTrainer,
        model=policy,
        ref_model=reference,
        precompute_ref_logps=False,
        aux_loss_enabled=False,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    with torch.no_grad():
        loss = trainer._compute_loss(policy, dict(batch), return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}  # eval: the models are in eval mode
    return loss, metrics


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_matches_trl(dpo_setup, loss_type, beta):
    policy, reference, batch = dpo_setup
    trl_loss, trl_metrics = _trl_dpo(policy, reference, batch, loss_type, beta)

    policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths = _ftdist_logps(
        policy, reference, batch
    )
    loss, metrics = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
    )  # fmt: skip

    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        torch.testing.assert_close(metrics[key], torch.tensor(trl_metrics[key]), **TOL, msg=key)
    # also checks sequence_logprobs (full logits) against TRL's fused LM head
    for key in ("logps/chosen", "logps/rejected"):
        torch.testing.assert_close(metrics[key], torch.tensor(trl_metrics[key]), **TOL, msg=key)


def test_dpo_batch_is_not_degenerate(dpo_setup):
    # guard for the test above: pairs on both sides of the decision boundary, and
    # at beta 0.5 hinge pairs both inside (loss > 0) and past the margin (loss 0)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, _, _ = _ftdist_logps(*dpo_setup)
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    assert (h < 0).any() and (h > 0).any()
    assert (0.5 * h > 1).any() and (0.5 * h < 1).any()


def test_reward_loss_and_last_token_pooling_match_trl():
    from trl.trainer.reward_trainer import RewardTrainer

    torch.manual_seed(1)
    model = transformers.LlamaForSequenceClassification(_tiny_llama_config(num_labels=1)).eval()
    # rows [chosen; rejected]; right padding, left padding and no padding mixed
    input_ids = torch.randint(1, VOCAB, (6, 7))
    attention_mask = torch.ones(6, 7, dtype=torch.long)
    attention_mask[0, 5:] = 0
    attention_mask[1, :3] = 0
    attention_mask[4, 6:] = 0
    attention_mask[5, :1] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    margin = torch.tensor([0.5, 0.0, 1.0])

    with torch.no_grad():
        # ftdist: per-token head values pooled at the last real token
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (6, 7, H)
        token_values = model.score(hidden).squeeze(-1)  # (6, 7)
        rewards = gather_last(token_values, attention_mask)  # (6,)
        hf_rewards = model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)
        torch.testing.assert_close(rewards, hf_rewards, **TOL)
        chosen, rejected = rewards.chunk(2)

        for extra in ({}, {"margin": margin}):
            trainer = bare(RewardTrainer, model=model, args=SimpleNamespace(center_rewards_coefficient=None))
            trl_loss = trainer.compute_loss(model, {"input_ids": input_ids, "attention_mask": attention_mask, **extra})
            loss, metrics = pairwise_reward_loss(chosen, rejected, margin=extra.get("margin"))
            torch.testing.assert_close(loss, trl_loss, **TOL)
            trl_metrics = trainer._metrics["eval"]
            torch.testing.assert_close(metrics["accuracy"], torch.tensor(trl_metrics["accuracy"][-1]), **TOL)
            torch.testing.assert_close(metrics["margin"], torch.tensor(trl_metrics["margin"][-1]), **TOL)


def test_orpo_matches_trl_odds_ratio_loss():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" warning on import
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    trainer = bare(ORPOTrainer, beta=0.25)
    torch.manual_seed(2)
    chosen = -torch.rand(8) * 3 - 1e-3  # length-averaged log-probs, some near 0
    rejected = -torch.rand(8) * 3 - 1e-3
    nll = torch.tensor(1.7)
    out = trainer.odds_ratio_loss(chosen, rejected)
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = out
    trl_loss = nll - losses.mean()  # as in ORPOTrainer.get_batch_loss_metrics
    loss, metrics = orpo_loss(chosen, rejected, nll, beta=0.25)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    torch.testing.assert_close(metrics["log_odds_ratio"], log_odds_ratio, **TOL)
    torch.testing.assert_close(metrics["log_odds_chosen"], log_odds_chosen, **TOL)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean(), **TOL)
    torch.testing.assert_close(metrics["rewards/rejected"], rejected_rewards.mean(), **TOL)


def test_entropy_matches_trl():
    from trl.trainer.utils import entropy_from_logits as trl_entropy

    torch.manual_seed(3)
    logits = torch.randn(2, 5, 17) * 4
    torch.testing.assert_close(entropy_from_logits(logits), trl_entropy(logits), **TOL)
