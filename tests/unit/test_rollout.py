"""The hf rollout engine's decoding loop against transformers' generate: a prompt encoded once for its samples,
finished rows leaving the batch, chunks of ppo.generate_batch_size; the same tokens greedily, and the log-probs
of the sampled tokens those of a full forward."""

import pytest
import torch

from ftdist.rl.experience import action_logprobs, position_ids, response_mask
from ftdist.rl.rollout import _processors, decode, prompt_runs

pytestmark = pytest.mark.unit

PAD = 0


class _Tok:
    eos_token_id = None


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, pad_token_id=PAD))
    return m.eval()


def _prompts():
    """Three left-padded prompts of different lengths: (U, P) ids and mask."""
    rows = [[5, 9, 11, 3, 7], [12, 4], [8, 8, 30, 2]]
    P = max(map(len, rows))
    ids = torch.tensor([[PAD] * (P - len(r)) + r for r in rows])
    return ids, (ids != PAD).long()


def _eos_that_ends_rows_at_different_steps(model, ids, mask, steps):
    """A token the greedy continuations reach at different steps (so rows finish at different times)."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                         pad_token_id=PAD, eos_token_id=None, repetition_penalty=1.3)[:, ids.size(1):]
    for tok in out[0].tolist() + out[1].tolist() + out[2].tolist():
        first = [(row == tok).nonzero()[0].item() if (row == tok).any() else steps for row in out]
        # min_new_tokens=1 below: an EOS at step 0 is not allowed, and would change the continuation
        if len(set(first)) >= 2 and 1 <= min(first) < steps - 2 and tok != PAD:
            return tok
    pytest.fail(f"no token ends the greedy rows at different steps: {out.tolist()}")


def test_prompt_runs_groups_consecutive_duplicates():
    assert prompt_runs(["a", "a", "b", "a", "a", "a"]) == (["a", "b", "a"], [2, 1, 3])
    assert prompt_runs([]) == ([], [])


@pytest.mark.parametrize("repeats,drop", [([1, 1, 1], True), ([3, 1, 2], True), ([3, 1, 2], False)])
def test_greedy_tokens_equal_generate_with_rows_leaving(model, repeats, drop):
    ids, mask = _prompts()
    steps = 12
    eos = _eos_that_ends_rows_at_different_steps(model, ids, mask, steps)
    tok = _Tok()
    tok.eos_token_id = eos
    procs = _processors(tok, do_sample=False, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.3,
                        min_new_tokens=1, prompt_width=ids.size(1))
    tokens, logps = decode(model, ids, mask, repeats, max_new_tokens=steps, eos_token_id=eos, pad_token_id=PAD,
                           logprob_temperature=1.0, processors=procs, do_sample=False, drop_finished=drop)
    expand = torch.repeat_interleave(torch.arange(3), torch.tensor(repeats))
    ref = model.generate(input_ids=ids[expand], attention_mask=mask[expand], max_new_tokens=steps, do_sample=False,
                         pad_token_id=PAD, eos_token_id=eos, repetition_penalty=1.3, min_new_tokens=1)[:, ids.size(1):]
    R = ref.size(1)
    assert tokens.size(1) == R  # decoding stopped when the last row did, as generate does
    ref_mask = response_mask(ref, eos)
    assert torch.equal(tokens.masked_fill(~ref_mask, PAD), ref.masked_fill(~ref_mask, PAD))
    assert bool((tokens[~ref_mask] == PAD).all())  # nothing but padding after a row's EOS
    lengths = ref_mask.sum(1)
    assert lengths.min() < lengths.max()  # some rows left the batch before others: the case under test


def test_sampled_logprobs_are_the_full_forward_and_the_groups_differ(model):
    ids, mask = _prompts()
    repeats, temperature = [4, 2, 3], 0.7
    tok = _Tok()
    tok.eos_token_id = 47
    procs = _processors(tok, do_sample=True, temperature=temperature, top_p=1.0, top_k=0, repetition_penalty=1.0,
                        min_new_tokens=0, prompt_width=ids.size(1))
    torch.manual_seed(3)
    tokens, logps = decode(model, ids, mask, repeats, max_new_tokens=10, eos_token_id=47, pad_token_id=PAD,
                           logprob_temperature=temperature, processors=procs, do_sample=True)
    expand = torch.repeat_interleave(torch.arange(3), torch.tensor(repeats))
    amask = response_mask(tokens, 47)
    seq = torch.cat([ids[expand], tokens.masked_fill(~amask, PAD)], dim=1)
    full_mask = torch.cat([mask[expand], amask.long()], dim=1)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=full_mask, position_ids=position_ids(full_mask)).logits
    full = action_logprobs(logits.float() / temperature, seq, tokens.size(1))
    # the same fp32 model through a KV cache (one query row at a time) and through one full pass: the sums differ
    # in order only, ~1e-7 relative on log-probs of size ~4 (~1e-6 absolute); 1e-5 is 10x that
    assert float(((full - logps) * amask).abs().max()) < 1e-5
    assert not torch.equal(tokens[0], tokens[1])  # the samples of one prompt are drawn independently
