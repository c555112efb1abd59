"""Padding-free pair batches (data.packing for rm, dpo, orpo): the same numbers as padded batches.

A packed micro-batch is one row holding every chosen and rejected sequence of its pairs end to end, attention
kept within each sequence. Per pair, the sequence log-probs, rewards, losses, metrics and gradients must equal
the padded batch's for every DPO loss type, ORPO and the reward model, with and without LoRA; the planner must
keep each step's pairs and split them into micro-batches of whole pairs within the token budget, the same number
on every rank.
"""

import pytest
import torch

from ftdist.algos.sft import IGNORE_INDEX
from ftdist.data.preference import collate_pairs
from tests.unit.test_preference_trl_e2e import TEXT_ROWS, _chat_rows, _task, models  # noqa: F401

pytestmark = pytest.mark.unit
# The same fp32 model on another batch layout (one long row instead of 2B padded rows; attention per sequence
# instead of over the padded row): each matmul sums the same products in another blocking, ~1e-6 relative per
# logit, and sums over a sequence keep that relative size. 1e-5 is 10x that; atol covers values that are ~0.
TOL = dict(atol=1e-5, rtol=1e-5)
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def _scored(rows):
    return [{**r, "score_chosen": float(8 - i), "score_rejected": float(i), "margin": 0.5 * i}
            for i, r in enumerate(rows)]


def _pair_tasks(tmp_path, rows, stage, models, lora, **section):
    """(padded task, packed task, engine shared by both, padded batch, packed batch) on the same weights."""
    name = models["rm"] if stage == "rm" else models["policy"]
    model = {"name_or_path": name, **({"lora": LORA} if lora else {})}
    if stage == "dpo":
        section.setdefault("dpo", {})["reference_model"] = models["base"]
    padded, engine, pbatch = _task(tmp_path, rows, stage=stage, model=dict(model), **section)
    packed, _, kbatch = _task(tmp_path, rows, data={"packing": True}, stage=stage, model=dict(model), **section)
    if lora:
        with torch.no_grad():  # move the adapter away from its zero start, so that it matters
            torch.manual_seed(1)
            for n, p in engine.module.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return padded, packed, engine, pbatch, kbatch


def _loss_and_grads(task, engine, batch):
    engine.module.zero_grad()
    loss, sums = task.loss(engine, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in engine.module.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), {k: v.detach() for k, v in sums.items()}, grads


def test_packed_batch_is_one_row_of_the_sequences():
    class Pairs:  # (prompt, chosen, rejected) token lists and the scores table PreferenceData has
        items = [([5, 6, 7], [8, 9], [10]), ([11], [12, 13, 14], [15, 16]), ([], [17, 18], [19])]
        scores = torch.full((3, 3), float("nan"))

        def __getitem__(self, i):
            return self.items[i]

    data = Pairs()
    padded = collate_pairs([0, 1, 2], data, pad_id=0)
    packed = collate_pairs([0, 1, 2], data, pad_id=0, packed=True)
    seqs = [p + c for p, c, _ in data.items] + [p + r for p, _, r in data.items]  # chosen first, then rejected
    assert packed.input_ids.tolist() == [sum(seqs, [])]
    assert packed.seq_ids.tolist() == [sum(([k + 1] * len(s) for k, s in enumerate(seqs)), [])]
    assert packed.position_ids.tolist() == [sum((list(range(len(s))) for s in seqs), [])]
    assert packed.n_padded == packed.n_tokens == sum(map(len, seqs)) < padded.n_padded
    # targets: the response tokens, never a sequence's first token (the third pair has no prompt)
    targets = [t for t, y in zip(packed.input_ids[0].tolist(), packed.labels[0].tolist()) if y != IGNORE_INDEX]
    assert targets == [8, 9, 12, 13, 14, 18, 10, 15, 16]
    assert packed.response_lengths.tolist() == padded.response_lengths.tolist() == [2, 3, 1, 1, 2, 0]
    assert packed.chosen_text_mask().sum() == padded.chosen_text_mask().sum() == 4 + 3 + 1


def test_reward_pooling_takes_each_sequences_last_token():
    from ftdist.algos.reward import gather_last_per_sequence

    values = torch.arange(10.0)[None]  # (1, 10)
    seq_ids = torch.tensor([[1, 1, 1, 2, 2, 3, 3, 3, 3, 0]])
    assert gather_last_per_sequence(values, seq_ids, 3).tolist() == [2.0, 4.0, 8.0]


