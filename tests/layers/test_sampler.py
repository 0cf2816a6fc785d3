"""Sampler: greedy, seeded reproducibility, truncation sets, distribution, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatout.layers.sampler import (
    Sampler,
    SamplingBatch,
    SamplingRow,
    apply_logit_bias,
    apply_penalties,
    generator_seed,
    seeded_generator,
)
from flatout.sampling_params import SamplingParams, SamplingParamsError

CPU = torch.device("cpu")


def row(params: SamplingParams, **kw) -> SamplingRow:
    kw.setdefault("prompt_token_ids", [])
    kw.setdefault("output_token_ids", [])
    return SamplingRow(params=params, **kw)


def sample(logits: torch.Tensor, rows: list[SamplingRow]):
    batch = SamplingBatch.build(rows, logits.shape[1], CPU)
    return Sampler()(logits.clone(), batch)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax_and_skips_work():
    logits = torch.randn(8, 50, generator=seeded(0))
    rows = [row(SamplingParams(temperature=0.0, top_k=5, top_p=0.5)) for _ in range(8)]
    batch = SamplingBatch.build(rows, 50, CPU)
    assert batch.all_greedy and batch.temperature is None
    assert batch.top_k is None and batch.top_p is None and batch.output_ids is None
    out = Sampler()(logits.clone(), batch)
    assert torch.equal(out.token_ids, logits.argmax(dim=1))
    assert out.logprobs is None and out.top_ids is None


def _seeded_run(seed: int, position: int, others: list[SamplingParams], steps: int) -> list[int]:
    V = 300
    base = torch.randn(V, generator=seeded(7))
    target = SamplingParams(temperature=0.9, top_k=100, top_p=0.95, seed=seed)
    gen = seeded(seed)
    tokens: list[int] = []
    for step in range(steps):
        torch.manual_seed(1000 + step + len(others))  # the default stream differs per scenario
        params = list(others)
        params.insert(position, target)
        logits = torch.randn(len(params), V, generator=seeded(step))  # other rows' logits vary
        logits[position] = base
        rows = [row(p, generator=seeded(99) if p.seed is not None else None) for p in params]
        rows[position] = row(target, generator=gen)
        tokens.append(int(sample(logits, rows).token_ids[position]))
    return tokens


def test_seeded_rows_reproducible_regardless_of_batch():
    alone = _seeded_run(1234, 0, [], steps=12)
    assert alone == _seeded_run(1234, 0, [], steps=12)
    mixed = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, min_p=0.1),
        SamplingParams(temperature=0.5, seed=5),
        SamplingParams(temperature=1.0, top_p=0.3),
    ]
    assert _seeded_run(1234, 3, mixed, steps=12) == alone
    assert _seeded_run(1234, 1, mixed[:2], steps=12) == alone


def test_different_seeds_differ():
    logits = torch.zeros(2, 1000)  # uniform: two independent streams almost never agree
    rows = [row(SamplingParams(seed=s), generator=seeded(s)) for s in (1, 2)]
    default_state = torch.get_rng_state()
    draws = torch.stack([sample(logits, rows).token_ids for _ in range(20)])  # [20, 2]
    assert not torch.equal(draws[:, 0], draws[:, 1])
    assert torch.equal(torch.get_rng_state(), default_state)  # all rows seeded: default untouched


def _allowed(logits: torch.Tensor, p: SamplingParams, tol: float = 1e-4) -> set[int]:
    """Loose float64 reference of the tokens top-k -> top-p -> min-p may keep."""
    x = logits.double() / p.temperature
    V = x.numel()
    keep = torch.ones(V, dtype=torch.bool)
    if 0 < p.top_k < V:
        keep &= x >= x.topk(p.top_k).values[-1]
    probs = torch.where(keep, x, -math.inf).softmax(0)
    if p.top_p < 1.0:
        above = torch.stack([probs[probs > q].sum() for q in probs])  # mass strictly above
        keep &= above < p.top_p + tol
        probs = torch.where(keep, x, -math.inf).softmax(0)
    if p.min_p > 0.0:
        keep &= probs >= p.min_p * probs.max() * (1 - tol)
    return set(torch.nonzero(keep).flatten().tolist())


@settings(max_examples=60, deadline=None)
@given(
    data_seed=st.integers(0, 2**31 - 1),
    V=st.integers(2, 40),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    temperature=st.floats(0.2, 2.0),
    top_k=st.integers(-1, 45),
    top_p=st.sampled_from([1.0, 0.9, 0.5, 0.1]) | st.floats(0.01, 1.0),
    min_p=st.sampled_from([0.0, 0.05, 0.3, 0.9]),
    companion=st.sampled_from(["none", "plain", "wider_k"]),
)
def test_truncation_never_leaves_allowed_set(
    data_seed, V, scale, temperature, top_k, top_p, min_p, companion
):
    torch.manual_seed(data_seed)
    base = torch.randn(V) * scale
    if data_seed % 3 == 0:
        base = base.round()  # ties
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    allowed = _allowed(base, p)
    # the same row 64 times; a row without top-k forces the full-vocabulary path, one with a
    # wider top-k makes the batch's candidate count exceed this row's k
    extra = {"none": [], "plain": [SamplingParams()], "wider_k": [SamplingParams(top_k=V - 1)]}
    rows = [row(x) for x in [p] * 64 + extra[companion]]
    tokens = sample(base.repeat(len(rows), 1), rows).token_ids
    assert set(tokens[:64].tolist()) <= allowed


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    live = expected > 0
    assert counts[~live].sum() == 0  # nothing drawn where the probability is zero
    return float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())


def test_distribution_matches_softmax_over_temperature():
    torch.manual_seed(0)
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    N = 30000
    tokens = sample(base.repeat(N, 1), [row(SamplingParams(temperature=0.7))] * N).token_ids
    # df = 5: P(chi2 > 20.5) = 0.001; a wrong temperature (e.g. 1.0) scores in the hundreds
    assert _chi_square(tokens, (base / 0.7).softmax(0)) < 20.5
    assert _chi_square(tokens, base.softmax(0)) > 100


@pytest.mark.parametrize("with_plain_row", [False, True])  # candidates-only / full-vocab path
def test_distribution_top_k_renormalises_and_seeded_stream_is_fair(with_plain_row):
    base = torch.tensor([1.5, 1.0, 0.2, 0.0, -0.5])
    p = SamplingParams(temperature=1.0, top_k=3, seed=3)
    gen = seeded(3)
    rows = [row(p, generator=gen)] + [row(SamplingParams())] * with_plain_row
    logits = base.repeat(len(rows), 1)
    tokens = torch.cat([sample(logits, rows).token_ids[:1] for _ in range(2000)])
    expected = torch.cat([base[:3].softmax(0), torch.zeros(2)])
    assert _chi_square(tokens, expected) < 13.8  # df = 2, p = 0.001


def _penalty_reference(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    out = logits.clone().double()
    V = logits.shape[1]
    for b, r in enumerate(rows):
        p = r.params
        seen = set(r.prompt_token_ids) | set(r.output_token_ids)
        for t in range(V):
            x = out[b, t].item()
            if t in seen:
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            c = r.output_token_ids.count(t)
            x -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
            out[b, t] = x
    return out.float()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 20), max_size=12),  # prompt (ids >= 16 are out of vocab)
            st.lists(st.integers(0, 20), max_size=12),  # output
            st.sampled_from([1.0, 0.5, 1.3]) | st.floats(0.1, 3.0),
            st.sampled_from([0.0, 0.5]) | st.floats(-2.0, 2.0),
            st.sampled_from([0.0, -1.0]) | st.floats(-2.0, 2.0),
        ),
        min_size=1,
        max_size=5,
    ),
    st.integers(0, 2**31 - 1),
)
def test_penalties_match_reference(specs, data_seed):
    V = 16
    rows = [
        row(
            SamplingParams(repetition_penalty=rp, frequency_penalty=fp, presence_penalty=pp),
            prompt_token_ids=prompt,
            output_token_ids=output,
        )
        for prompt, output, rp, fp, pp in specs
    ]
    logits = torch.randn(len(rows), V, generator=seeded(data_seed)) * 3
    batch = SamplingBatch.build(rows, V, CPU)
    got = apply_penalties(logits.clone(), batch)
    ref = _penalty_reference(logits, [_in_vocab(r, V) for r in rows])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _in_vocab(r: SamplingRow, V: int) -> SamplingRow:
    return row(
        r.params,
        prompt_token_ids=[t for t in r.prompt_token_ids if t < V],
        output_token_ids=[t for t in r.output_token_ids if t < V],
    )


def test_banned_ids_never_sampled():
    V = 20
    logits = torch.randn(40, V, generator=seeded(1))
    logits[:, [3, 7]] += 50.0  # banned tokens would otherwise always win
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=2.0)] * 20
    rows = [row(p, banned_token_ids=[3, 7, V, V + 100]) for p in params]  # ids >= V: ignored
    tokens = sample(logits, rows).token_ids
    assert not torch.isin(tokens, torch.tensor([3, 7])).any()
    unbanned = sample(logits, [row(p) for p in params]).token_ids
    assert torch.isin(unbanned, torch.tensor([3, 7])).all()


def test_logprobs_are_raw_log_softmax_and_true_top_k():
    V = 64
    logits = torch.randn(3, V, generator=seeded(2)) * 2
    common = dict(temperature=0.5, repetition_penalty=1.5, presence_penalty=1.0, top_k=10)
    rows = [
        row(SamplingParams(logprobs=5, **common), output_token_ids=[1, 2, 2]),
        row(SamplingParams(logprobs=0, **common), prompt_token_ids=[5]),
        row(SamplingParams(temperature=0.0)),
    ]
    out = sample(logits, rows)
    raw = logits.log_softmax(dim=1)
    expected = raw.gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected)
    assert out.top_ids.shape == (3, 5) and out.top_logprobs.shape == (3, 5)
    values, ids = raw.topk(5, dim=1)
    assert torch.equal(out.top_ids, ids)
    torch.testing.assert_close(out.top_logprobs, values)

    only_sampled = sample(logits, [row(SamplingParams(logprobs=0))] * 3)
    assert only_sampled.logprobs.shape == (3,) and only_sampled.top_ids is None


def test_mixed_batch_in_one_call():
    V = 50
    logits = torch.randn(5, V, generator=seeded(3)) * 3
    seeded_params = SamplingParams(temperature=0.7, top_p=0.9, seed=42)
    greedy_gen = seeded(8)
    rows = [
        row(SamplingParams(temperature=0.0, logprobs=3)),
        row(SamplingParams(temperature=1.0, top_k=5)),
        row(seeded_params, generator=seeded(42)),
        row(
            SamplingParams(temperature=0.0, repetition_penalty=2.0, seed=8),
            prompt_token_ids=[int(logits[3].argmax())],
            banned_token_ids=[int(logits[3].topk(2).indices[1])],
            generator=greedy_gen,
        ),
        row(SamplingParams(temperature=1.0, min_p=0.5, frequency_penalty=0.5)),
    ]
    gen_state = greedy_gen.get_state()
    batch = SamplingBatch.build(rows, V, CPU)
    assert list(batch.generators) == [2]
    out = Sampler()(logits.clone(), batch)

    assert out.token_ids.shape == (5,) and out.token_ids.dtype == torch.int64
    assert out.top_ids.shape == (5, 3) and out.logprobs.shape == (5,)
    assert int(out.token_ids[0]) == int(logits[0].argmax())
    assert int(out.token_ids[1]) in set(logits[1].topk(5).indices.tolist())
    alone = sample(logits[2:3], [row(seeded_params, generator=seeded(42))]).token_ids
    assert int(out.token_ids[2]) == int(alone[0])
    penalised = logits[3:4].clone()
    penalised[0, rows[3].banned_token_ids] = -math.inf
    penalised = _penalty_reference(penalised, [rows[3]])
    assert int(out.token_ids[3]) == int(penalised.argmax())
    assert torch.equal(greedy_gen.get_state(), gen_state)  # greedy rows draw no noise


def test_greedy_rows_beside_hot_rows_stay_argmax():
    logits = torch.randn(40, 30, generator=seeded(5))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=5.0)] * 20
    tokens = sample(logits, [row(p) for p in params]).token_ids
    assert torch.equal(tokens[0::2], logits[0::2].argmax(dim=1))
    assert not torch.equal(tokens[1::2], logits[1::2].argmax(dim=1))


def test_low_precision_logits_are_upcast():
    logits = torch.randn(4, 30, generator=seeded(4)).bfloat16()
    out = sample(logits, [row(SamplingParams(temperature=0.0, logprobs=2))] * 4)
    assert torch.equal(out.token_ids, logits.float().argmax(dim=1))
    assert out.logprobs.dtype == torch.float32


def test_logit_bias_forces_and_bans_tokens_per_row():
    V = 30
    logits = torch.randn(6, V, generator=seeded(2))
    logits[:, 4] += 20.0  # token 4 wins everywhere without a bias
    params = [
        SamplingParams(temperature=0.0, logit_bias={11: 100.0}),  # forced, greedy
        SamplingParams(temperature=1.5, seed=3, logit_bias={17: 100, 2: -5.5}),  # forced, sampled
        SamplingParams(temperature=0.0, logit_bias={4: -100.0}),  # banned: next best wins
        SamplingParams(temperature=0.0),  # no bias: untouched beside biased rows
        SamplingParams(temperature=0.0, logit_bias={V + 5: 100.0}),  # past the logits: ignored
        SamplingParams(temperature=0.0, logit_bias={}),
    ]
    tokens = sample(logits, [row(p) for p in params]).token_ids.tolist()
    second_best = logits[2].clone()
    second_best[4] = float("-inf")
    assert tokens == [11, 17, int(second_best.argmax()), 4, 4, 4]


def test_logit_bias_is_added_exactly_and_skipped_when_no_row_has_one():
    V = 10
    logits = torch.randn(2, V, generator=seeded(4))
    plain = SamplingBatch.build([row(SamplingParams()), row(SamplingParams(logit_bias={}))], V, CPU)
    assert plain.bias_ids is None and plain.bias_values is None
    biased = SamplingBatch.build(
        [row(SamplingParams(logit_bias={1: 2.5, 7: -3.0})), row(SamplingParams())], V, CPU)
    out = apply_logit_bias(logits.clone(), biased)
    expected = logits.clone()
    expected[0, 1] += 2.5
    expected[0, 7] -= 3.0
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("bias", [{1: 100.5}, {1: -101}, {-1: 1.0}, {"1": 1.0}, {1: math.nan},
                                  {1: True}, [1, 2]])
def test_logit_bias_out_of_range_names_the_field(bias):
    with pytest.raises(ValueError, match="logit_bias") as e:
        SamplingParams(logit_bias=bias)
    assert e.value.field == "logit_bias"


def test_logit_bias_token_ids_checked_against_the_vocabulary():
    params = SamplingParams(logit_bias={9: 1.0})
    params.check_token_ids(10)
    with pytest.raises(ValueError, match=r"logit_bias: token id 10 is outside the vocabulary"):
        SamplingParams(logit_bias={10: 1.0}).check_token_ids(10)


def test_tiny_top_p_keeps_the_top_token_instead_of_underflowing():
    # 1e-300 is > 0 in float64 but 0 in float32, which used to drop every token (NaN -> token 0)
    logits = torch.randn(16, 40, generator=seeded(11)) * 3
    rows = [row(SamplingParams(temperature=1.0, top_p=1e-300, logprobs=1)) for _ in range(16)]
    out = sample(logits, rows)
    assert torch.equal(out.token_ids, logits.argmax(dim=1))
    assert out.logprobs is not None
    torch.testing.assert_close(out.logprobs, logits.log_softmax(dim=1).amax(dim=1))


def test_repetition_penalty_below_float32_range_is_refused_and_the_minimum_stays_finite():
    for bad in (1e-39, 1e-30, SamplingParams.MIN_REPETITION_PENALTY / 2):
        with pytest.raises(SamplingParamsError) as e:
            SamplingParams(repetition_penalty=bad)
        assert e.value.field == "repetition_penalty"
    # the smallest accepted penalty with the smallest sampled temperature on large logits: the
    # penalised row stays finite, so the seen token with the largest positive logit wins
    V = 30
    logits = torch.randn(4, V, generator=seeded(6)) * 100
    p = SamplingParams(temperature=1.01e-5, logprobs=0,
                       repetition_penalty=SamplingParams.MIN_REPETITION_PENALTY)
    seen = [3, 7, 11]
    rows = [row(p, prompt_token_ids=seen) for _ in range(4)]
    out = sample(logits, rows)
    masked = torch.full_like(logits, float("-inf"))
    masked[:, seen] = logits[:, seen]
    pos = masked.amax(dim=1) > 0
    assert torch.equal(out.token_ids[pos], masked.argmax(dim=1)[pos])
    assert out.logprobs is not None and torch.isfinite(out.logprobs).all()


def test_seeds_use_all_64_bits():
    assert generator_seed(5) != generator_seed(2**32 + 5)
    assert generator_seed(-1) == generator_seed(2**64 - 1)  # taken modulo 2**64
    a = torch.rand(8, generator=seeded_generator(5, CPU))
    b = torch.rand(8, generator=seeded_generator(2**32 + 5, CPU))
    assert not torch.equal(a, b)
    assert torch.equal(a, torch.rand(8, generator=seeded_generator(5, CPU)))
