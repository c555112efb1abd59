import pytest
import torch

from ftdist.algos.sft import sft_loss_sum
from ftdist.data.batching import best_fit_pack, collate_rows, plan_epoch
from ftdist.data.tokenize import IGNORE_INDEX
from ftdist.models.forward import SEGMENT_SDPA, causal_logits, packed_spans, use_segment_sdpa

pytestmark = pytest.mark.unit


def _samples(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(5, 30, (1,), generator=g))
        ids = torch.randint(3, 200, (L,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (L // 3) + ids[L // 3:]  # a masked "prompt" then targets
        out.append((ids, labels))
    return out


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _use(model, impl: str) -> str:
    """Set the model's attention kernel; returns the name the forward is told (segment_sdpa is an sdpa model)."""
    if impl == "segment_sdpa":
        use_segment_sdpa(model)
        return "sdpa"
    model.config._attn_implementation = impl
    return impl


@pytest.mark.parametrize("impl", ["sdpa", "eager", "segment_sdpa"])
def test_packed_loss_equals_unpacked(model, impl):
    impl = _use(model, impl)
    data = _samples()
    unpacked = collate_rows([[i] for i in range(len(data))], data, pad_id=0, capacity=128, packed=False)
    packed = collate_rows([[0, 1, 2], [3, 4], [5, 6]], data, pad_id=0, capacity=128, packed=True)
    with torch.no_grad():
        lu, nu = sft_loss_sum(causal_logits(model, unpacked, impl, torch.float32), unpacked.labels)
        lp, np_ = sft_loss_sum(causal_logits(model, packed, impl, torch.float32), packed.labels)
    assert int(nu) == int(np_) == unpacked.n_target_tokens == packed.n_target_tokens
    # the same per-token terms from attention over other shapes (a packed row against separate rows): fp32
    # rounding of ~1e-6 of a token's loss (~6 here); 1e-5 per target token and 1e-4 in the sum give 10x
    assert abs(float(lu) - float(lp)) / float(nu) < 1e-5
    assert abs(float(lu) - float(lp)) < 1e-4


def test_without_block_mask_packing_leaks(model):
    """Why the block-diagonal mask exists: one causal mask over the packed row changes the loss."""
    model.config._attn_implementation = "sdpa"
    data = _samples()
    packed = collate_rows([[0, 1, 2]], data, pad_id=0, capacity=128, packed=True)
    single = collate_rows([[0], [1], [2]], data, pad_id=0, capacity=128, packed=False)
    with torch.no_grad():
        leaky = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                      position_ids=packed.position_ids).logits
        ls, _ = sft_loss_sum(causal_logits(model, single, "sdpa", torch.float32), single.labels)
        ll, _ = sft_loss_sum(leaky, packed.labels)
    assert abs(float(ls) - float(ll)) > 1e-2


def test_segment_sdpa_gradients_equal_block_mask(model, monkeypatch):
    """Per-sample attention is the block-diagonal mask's computation without the masked-out pairs."""
    data = _samples()
    packed = collate_rows([[0, 1, 2], [3, 4, 5, 6]], data, pad_id=0, capacity=128, packed=True)
    sdpa, causal_calls = torch.nn.functional.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        causal_calls.append(kwargs.get("is_causal", False))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    grads = {}
    for impl in ("sdpa", "segment_sdpa"):
        model.zero_grad(set_to_none=True)
        name = _use(model, impl)
        causal_calls.clear()
        loss, n = sft_loss_sum(causal_logits(model, packed, name, torch.float32), packed.labels)
        (loss / n).backward()
        grads[impl] = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    # one causal call per packed sample per layer: 7 samples x 2 layers
    assert causal_calls == [True] * 14
    worst = max(float((grads["sdpa"][k] - grads["segment_sdpa"][k]).abs().max()) for k in grads["sdpa"])
    assert worst < 1e-5  # the same sums through another attention kernel: rounding (~1e-7 of gradients <= ~1)


def test_packed_spans_skip_padding():
    seq_ids = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 2, 3, 3, 3, 3, 3]])
    assert packed_spans(seq_ids) == [[(0, 3), (3, 5)], [(0, 1), (1, 2), (2, 7)]]