CASES = {
    "dpo_sigmoid": ("dpo", {"dpo": {"loss_type": "sigmoid", "beta": 0.1}}),
    "dpo_sigmoid_smoothed": ("dpo", {"dpo": {"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.2}}),
    "dpo_ipo": ("dpo", {"dpo": {"loss_type": "ipo", "beta": 0.5}}),
    "dpo_hinge": ("dpo", {"dpo": {"loss_type": "hinge", "beta": 0.5}}),
    "orpo_trl": ("orpo", {"orpo": {"beta": 0.25, "nll": "trl"}}),
    "orpo_pair_mean": ("orpo", {"orpo": {"beta": 0.25, "nll": "pair_mean"}}),
    "rm": ("rm", {}),
    "rm_margin": ("rm", {"rm": {"margin": "column"}}),
}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_equals_padded(models, tmp_path, case, lora):
    stage, section = CASES[case]
    rows = _scored(_chat_rows()) if case == "rm_margin" else _chat_rows()
    padded, packed, engine, pbatch, kbatch = _pair_tasks(tmp_path, rows, stage, models, lora, **section)
    assert kbatch.input_ids.shape[0] == 1 and kbatch.n_padded == kbatch.n_tokens < pbatch.n_padded
    with torch.no_grad():  # per pair: the numbers the loss is made of
        if stage == "rm":
            torch.testing.assert_close(packed.rewards(engine, kbatch), padded.rewards(engine, pbatch), **TOL)
        else:
            for average in (False, True):
                torch.testing.assert_close(packed.policy_logps(engine, kbatch, average),
                                           padded.policy_logps(engine, pbatch, average), **TOL)
        if stage == "dpo":
            ref = padded.reference.logps(engine, pbatch)
            assert (ref - padded.policy_logps(engine, pbatch)).abs().max() > 1e-2  # a reference unlike the policy
            torch.testing.assert_close(packed.reference.logps(engine, kbatch), ref, **TOL)
    loss_p, sums_p, grads_p = _loss_and_grads(padded, engine, pbatch)
    loss_k, sums_k, grads_k = _loss_and_grads(packed, engine, kbatch)
    torch.testing.assert_close(loss_k, loss_p, **TOL)
    assert sums_k.keys() == sums_p.keys()
    for key in sums_p:
        torch.testing.assert_close(sums_k[key], sums_p[key], **TOL, msg=key)
    assert grads_k.keys() == grads_p.keys() and grads_p
    if lora:
        assert all("lora_" in n or "score" in n for n in grads_p)  # only the adapter (and a reward head) train
    # Gradients sum per-token terms in fp32, and their rounding depends on the batch layout. How much, for this
    # model and these pairs, is measured on the padded batch itself: right- and left-padded are the same
    # arithmetic rounded two ways. Packed is a third way: two roundings of one value differ by up to ~2x their
    # typical distance, so packed may be 3x as far from right-padded as left-padded is (and 1e-5 relative, the
    # target, always passes: DPO and ORPO are ~3e-6 here, reward models ~1e-5 for both kinds of comparison).
    left = collate_pairs(pbatch.index.tolist(), padded.train, padded.tokenizer.pad_token_id, padding_side="left")
    _, _, grads_l = _loss_and_grads(padded, engine, left)

    def flat(g):
        return torch.cat([g[n].flatten() for n in sorted(g)])

    p, k, lp = flat(grads_p), flat(grads_k), flat(grads_l)
    assert p.norm() > 1e-3  # the gradients compared are not ~0
    spread = float((lp - p).norm())
    assert spread < 1e-4 * float(p.norm())  # rounding, not another gradient
    assert float((k - p).norm()) <= max(3 * spread, 1e-5 * float(p.norm()))


def test_precomputed_reference_on_packed_batches(models, tmp_path):
    """dpo.reference=precomputed scores the pairs in packed micro-batches: the table equals the live reference."""
    rows = _chat_rows()
    model = {"name_or_path": models["policy"]}
    live, engine, pbatch = _task(tmp_path / "live", rows, stage="dpo", model=model,
                                 dpo={"reference_model": models["base"]})
    pre, pengine, kbatch = _task(tmp_path / "pre", rows, data={"packing": True}, stage="dpo", model=dict(model),
                                 train={"micro_batch_size": 2},
                                 dpo={"reference_model": models["base"], "reference": "precomputed"})
    assert kbatch.seq_ids is not None
    with torch.no_grad():
        torch.testing.assert_close(pre.reference.logps(pengine, kbatch), live.reference.logps(engine, pbatch), **TOL)


def test_token_budget_plan_keeps_each_steps_pairs():
    """Pair stages with data.packing: the pairs of every step are those of the padded plan; every rank's share
    runs as micro-batches of whole pairs within the budget (a pair over it alone), as many on every rank, and
    fewer micro-batches than padded ones when pairs are short."""
    import random

    from ftdist.data.batching import plan_epoch

    rng = random.Random(0)
    tokens = [int(min(2048, rng.lognormvariate(5.3, 0.8))) + 8 for _ in range(500)]
    budget = 2 * 4 * 512  # 2 x micro_batch_size x max_length
    common = dict(seed=3, epoch=1, micro_batch_size=4, grad_accum=4, packing=False, capacity=512)
    for world in (1, 2, 3):
        padded = [plan_epoch(tokens, world_size=world, rank=r, **common) for r in range(world)]
        packed = [plan_epoch(tokens, world_size=world, rank=r, token_budget=budget, **common) for r in range(world)]
        assert len(packed[0]) == len(padded[0]) == 500 // (16 * world)
        fewer = 0
        for s in range(len(padded[0])):
            want = sorted(row[0] for r in range(world) for micro in padded[r].steps[s] for row in micro)
            got = sorted(row[0] for r in range(world) for micro in packed[r].steps[s] for row in micro)
            assert got == want  # the same pairs: the same update
            counts = {len(packed[r].steps[s]) for r in range(world)}
            assert len(counts) == 1  # every rank runs as many forward/backward passes
            for r in range(world):
                for micro in packed[r].steps[s]:
                    size = sum(tokens[row[0]] for row in micro)
                    assert size <= budget or len(micro) == 1
                    assert micro
            fewer += counts.pop() < len(padded[0].steps[s])
        assert fewer > len(padded[0]) // 2  # short pairs: most steps need fewer micro-batches than 4
