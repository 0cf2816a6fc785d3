"""The sampler's grammar bitmask (a torch op on the logits' device) against xgrammar's own
apply_token_bitmask_inplace, and in the batched sampler next to the other processors."""

from __future__ import annotations

import pytest
import torch
import xgrammar as xgr

from flatout.layers.sampler import Sampler, SamplingBatch, SamplingRow, apply_grammar_bitmask
from flatout.sampling_params import SamplingParams


@pytest.mark.parametrize("vocab", [32, 100, 1000])
def test_bitmask_matches_xgrammar(vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g)
    words = -(-vocab // 32)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, words), generator=g, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    bitmask[2] = -1  # an unconstrained row: every bit set
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask)
    batch = _batch(5, vocab)
    batch.grammar_bitmask = bitmask
    got = apply_grammar_bitmask(logits.clone(), batch)
    assert torch.equal(got, expected)
    assert torch.equal(got[2], logits[2])
    assert torch.isinf(got).any()  # random words ban some tokens on the other rows


def test_sampler_picks_only_allowed_tokens() -> None:
    vocab, rows = 64, 4
    allowed = [{3}, {10, 40}, set(range(vocab)), {63}]
    bitmask = torch.zeros(rows, 2, dtype=torch.int32)
    for r, ids in enumerate(allowed):
        for t in ids:
            bitmask[r, t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)
    logits = torch.randn(rows, vocab)
    logits[:, 5] = 50.0  # the favourite everywhere, allowed only on the free row
    for temperature in (0.0, 1.0):
        batch = _batch(rows, vocab, temperature)
        batch.grammar_bitmask = bitmask
        for _ in range(10):
            out = Sampler()(logits.clone(), batch).token_ids.tolist()
            assert out[0] == 3 and out[1] in (10, 40) and out[2] == 5 and out[3] == 63


def _batch(rows: int, vocab: int, temperature: float = 0.0) -> SamplingBatch:
    p = SamplingParams(temperature=temperature, max_tokens=4)
    return SamplingBatch.build([SamplingRow(p, [1], []) for _ in range(rows)], vocab,
                               torch.device("cpu"))