def test_loaded_sdpa_model_uses_segment_attention_and_matches_sdpa(tmp_path, model):
    from ftdist.config import load_config
    from ftdist.models.loading import load_causal_lm

    model.config._attn_implementation = "sdpa"
    model.save_pretrained(tmp_path)
    cfg = load_config(data={"model": {"name_or_path": str(tmp_path), "dtype": "fp32", "attn_implementation": "sdpa"},
                            "data": {"train": "ftdist/tiny-task"}})
    loaded = load_causal_lm(cfg.model).eval()
    assert loaded.config._attn_implementation == SEGMENT_SDPA
    data = _samples()
    padded = collate_rows([[i] for i in range(len(data))], data, pad_id=0, capacity=128, packed=False)
    with torch.no_grad():
        a = causal_logits(model, padded, "sdpa", torch.float32)
        b = causal_logits(loaded, padded, "sdpa", torch.float32)
    real = padded.attention_mask.bool()
    assert float((a - b)[real].abs().max()) < 1e-5  # another kernel, same sums: ~1e-7 of logits of size ~1


def test_packed_batch_marks_sample_starts_and_positions():
    data = [([5, 6, 7], [5, 6, 7]), ([8, 9], [8, 9])]
    b = collate_rows([[0, 1]], data, pad_id=0, capacity=8, packed=True)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert b.seq_ids.tolist() == [[1, 1, 1, 2, 2]]
    # a sample's first token is never a target of the previous sample
    assert b.labels.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]


