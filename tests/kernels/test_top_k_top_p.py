"""Top-k / top-p truncation: the sort-based reference against a float64 definition, and the
sort-free kernels (radix passes in one or several launches, topk candidates) against the
reference, under the Triton interpreter; the sampler with the kernel draws what it draws with the
reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flatout.kernels import reference
from flatout.kernels.ops import REFERENCE_OPS
from flatout.kernels.top_k_top_p import MAX_CANDIDATES, top_k_top_p, top_p_radix
from flatout.layers.sampler import Sampler, SamplingBatch, SamplingRow
from flatout.sampling_params import SamplingParams

NEG_INF = float("-inf")
MARGIN = 1e-5  # rows with a token's float64 mass above this close to top_p are not compared


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kept64(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> tuple[torch.Tensor,
                                                                                  list[bool]]:
    """The definition, row by row in float64: keep x >= the k-th largest, then the survivors
    whose strictly larger survivors hold < top_p of their probability. Returns ([B, V] bool,
    per row: no token's mass above within MARGIN of top_p)."""
    B, V = logits.shape
    keep = torch.zeros(B, V, dtype=torch.bool)
    clear = []
    for b in range(B):
        x = logits[b].double()
        alive = x > NEG_INF
        if top_k[b] < V:
            alive &= x >= x.topk(top_k[b]).values[-1]
        if top_p[b] >= 1.0 or not alive.any():
            keep[b] = alive
            clear.append(True)
            continue
        probs = torch.where(alive, x - x[alive].max(), NEG_INF).exp()
        probs /= probs.sum()
        values, inverse = torch.unique(torch.where(alive, x, NEG_INF), return_inverse=True)
        mass = torch.zeros(len(values), dtype=torch.float64).scatter_add_(0, inverse, probs)
        above = mass.flip(0).cumsum(0).flip(0) - mass  # strictly larger values' mass
        row_above = above[inverse]
        keep[b] = alive & (row_above < top_p[b])
        clear.append(bool(((row_above[alive] - top_p[b]).abs() > MARGIN).all()))
    return keep, clear


def _case(seed: int, B: int, V: int, ties: bool = False) -> torch.Tensor:
    """Logits with what the sampler meets: -inf from a bias or a grammar, a row with one token
    left, a row with two, ties (when asked) and zeros of both signs."""
    g = _gen(seed)
    logits = torch.randn(B, V, generator=g) * (0.5 + 3 * torch.rand(B, 1, generator=g))
    if ties:
        logits = (logits * 4).round() / 4
        logits[:, :: 7] = 0.0
        logits[:, 3:: 11] = -0.0
    masked = torch.rand(B, V, generator=g) < 0.3
    logits[masked] = NEG_INF
    if B > 2:
        logits[1, :] = NEG_INF
        logits[1, V // 2] = 1.5  # one token left
        logits[2, : V // 3] = NEG_INF  # a third masked
    return logits


def _params(seed: int, B: int, V: int, with_k: bool) -> tuple[list[int], list[float]]:
    g = _gen(seed + 1)
    ks = [int(torch.randint(1, V + 1, (1,), generator=g)) for _ in range(B)]
    ps = [float(torch.rand(1, generator=g)) * 0.99 + 0.005 for _ in range(B)]
    ks = [k if with_k and b % 3 else V for b, k in enumerate(ks)]  # some rows without top-k
    ps[-1] = 1.0  # a row without top-p
    ps[0] = min(ps[0], 0.3)
    return ks, ps


def _check(got: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor, clear: list[bool]) -> int:
    """Rows free of rounding ambiguity keep exactly `keep` with their values; returns how many
    rows were compared."""
    compared = 0
    for b, ok in enumerate(clear):
        if ok:
            expected = torch.where(keep[b], logits[b], NEG_INF)
            assert torch.equal(got[b], expected), f"row {b}"
            compared += 1
    return compared


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("with_k", [False, True])
def test_reference_matches_the_float64_definition(ties, with_k):
    B, V = 6, 300
    compared = 0
    for seed in range(4):
        logits = _case(seed, B, V, ties)
        ks, ps = _params(seed, B, V, with_k)
        keep, clear = _kept64(logits, ks, ps)
        top_k = torch.tensor(ks) if any(k < V for k in ks) else None
        max_k = max([k for k in ks if k < V], default=0)
        got = reference.top_k_top_p(logits.clone(), top_k, torch.tensor(ps), max_k,
                                    all(k < V for k in ks))
        compared += _check(got, logits, keep, clear)
    assert compared >= 3 * B


@pytest.mark.parametrize("chunks", [1, 3, None])  # one launch; several programs per row
@pytest.mark.parametrize("ties", [False, True])
def test_radix_matches_reference(chunks, ties):
    B, V = 5, 700  # V not a multiple of the block
    compared = 0
    for seed in range(2):
        logits = _case(10 + seed, B, V, ties)
        ks, ps = _params(10 + seed, B, V, with_k=True)
        keep, clear = _kept64(logits, ks, ps)
        top_k = torch.tensor(ks)
        max_k = max(k for k in ks if k < V)
        kth = reference.top_k_threshold(logits, top_k, max_k).squeeze(1)
        got = top_p_radix(logits.clone(), kth, torch.tensor(ps), chunks=chunks)
        ref = reference.top_k_top_p(logits.clone(), top_k, torch.tensor(ps), max_k, False)
        compared += _check(got, logits, keep, clear)
        rows = torch.tensor(clear)
        assert torch.equal(got[rows], ref[rows])
    assert compared >= B + 2


def test_radix_extremes():
    V = 600
    logits = torch.randn(6, V, generator=_gen(3))
    logits[0] = NEG_INF  # nothing allowed: stays so
    logits[1] = 2.0  # all tied: kept together whatever top_p
    logits[2, 1:] = NEG_INF  # one token
    logits[3] = torch.linspace(-1e-38, 1e-38, V)  # subnormals around zero
    logits[4] = torch.randn(V, generator=_gen(4)) * 80  # nearly all mass in one token
    logits[5] = torch.randn(V, generator=_gen(5)) * 1e-3  # nearly flat
    top_p = torch.tensor([0.5, 0.01, 0.2, 0.5025, 0.999, 0.5])
    kth = torch.full((6,), NEG_INF)
    for chunks in (1, 4):
        got = top_p_radix(logits.clone(), kth, top_p, chunks=chunks)
        ref = reference.top_k_top_p(logits.clone(), None, top_p, 0, False)
        assert torch.equal(got, ref)
    assert torch.isinf(got[0]).all() and torch.equal(got[1], logits[1])
    assert int(torch.isfinite(got[2]).sum()) == 1 and int(torch.isfinite(got[4]).sum()) == 1
    assert 250 < int(torch.isfinite(got[5]).sum()) < 350


@pytest.mark.parametrize("k_every_row", [False, True])
def test_top_k_top_p_paths_match_reference(k_every_row):
    B, V = 6, 600
    compared = 0
    for seed in range(3):
        logits = _case(20 + seed, B, V, ties=seed == 1)
        g = _gen(seed)
        ks = [int(torch.randint(1, 60, (1,), generator=g)) for _ in range(B)]
        if not k_every_row:
            ks[1] = V
        ps = [0.9, 0.5, 0.97, 0.3, 0.75, 1.0]
        keep, clear = _kept64(logits, ks, ps)
        args = (torch.tensor(ks), torch.tensor(ps), max(k for k in ks if k < V), k_every_row)
        got = top_k_top_p(logits.clone(), *args)
        ref = reference.top_k_top_p(logits.clone(), *args)
        compared += _check(got, logits, keep, clear)
        rows = torch.tensor(clear)
        assert torch.equal(got[rows], ref[rows])
    assert compared >= 2 * B


def test_candidates_count_ties_beyond_the_top_k():
    # the 3rd largest logit is tied with 399 others: all survive top-k and hold 42 % of the
    # survivors' mass; leaving out the ties beyond the 3 candidates would keep 1 and 2 tokens
    V = 1000
    logits = torch.full((2, V), -5.0)
    logits[:, 10] = 6.0
    logits[:, 20] = 5.0
    logits[:, 100:500] = 0.0
    top_k, top_p = torch.tensor([3, 3]), torch.tensor([0.5, 0.99])
    got = top_k_top_p(logits.clone(), top_k, top_p, 3, True)
    ref = reference.top_k_top_p(logits.clone(), top_k, top_p, 3, True)
    assert torch.equal(got, ref)
    assert torch.isfinite(got).sum(dim=1).tolist() == [2, 402]
    assert MAX_CANDIDATES >= 3


def test_sampler_with_the_kernel_draws_what_the_reference_draws():
    V = 500
    logits = torch.randn(8, V, generator=_gen(30)) * 2
    logits[3, ::2] = NEG_INF  # half banned
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(temperature=1.2, top_k=40, top_p=0.8, seed=2),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_p=0.5, seed=3),
        SamplingParams(temperature=0.7, seed=4),
        SamplingParams(temperature=1.0, top_k=5, seed=5),
        SamplingParams(temperature=1.5, top_p=0.95, min_p=0.05, seed=6),
        SamplingParams(temperature=0.9, top_k=V, top_p=0.7, seed=7),
    ]
    kernel = Sampler()
    kernel.ops = dataclasses.replace(REFERENCE_OPS, top_k_top_p=top_k_top_p)

    def draws(sampler: Sampler) -> list[list[int]]:
        gens = [torch.Generator().manual_seed(p.seed or 0) for p in params]
        out = []
        for _ in range(3):
            rows = [SamplingRow(p, [], [], generator=g) for p, g in zip(params, gens, strict=True)]
            batch = SamplingBatch.build(rows, V, torch.device("cpu"))
            out.append(sampler(logits.clone(), batch).token_ids.tolist())
        return out

    assert draws(kernel) == draws(Sampler())
