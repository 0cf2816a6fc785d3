"""The serving metrics on hand-built timing records with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flatout.bench.metrics import RequestRecord, distribution, parse_slo, summarize, token_times
from flatout.bench.runner import LoadPoint, arrival_times


def rec(i: int, ttft: float, itl: list[float], out: int, prompt: int = 10,
        ok: bool = True) -> RequestRecord:
    e2el = ttft + sum(itl)
    return RequestRecord(i, prompt, out, start=float(i), success=ok, ttft=ttft, e2el=e2el,
                         itl=itl, output_tokens=out)


def test_ttft_tpot_itl_e2el_by_hand() -> None:
    a = rec(0, 0.100, [0.010, 0.020, 0.030], 4)  # e2el 0.160, tpot 0.060 / 3 = 0.020
    b = rec(1, 0.300, [0.050], 2)  # e2el 0.350, tpot 0.050
    c = rec(2, 0.200, [], 1)  # one token: no TPOT, no ITL
    failed = rec(3, 9.0, [9.0], 5, ok=False)
    s = summarize([a, b, c, failed], duration=2.0)
    assert s["completed"] == 3 and s["failed"] == 1
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 7
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(3.5)
    assert s["total_token_throughput"] == pytest.approx(18.5)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["ttft_ms"]["median"] == pytest.approx(200.0)
    assert a.tpot == pytest.approx(0.020) and b.tpot == pytest.approx(0.050) and c.tpot is None
    assert s["tpot_ms"]["mean"] == pytest.approx(35.0)  # over the two requests with > 1 token
    # ITL pools every gap of every request: 10, 20, 30, 50 ms
    assert s["itl_ms"]["mean"] == pytest.approx(27.5)
    assert s["itl_ms"]["median"] == pytest.approx(25.0)
    assert s["e2el_ms"]["mean"] == pytest.approx((160 + 350 + 200) / 3)


def test_tpot_uses_usage_tokens_not_chunks() -> None:
    # 2 chunks carried 5 tokens: TPOT divides by output tokens - 1, ITL stays per chunk
    r = RequestRecord(0, 1, 5, success=True, ttft=0.1, e2el=0.5, itl=[0.4], output_tokens=5)
    assert r.tpot == pytest.approx(0.1)
    assert summarize([r], 1.0)["itl_ms"]["mean"] == pytest.approx(400.0)


def test_percentiles_interpolate_linearly() -> None:
    values = [i / 1000 for i in range(1, 11)]  # 1..10 ms
    d = distribution(values)
    # rank p/100 * (n - 1) between the sorted values: P90 -> 9.1, P99 -> 9.91
    assert d["p90"] == pytest.approx(9.1)
    assert d["p99"] == pytest.approx(9.91)
    assert d["median"] == pytest.approx(5.5)
    assert d["std"] == pytest.approx(float(np.std(np.arange(1, 11))))
    assert distribution([]) == {"mean": 0.0, "median": 0.0, "std": 0.0, "p90": 0.0, "p99": 0.0}


def test_goodput_counts_requests_within_every_slo() -> None:
    fast = rec(0, 0.100, [0.010] * 4, 5)  # tpot 10 ms, e2el 140 ms
    slow_start = rec(1, 0.900, [0.010] * 4, 5)  # ttft over
    slow_tokens = rec(2, 0.100, [0.080] * 4, 5)  # tpot 80 ms: over
    single = rec(3, 0.100, [], 1)  # TPOT counts as 0 for goodput
    records = [fast, slow_start, slow_tokens, single]
    s = summarize(records, 2.0, parse_slo(["ttft:500", "tpot:50"]))
    assert s["good_requests"] == 2 and s["goodput"] == pytest.approx(1.0)
    assert s["slo_ms"] == {"ttft": 500.0, "tpot": 50.0}
    s = summarize(records, 2.0, parse_slo(["e2el:300"]))
    assert s["good_requests"] == 2  # fast (140 ms) and single (100 ms)
    assert "goodput" not in summarize(records, 2.0)


@pytest.mark.parametrize("bad", ["ttft", "latency:5", "ttft:abc", "tpot:0"])
def test_bad_slo_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="slo"):
        parse_slo([bad])


def test_token_times_spread_usage_over_chunks() -> None:
    r = RequestRecord(0, 1, 4, start=1.0, success=True, ttft=0.5, e2el=1.0, itl=[0.25, 0.25],
                      output_tokens=6)
    assert token_times([r]) == [(1.5, 2.0), (1.75, 2.0), (2.0, 2.0)]


def test_arrivals_poisson_and_gamma() -> None:
    n = 20000
    poisson = np.diff(arrival_times(n, 10.0, 1.0, seed=1))
    assert poisson.mean() == pytest.approx(0.1, rel=0.03)
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, rel=0.05)  # exponential
    bursty = np.diff(arrival_times(n, 10.0, 0.25, seed=1))
    assert bursty.mean() == pytest.approx(0.1, rel=0.05)
    # gamma shape k: coefficient of variation 1/sqrt(k) = 2
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)
    assert arrival_times(5, math.inf, 1.0, seed=0) == [0.0] * 5


def test_load_points_validate() -> None:
    assert LoadPoint(concurrency=4).label == "concurrency 4"
    assert LoadPoint(request_rate=2.5, max_concurrency=8).label == "rate 2.5/s, max 8 in flight"
    for kwargs in [{"concurrency": 0}, {"request_rate": 0.0}, {"burstiness": -1.0}]:
        with pytest.raises(ValueError):
            LoadPoint(**kwargs)