def test_best_fit_fills_bins():
    lengths = [900, 600, 500, 400, 300, 120, 100, 80, 24]
    bins = best_fit_pack(lengths, list(range(len(lengths))), capacity=1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert len(bins) == 3  # 3024 tokens need at least 3 bins of 1024


def test_plan_is_deterministic_and_splits_steps_over_ranks():
    lengths = [10 + (i * 7) % 50 for i in range(64)]
    kw = dict(seed=1, epoch=0, micro_batch_size=2, grad_accum=2, packing=False, capacity=64)
    one = plan_epoch(lengths, world_size=1, rank=0, **{**kw, "micro_batch_size": 8, "grad_accum": 1})
    r0 = plan_epoch(lengths, world_size=2, rank=0, **kw)
    r1 = plan_epoch(lengths, world_size=2, rank=1, **kw)
    assert len(one) == len(r0) == len(r1) == 8
    for s in range(8):
        whole = sorted(i for row in one.steps[s][0] for i in row)
        split = sorted(i for p in (r0, r1) for mb in p.steps[s] for row in mb for i in row)
        assert whole == split
    assert plan_epoch(lengths, world_size=2, rank=0, **kw).steps == r0.steps
    assert plan_epoch(lengths, world_size=2, rank=0, **{**kw, "epoch": 1}).steps != r0.steps


def test_padding_fraction_small_with_packing():
    import random

    rng = random.Random(0)
    lengths = [min(1024, int(32 * (1 / max(rng.random(), 0.03)))) for _ in range(2000)]
    bins = best_fit_pack(lengths, list(range(len(lengths))), 1024)
    used = sum(lengths)
    assert 1 - used / (len(bins) * 1024) < 0.03


def _padding(plans, lengths) -> float:
    """The padding share of the tokens of unpacked micro-batches (each padded to its longest row)."""
    real = padded = 0
    for plan in plans:
        for step in plan.steps:
            for micro in step:
                widths = [lengths[r[0]] for r in micro]
                real += sum(widths)
                padded += max(widths) * len(widths)
    return 1 - real / padded


def test_group_by_length_cuts_padding_across_the_epoch_and_keeps_every_row():
    """train.group_by_length=true: long-tailed lengths, one micro-batch per step (a case the within-step sort cannot
    help): padding falls from the random-batch level to a few percent; every row is still used once; the plan
    stays deterministic and the same rows form each step on 1 or 2 ranks."""
    import random

    rng = random.Random(0)
    lengths = [min(512, max(8, int(rng.lognormvariate(4.5, 0.9)))) for _ in range(4000)]
    kw = dict(seed=3, epoch=0, micro_batch_size=8, grad_accum=1, world_size=1, rank=0, packing=False, capacity=512)

    def padding(plan):
        return _padding([plan], lengths)

    plain = plan_epoch(lengths, **kw)
    kw["group_by_length"] = True
    grouped = plan_epoch(lengths, **kw)
    # exact for this seeded data (no floating-point rounding involved): 0.61 without grouping, 0.033 with it; a
    # sorted mega-batch of 400 rows leaves neighbours a few percent apart, random batches of 8 from a lognormal
    # with sigma 0.9 pad to their longest, about twice the mean
    assert padding(plain) > 0.5 and padding(grouped) < 0.05
    used = sorted(r[0] for step in grouped.steps for mb in step for r in mb)
    assert used == sorted(r[0] for step in plain.steps for mb in step for r in mb) == list(range(4000))
    assert plan_epoch(lengths, **kw).steps == grouped.steps
    assert plan_epoch(lengths, **{**kw, "epoch": 1}).steps != grouped.steps
    two = [plan_epoch(lengths, **{**kw, "micro_batch_size": 4, "world_size": 2, "rank": r}) for r in (0, 1)]
    for s in range(len(grouped)):
        assert sorted(r[0] for r in grouped.steps[s][0]) == sorted(r[0] for p in two for r in p.steps[s][0])


def test_split_by_length_is_the_cheapest_split():
    """split_by_length against every split of the sorted rows into consecutive runs of at most max_rows (brute
    force over the 2^(n-1) cut sets): the same minimal cost, integers, so exactly equal."""
    import itertools
    import random

    from ftdist.data.batching import split_by_length

    rng = random.Random(1)
    for _ in range(200):
        n, max_rows, overhead = rng.randint(1, 8), rng.randint(1, 4), rng.choice((0, 16, 32, 200))
        lengths = sorted(rng.randint(1, 300) for _ in range(n))
        rows = [[i] for i in range(n)]

        def cost(groups):
            return sum(len(g) * max(lengths[r[0]] for r in g) + overhead for g in groups)

        best = min(cost([rows[a:b] for a, b in zip((0, *cuts), (*cuts, n))])
                   for k in range(n) for cuts in itertools.combinations(range(1, n), k)
                   if all(b - a <= max_rows for a, b in zip((0, *cuts), (*cuts, n))))
        got = split_by_length(rows, lengths, max_rows, overhead)
        assert [r for g in got for r in g] == rows and all(1 <= len(g) <= max_rows for g in got)
        assert cost(got) == best


def test_length_split_cuts_padding_within_steps_on_every_rank():
    """train.group_by_length=step with micro-batch = global batch (no accumulation to sort into): the rows of each
    step are the same as without it, every rank runs the same number of micro-batches of at most micro_batch_size
    rows, and on long-tailed lengths the padding falls from ~60% to under 10%."""
    import random

    rng = random.Random(0)
    lengths = [min(512, max(8, int(rng.lognormvariate(4.5, 0.9)))) for _ in range(4000)]
    kw = dict(seed=3, epoch=0, grad_accum=1, packing=False, capacity=512)

    def padding(plans):
        return _padding(plans, lengths)

    for world in (1, 2):
        plain = [plan_epoch(lengths, micro_batch_size=8 // world, world_size=world, rank=r, **kw)
                 for r in range(world)]
        split = [plan_epoch(lengths, micro_batch_size=8 // world, world_size=world, rank=r, micro_overhead=32, **kw)
                 for r in range(world)]
        for s in range(len(plain[0])):
            assert sorted(r[0] for p in split for mb in p.steps[s] for r in mb) == \
                sorted(r[0] for p in plain for mb in p.steps[s] for r in mb)
            assert len({len(p.steps[s]) for p in split}) == 1  # as many micro-batches on every rank
            assert all(len(mb) <= 8 // world for p in split for mb in p.steps[s])
        # exact for this seeded data (integer lengths): random batches of a lognormal with sigma 0.9 pad to
        # their longest, about twice the mean; runs of similar length after sorting pad a few percent
        assert padding(plain) > 0.5 and padding(split) < 0.10
    # no overhead given: the fixed split of grad_accum micro-batches of micro_batch_size rows
    assert [len(st) for st in plan_epoch(lengths, micro_batch_size=4, world_size=1, rank=0,
                                         **{**kw, "grad_accum": 2}).steps] == [2] * 500
